"""`pdserve serve --tensor-parallel-size 2` end to end on the CPU (real processes on 127.0.0.1, `tiny`).

One module-wide set of processes:
  - `ref`: a colocated TP-1 instance, the reference for greedy outputs;
  - `colo2`: a colocated TP-2 instance;
  - a TP-2 prefill and a TP-2 decode instance behind a scheduler: layer-wise transfer, radix caching and
    dcache, the decode side receiving through host staging slots (`--kv-staging on`);
  - `d1`: a TP-1 decode instance with no scheduler (a pair with the TP-2 prefill must be refused).
After every test each instance's block invariant holds and nothing stays reserved.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest
from cluster_checks import open_stream, post_error, settle_and_check
from pdserve.server.launcher import ProcessGroup, free_port, http_json

COMMON = ["--model", "tiny", "--device", "cpu", "--kv-cache-gb", "0.01", "--block-size", "16"]
COMMON += ["--heartbeat-interval", "0.3"]
SAMPLING = {"max_tokens": 10, "temperature": 0, "ignore_eos": True}
PROMPTS = [[7], list(range(20, 36)), [(i * 37) % 250 for i in range(70)]]


def _children(pid: int) -> list[int]:
    """Every live descendant of `pid` (from /proc, no psutil)."""
    parents: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        parents.setdefault(ppid, []).append(int(name))
    out, todo = [], [pid]
    while todo:
        for child in parents.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _worker_pids(pid: int) -> list[int]:
    """The TP worker processes of a server (multiprocessing spawn children, not the resource tracker)."""
    found = []
    for child in _children(pid):
        try:
            with open(f"/proc/{child}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if "spawn_main" in cmd:
            found.append(child)
    return found


def _ctrl_c_leaves_nothing(group: ProcessGroup, child) -> None:
    """SIGINT to the server process alone (as Ctrl-C in its terminal would): it exits cleanly and no
    process it started survives it."""
    descendants = _children(child.proc.pid)
    workers = _worker_pids(child.proc.pid)
    assert workers, f"{child.name} has no TP worker process"
    child.proc.send_signal(signal.SIGINT)
    code = child.proc.wait(30)
    group.children = [c for c in group.children if c is not child]
    deadline = time.monotonic() + 10
    while any(_alive(p) for p in descendants) and time.monotonic() < deadline:
        time.sleep(0.1)
    left = [p for p in descendants if _alive(p)]
    assert not left, f"{child.name} left processes {left}; log:\n{child.log_tail()}"
    assert code == 0, child.log_tail()


@pytest.fixture(scope="module")
def tp():
    group = ProcessGroup()
    try:
        rp, cp, pp, dp, sp, d1p = (free_port() for _ in range(6))
        url = {
            "ref": f"http://127.0.0.1:{rp}",
            "colo2": f"http://127.0.0.1:{cp}",
            "p2": f"http://127.0.0.1:{pp}",
            "d2": f"http://127.0.0.1:{dp}",
            "sched": f"http://127.0.0.1:{sp}",
            "d1": f"http://127.0.0.1:{d1p}",
        }
        procs = {
            "ref": group.start("ref", ["serve", "--port", str(rp), "--scheduler", "none", *COMMON]),
            "colo2": group.start(
                "colo2", ["serve", "--port", str(cp), "--scheduler", "none", "-tp", "2", *COMMON]
            ),
        }
        pd = ["--enable-layer", "--enable-radix-caching", "--enable-dcache", "-tp", "2"]
        procs["p2"] = group.start(
            "p2",
            ["serve", "--role=prompt", "--enable-separate", "--local_port", str(pp)]
            + ["--scheduler", url["sched"], *COMMON, *pd],
        )
        procs["d2"] = group.start(
            "d2",
            ["serve", "--role=decoder", "--enable-separate", "--local_port", str(dp)]
            + ["--scheduler", url["sched"], *COMMON, *pd, "--kv-staging", "on"]
            + ["--staging-gb", "0.005"],
        )
        procs["d1"] = group.start(
            "d1",
            ["serve", "--role=decoder", "--local_port", str(d1p), "--scheduler", "none", *COMMON],
        )
        procs["sched"] = group.start(
            "sched",
            ["scheduler", "--model", "tiny", "--port", str(sp), "--poll-interval", "0.2"],
        )
        for name in ("ref", "colo2", "p2", "d2", "d1"):
            group.wait_healthy(procs[name], url[name], timeout=90)
        group.wait_healthy(procs["sched"], url["sched"], timeout=90, ready_key="ready")
        deadline = time.monotonic() + 60
        while not http_json(f"{url['sched']}/internal/v1/cluster")["linked"]:
            assert time.monotonic() < deadline, "the scheduler never linked the TP-2 pair"
            time.sleep(0.1)
        yield {"url": url, "procs": procs, "group": group}
    finally:
        group.close()


@pytest.fixture(autouse=True)
def _invariants_after_each_test(tp):
    yield
    live = {c.name for c in tp["group"].children if c.proc.poll() is None}
    settle_and_check([u for n, u in tp["url"].items() if n in live and n != "sched"])


def complete(url: str, prompt) -> list[int]:
    body = {"prompt": prompt, **SAMPLING}
    return http_json(f"{url}/v1/completions", body)["choices"][0]["token_ids"]


def test_info_announces_every_rank(tp):
    for name in ("colo2", "p2", "d2"):
        info = http_json(f"{tp['url'][name]}/internal/v1/info")
        assert info["tensor_parallel_size"] == 2 and len(info["layouts"]) == 2
        if info["transfer"]:
            extra = info["transfer"]["extra"]
            assert extra["tensor_parallel_size"] == 2 and len(extra["layouts"]) == 2


def test_colocated_and_layerwise_tp2_match_tp1(tp):
    url = tp["url"]
    for prompt in PROMPTS:
        ref = complete(url["ref"], prompt)
        assert len(ref) == SAMPLING["max_tokens"]
        assert complete(url["colo2"], prompt) == ref, prompt[:4]
        assert complete(url["sched"], prompt) == ref, prompt[:4]  # P TP-2 -> D TP-2, layer-wise
    # the second turn hits what dcache sent back into P's cache (both ranks' KV went back)
    prompt = [(i * 13 + 5) % 250 for i in range(45)]
    first = complete(url["sched"], prompt)
    assert first == complete(url["ref"], prompt)
    settle_and_check([url["p2"], url["d2"]])  # the back-transfer finished
    assert http_json(f"{url['p2']}/internal/v1/stats")["kv_bytes_received"] > 0
    turn2 = prompt + first + [5, 6, 7]
    resp = http_json(f"{url['sched']}/v1/completions", {"prompt": turn2, **SAMPLING})
    assert resp["choices"][0]["token_ids"] == complete(url["ref"], turn2)
    num_back = (len(prompt) + len(first) - 1) // 16 * 16  # D's whole blocks, now cached on P
    assert resp["usage"]["prompt_tokens_details"]["cached_tokens"] == num_back
    d2 = http_json(f"{url['d2']}/internal/v1/stats")
    assert d2["num_staging_slots"] > 0 and d2["kv_bytes_received"] > 0  # through the staging slots


def test_whole_request_tp2_matches_tp1(tp):
    """The P/D protocol by hand with `layerwise: false`: one push of every layer on every rank."""
    url = tp["url"]
    p_id = http_json(f"{url['p2']}/internal/v1/info")["instance_id"]
    d_id = http_json(f"{url['d2']}/internal/v1/info")["instance_id"]
    prompt = [(i * 11 + 3) % 250 for i in range(45)]
    rid = "tp-whole-1"
    res = http_json(
        f"{url['d2']}/internal/v1/reserve",
        {"request_id": rid, "prompt_token_ids": prompt, "peer_id": p_id},
    )
    pre = http_json(
        f"{url['p2']}/internal/v1/prefill",
        {
            "request_id": rid,
            "prompt_token_ids": prompt,
            "sampling": SAMPLING,
            "peer_id": d_id,
            "num_peer_cached_tokens": res["num_cached_tokens"],
            "peer_block_ids": res["block_ids"],
            "layerwise": False,
        },
    )
    assert pre["nbytes_sent"] == res["num_expected_bytes"] > 0
    # every rank's shard: 2 ranks x layers x piece bytes per block
    rank0 = http_json(f"{url['p2']}/internal/v1/info")["layouts"][0]
    num_blocks = len(res["block_ids"])
    assert res["num_expected_bytes"] == 2 * num_blocks * rank0["num_layers"] * rank0["piece_nbytes"]
    decode = {
        "request_id": rid,
        "prompt_token_ids": prompt,
        "sampling": SAMPLING,
        "first_token_id": pre["first_token_id"],
    }
    tokens = [pre["first_token_id"]]
    with open_stream(f"{url['d2']}/internal/v1/decode", decode) as resp:
        for line in resp:
            msg = json.loads(line)
            tokens += msg.get("token_ids", [])
    http_json(f"{url['p2']}/internal/v1/release", {"request_id": rid})
    assert tokens == complete(url["ref"], prompt)


def test_mismatched_tp_sizes_refused_at_link(tp):
    url = tp["url"]
    for a, b in ((url["p2"], url["d1"]), (url["d1"], url["p2"])):
        status, msg = post_error(f"{a}/internal/v1/link", {"peer_url": b})
        assert status == 400, msg
        assert "--tensor-parallel-size 2" in msg and "--tensor-parallel-size 1" in msg, msg
    out = subprocess.run(
        [sys.executable, "-m", "pdserve", "link", "--prefill", url["p2"], "--decode", url["d1"]],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 1 and "same --tensor-parallel-size" in out.stderr, out.stderr


def test_worker_failure_marks_the_instance_lost(tp):
    url, group = tp["url"], tp["group"]
    child = tp["procs"]["colo2"]
    workers = _worker_pids(child.proc.pid)
    assert len(workers) == 1
    os.kill(workers[0], signal.SIGKILL)
    status, msg = post_error(f"{url['colo2']}/v1/completions", {"prompt": [1, 2, 3], **SAMPLING})
    assert status == 500 and "worker rank 1" in msg and "died" in msg, msg
    # streamed, and the scheduler's internal stream: a JSON 500 before any byte (a scheduler takes
    # it as the instance lost for the request)
    body = {"prompt": [1, 2, 3], **SAMPLING, "stream": True}
    status, msg = post_error(f"{url['colo2']}/v1/completions", body)
    assert status == 500 and "died" in msg, msg
    body = {"request_id": "t-dead-1", "prompt_token_ids": [1, 2, 3], "sampling": SAMPLING}
    status, msg = post_error(f"{url['colo2']}/internal/v1/generate", body)
    assert status == 500 and "engine failed" in msg, msg
    req = urllib.request.Request(f"{url['colo2']}/health")
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(req, timeout=10)
    assert info.value.code == 503
    assert json.loads(info.value.read())["status"] == "lost"
    settle_and_check([url["colo2"]])  # the failed request gave its blocks back
    # the scheduler routes nothing here
    assert http_json(f"{url['colo2']}/internal/v1/stats")["lost"]
    group.stop(child)


def test_ctrl_c_stops_the_workers(tp):
    group = tp["group"]
    for name in ("p2", "d2"):
        _ctrl_c_leaves_nothing(group, tp["procs"][name])


def test_tp_size_the_model_cannot_split_fails_at_start():
    out = subprocess.run(
        [sys.executable, "-m", "pdserve", "serve", "--scheduler", "none", "-tp", "3"]
        + ["--port", str(free_port()), *COMMON],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert out.returncode == 2, out.stderr
    assert "error: --tensor-parallel-size 3" in out.stderr, out.stderr


def test_worker_use_ray_without_ray_names_the_flag():
    import argparse

    from pdserve.server import cli_serve
    from pdserve.server import engine_adapter as ea
    from pdserve.server.cli_serve import ConfigError

    try:
        import ray  # noqa: F401

        pytest.skip("Ray is installed here")
    except ImportError:
        pass
    parser = argparse.ArgumentParser()
    cli_serve.add_arguments(parser)
    config = cli_serve.resolve_config(
        parser.parse_args(["--model", "tiny", "--device", "cpu", "-tp", "2", "--worker-use-ray"]),
        cuda_available=False,
    )
    with pytest.raises(ConfigError, match="--worker-use-ray"):
        ea.build_engine(config)
