"""Failure paths release every block on both sides: abandoned reservations, a prefill that cannot
deliver, KV that never arrives, and a decode instance killed mid-stream (then restarted: it registers
again under a new incarnation and the scheduler relinks it)."""

from __future__ import annotations

import json
import signal
import threading
import time
import urllib.error
import urllib.request

import pytest
from cluster_checks import TINY_CPU, open_stream, post_error
from pdserve.server.launcher import ProcessGroup, free_port, http_json

FLAGS = [
    *TINY_CPU,
    "--enable-radix-caching",
    "--enable-layer",
    "--transfer-timeout",
    "2",
    "--heartbeat-interval",
    "0.3",
]


@pytest.fixture(scope="module")
def cluster():
    group = ProcessGroup()
    try:
        sp, pp, dp = free_port(), free_port(), free_port()
        surl = f"http://127.0.0.1:{sp}"
        sched = group.start(
            "scheduler",
            ["scheduler", "--model", "tiny", "--port", str(sp), "--poll-interval", "0.2"],
        )
        p = group.start(
            "prefill",
            ["serve", "--role", "prefill", "--port", str(pp), "--scheduler", surl, *FLAGS],
        )
        d_args = ["serve", "--role", "decode", "--port", str(dp), "--scheduler", surl, *FLAGS]
        d = group.start("decode", d_args)
        purl, durl = f"http://127.0.0.1:{pp}", f"http://127.0.0.1:{dp}"
        for child, url in ((p, purl), (d, durl)):
            group.wait_healthy(child, url, timeout=90)
        wait_linked(group, sched, surl)
        yield {
            "group": group,
            "url": surl,
            "prefill": purl,
            "decode": durl,
            "decode_args": d_args,
            "decode_child": d,
            "sched": sched,
        }
    finally:
        group.close()


def wait_linked(group, sched, url, timeout=60):
    group.wait_healthy(sched, url, timeout=timeout, ready_key="ready")
    deadline = time.monotonic() + timeout
    while not http_json(f"{url}/internal/v1/cluster")["linked"]:
        assert time.monotonic() < deadline
        time.sleep(0.1)


def held(url: str) -> dict:
    s = http_json(f"{url}/internal/v1/stats")
    keys = (
        "num_reservations",
        "num_pinned_prefills",
        "num_dcache_reservations",
        "num_pending_transfers",
        "num_reserved_blocks",
        "num_used_blocks",
        "num_pinned",
        "num_running",
        "num_waiting",
    )
    out = {k: s[k] for k in keys if s.get(k)}
    if s["invariant_error"]:
        out["invariant_error"] = s["invariant_error"]
    return out


def assert_nothing_held(*urls, timeout=10.0):
    deadline = time.monotonic() + timeout
    while True:
        state = {u: held(u) for u in urls}
        if not any(state.values()):
            return
        assert time.monotonic() < deadline, state
        time.sleep(0.2)


def pid(url: str) -> str:
    return http_json(f"{url}/internal/v1/info")["instance_id"]


def test_reservation_released_by_hand(cluster):
    d = cluster["decode"]
    p_id = pid(cluster["prefill"])
    res = http_json(
        f"{d}/internal/v1/reserve",
        {"request_id": "t-res-1", "prompt_token_ids": list(range(40)), "peer_id": p_id},
    )
    assert len(res["block_ids"]) == 3 and res["num_expected_bytes"] > 0
    assert held(d)["num_reservations"] == 1
    code, msg = post_error(
        f"{d}/internal/v1/reserve",
        {"request_id": "t-res-1", "prompt_token_ids": [1, 2], "peer_id": p_id},
    )
    assert code == 409 and "already" in msg
    assert http_json(f"{d}/internal/v1/release", {"request_id": "t-res-1"})["released"]
    assert not http_json(f"{d}/internal/v1/release", {"request_id": "t-res-1"})[
        "released"
    ]  # idempotent
    assert_nothing_held(d)


def test_a_peer_not_linked_is_a_503_to_retry(cluster):
    """An instance not linked to the named peer (not yet, or not again after a restart) answers 503
    (the client may retry), not a 4xx (nothing was wrong with the request)."""
    p, d = cluster["prefill"], cluster["decode"]
    code, msg = post_error(
        f"{d}/internal/v1/reserve",
        {"request_id": "t-nl-1", "prompt_token_ids": [1, 2, 3], "peer_id": "nobody"},
    )
    assert code == 503 and "no link" in msg
    code, msg = post_error(
        f"{p}/internal/v1/prefill",
        {**_await_peer_prefill("t-nl-2", [1, 2, 3], d), "peer_id": "nobody"},
    )
    assert code == 503 and "no link" in msg
    assert_nothing_held(p, d)


def test_keep_kv_without_the_kv_keeps_nothing(cluster):
    """release keep_kv on a reservation whose KV never came: nothing enters D's tree, all is freed."""
    d = cluster["decode"]
    prompt = [(i * 5) % 200 + 30 for i in range(40)]
    body = {
        "request_id": "t-keep-1",
        "prompt_token_ids": prompt,
        "peer_id": pid(cluster["prefill"]),
    }
    assert http_json(f"{d}/internal/v1/reserve", body)["num_cached_tokens"] == 0
    release = {"request_id": "t-keep-1", "keep_kv": True}
    assert http_json(f"{d}/internal/v1/release", release)["released"]
    assert_nothing_held(d)
    body["request_id"] = "t-keep-2"
    assert http_json(f"{d}/internal/v1/reserve", body)["num_cached_tokens"] == 0
    assert http_json(f"{d}/internal/v1/release", {"request_id": "t-keep-2"})["released"]
    assert_nothing_held(d)


def test_prefill_that_cannot_deliver_releases_both_sides(cluster):
    p, d = cluster["prefill"], cluster["decode"]
    peer_id = http_json(f"{d}/internal/v1/info")["instance_id"]
    prompt = list(range(100, 150))
    res = http_json(
        f"{d}/internal/v1/reserve",
        {"request_id": "t-pf-1", "prompt_token_ids": prompt, "peer_id": pid(p)},
    )
    body = {
        "request_id": "t-pf-1",
        "prompt_token_ids": prompt,
        "sampling": {"max_tokens": 4, "temperature": 0},
        "peer_id": peer_id,
        "num_peer_cached_tokens": res["num_cached_tokens"],
        "peer_block_ids": res["block_ids"][:-1],
    }  # one block short: the hook cannot place the last one
    code, msg = post_error(f"{p}/internal/v1/prefill", body)
    assert code == 500 and "t-pf-1" in msg
    http_json(
        f"{d}/internal/v1/release", {"request_id": "t-pf-1", "abort": True}
    )  # what the scheduler does
    assert_nothing_held(p, d)


def test_decode_gives_up_when_the_kv_never_comes(cluster):
    d = cluster["decode"]
    prompt = list(range(60, 90))
    reserve = {
        "request_id": "t-to-1",
        "prompt_token_ids": prompt,
        "peer_id": pid(cluster["prefill"]),
    }
    http_json(f"{d}/internal/v1/reserve", reserve)
    t0 = time.monotonic()
    code, msg = post_error(
        f"{d}/internal/v1/decode",
        {
            "request_id": "t-to-1",
            "prompt_token_ids": prompt,
            "first_token_id": 5,
            "sampling": {"max_tokens": 3},
        },
    )
    assert code == 504 and time.monotonic() - t0 < 10
    assert_nothing_held(d)


def test_decode_instance_killed_mid_stream_then_restarted(cluster):
    url, p = cluster["url"], cluster["prefill"]
    body = {
        "prompt": list(range(10, 60)),
        "max_tokens": 1500,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
    }
    events = []
    with open_stream(f"{url}/v1/completions", body) as resp:
        for raw in resp:
            line = raw.decode().strip()
            if not line:
                continue
            events.append(line)
            if len(events) == 3:
                cluster["group"].stop(cluster["decode_child"], signal.SIGKILL)
    assert events[-1] == "data: [DONE]"
    assert '"error"' in events[-2]  # reported in-band: the headers were already out
    assert_nothing_held(p)  # P unpinned when D acknowledged the KV; nothing left behind
    # no decode instance now: a clear 5xx, not a hang
    code, _ = post_error(f"{url}/v1/completions", {"prompt": [1, 2, 3], "max_tokens": 2})
    assert code in (502, 503)
    # restart D on the same port: it registers again (new incarnation) and the pair is relinked
    group = cluster["group"]
    d = group.start("decode-2", cluster["decode_args"])
    group.wait_healthy(d, cluster["decode"], timeout=90)
    deadline = time.monotonic() + 30
    while True:
        try:
            out = http_json(
                f"{url}/v1/completions", {"prompt": [1, 2, 3], "max_tokens": 2, "ignore_eos": True}
            )
            break
        except urllib.error.HTTPError as exc:
            assert time.monotonic() < deadline, exc.read()
            time.sleep(0.3)
    assert len(out["choices"][0]["token_ids"]) == 2
    assert_nothing_held(p, cluster["decode"])


def test_scheduler_restart_instances_register_again_and_mirrors_refill(cluster):
    group, url = cluster["group"], cluster["url"]
    http_json(
        f"{url}/v1/completions",
        {"prompt": list(range(200, 240)), "max_tokens": 3, "ignore_eos": True},
    )
    group.stop(cluster["sched"])
    port = url.rsplit(":", 1)[1]
    sched = group.start(
        "scheduler-2", ["scheduler", "--model", "tiny", "--port", port, "--poll-interval", "0.2"]
    )
    cluster["sched"] = sched
    wait_linked(group, sched, url)
    http_json(f"{url}/internal/v1/refresh", {})
    mirrored = {
        i["role"]: i["num_mirrored_blocks"]
        for i in http_json(f"{url}/internal/v1/cluster")["instances"]
    }
    assert mirrored["prefill"] > 0 and mirrored["decode"] > 0  # the instances' event logs replayed
    out = http_json(
        f"{url}/v1/completions",
        {"prompt": list(range(200, 250)), "max_tokens": 3, "ignore_eos": True},
    )
    assert out["usage"]["prompt_tokens_details"]["cached_tokens"] > 0
    assert_nothing_held(cluster["prefill"], cluster["decode"])


# ---- a prefill that learns D's blocks later (await_peer): what the scheduler does on every request
def _await_peer_prefill(request_id: str, prompt: list[int], d_url: str) -> dict:
    return {
        "request_id": request_id,
        "prompt_token_ids": prompt,
        "sampling": {"max_tokens": 4, "temperature": 0, "ignore_eos": True},
        "peer_id": pid(d_url),
        "await_peer": True,
    }


def test_targets_that_arrive_before_the_prefill_wait_for_it(cluster):
    url, p, d = cluster["url"], cluster["prefill"], cluster["decode"]
    prompt = [(i * 7) % 200 + 20 for i in range(50)]  # 4 blocks of 16
    via_scheduler = http_json(
        f"{url}/v1/completions",
        {"prompt": prompt, "max_tokens": 4, "temperature": 0, "ignore_eos": True},
    )["choices"][0]["token_ids"]
    # D now holds the prompt's whole blocks: only the last block's KV has to travel
    res = http_json(
        f"{d}/internal/v1/reserve",
        {"request_id": "t-early-1", "prompt_token_ids": prompt, "peer_id": pid(p)},
    )
    assert res["num_cached_tokens"] == 48 and len(res["block_ids"]) == 1
    early = http_json(
        f"{p}/internal/v1/prefill/peer",
        {
            "request_id": "t-early-1",
            "num_peer_cached_tokens": res["num_cached_tokens"],
            "peer_block_ids": res["block_ids"],
        },
    )
    assert early["prefilling"] is False  # kept for the prefill
    pre = http_json(f"{p}/internal/v1/prefill", _await_peer_prefill("t-early-1", prompt, d))
    assert pre["nbytes_sent"] == res["num_expected_bytes"] > 0  # D's cached blocks stayed home
    tokens = [pre["first_token_id"]]
    decode = {
        "request_id": "t-early-1",
        "prompt_token_ids": prompt,
        "first_token_id": pre["first_token_id"],
        "sampling": {"max_tokens": 4, "temperature": 0, "ignore_eos": True},
    }
    with open_stream(f"{d}/internal/v1/decode", decode) as resp:
        for raw in resp:
            line = json.loads(raw)
            tokens += line.get("token_ids", [])
    http_json(f"{p}/internal/v1/release", {"request_id": "t-early-1"})
    assert tokens == via_scheduler
    assert_nothing_held(p, d)


def test_what_p_holds_for_a_scheduler_that_is_gone_expires(cluster):
    """A finished prefill stays pinned, and a back-transfer reservation open, until the scheduler
    releases or commits it; should that never come (the scheduler died), both expire after
    2 x --transfer-timeout (D's reservation does too)."""
    p, d = cluster["prefill"], cluster["decode"]
    prompt = [(i * 5) % 200 + 30 for i in range(40)]
    res = http_json(
        f"{d}/internal/v1/reserve",
        {"request_id": "t-gone-1", "prompt_token_ids": prompt, "peer_id": pid(p)},
    )
    targets = {
        "request_id": "t-gone-1",
        "num_peer_cached_tokens": res["num_cached_tokens"],
        "peer_block_ids": res["block_ids"],
    }
    http_json(f"{p}/internal/v1/prefill/peer", targets)
    http_json(f"{p}/internal/v1/prefill", _await_peer_prefill("t-gone-1", prompt, d))
    back = [(i * 3) % 200 + 11 for i in range(48)]  # 3 blocks P has never seen
    dres = http_json(
        f"{p}/internal/v1/dcache/reserve",
        {"request_id": "t-gone-2", "token_ids": back, "peer_id": pid(d)},
    )
    assert len(dres["block_ids"]) == 3
    state = held(p)
    assert state["num_pinned_prefills"] == 1 and state["num_dcache_reservations"] == 1, state
    assert_nothing_held(p, d, timeout=15)


def test_a_prefill_that_comes_after_d_gave_up_is_a_503(cluster):
    """D waits --transfer-timeout for the KV from its reserve on; a prefill queued past that finds
    its sends refused: a 503 (overloaded, try again), not a 500, and nothing held on either side."""
    p, d = cluster["prefill"], cluster["decode"]
    prompt = [(i * 9) % 200 + 17 for i in range(40)]
    res = http_json(
        f"{d}/internal/v1/reserve",
        {"request_id": "t-late-1", "prompt_token_ids": prompt, "peer_id": pid(p)},
    )
    time.sleep(2.5)  # past D's --transfer-timeout 2
    targets = {
        "request_id": "t-late-1",
        "num_peer_cached_tokens": res["num_cached_tokens"],
        "peer_block_ids": res["block_ids"],
    }
    http_json(f"{p}/internal/v1/prefill/peer", targets)
    code, msg = post_error(f"{p}/internal/v1/prefill", _await_peer_prefill("t-late-1", prompt, d))
    assert code == 503, (code, msg)
    http_json(f"{d}/internal/v1/release", {"request_id": "t-late-1", "abort": True})
    assert_nothing_held(p, d)


def test_prefill_released_before_it_arrives_is_refused(cluster):
    p, d = cluster["prefill"], cluster["decode"]
    http_json(f"{p}/internal/v1/release", {"request_id": "t-rel-1", "abort": True})
    code, msg = post_error(
        f"{p}/internal/v1/prefill", _await_peer_prefill("t-rel-1", list(range(20)), d)
    )
    assert code == 409 and "released" in msg
    targets = {"request_id": "t-rel-1", "num_peer_cached_tokens": 0, "peer_block_ids": [1, 2]}
    code, msg = post_error(f"{p}/internal/v1/prefill/peer", targets)
    assert code == 409 and "released" in msg
    assert_nothing_held(p)


def test_prefill_whose_targets_never_come_gives_up(cluster):
    p, d = cluster["prefill"], cluster["decode"]
    code, msg = post_error(
        f"{p}/internal/v1/prefill", _await_peer_prefill("t-nt-1", list(range(30)), d)
    )
    assert code == 504 and "prefill/peer" in msg  # after --transfer-timeout 2
    assert_nothing_held(p)


def test_prefill_waiting_for_targets_ends_on_release(cluster):
    p, d = cluster["prefill"], cluster["decode"]
    result = {}

    def prefill():
        result["error"] = post_error(
            f"{p}/internal/v1/prefill", _await_peer_prefill("t-wr-1", list(range(40)), d)
        )

    thread = threading.Thread(target=prefill)
    thread.start()
    deadline = time.monotonic() + 10
    while http_json(f"{p}/internal/v1/stats")["num_pinned_prefills"] == 0:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    http_json(f"{p}/internal/v1/release", {"request_id": "t-wr-1", "abort": True})
    thread.join(30)
    code, msg = result["error"]
    assert code == 409 and "cancelled" in msg  # ended by the release, not by the 2 s timeout (504)
    assert_nothing_held(p)


def test_prefill_peer_rejects_bad_targets(cluster):
    p = cluster["prefill"]
    code, msg = post_error(
        f"{p}/internal/v1/prefill/peer",
        {"request_id": "t-bad-1", "num_peer_cached_tokens": 5, "peer_block_ids": []},
    )
    assert code == 400 and "multiple of the block size 16" in msg
    code, msg = post_error(f"{p}/internal/v1/prefill/peer", {"request_id": "t-bad-1"})
    assert code == 400 and "peer_block_ids" in msg
