"""`--api-key` and `--cluster-token` on a real cluster (CPU, `tiny` preset, processes on 127.0.0.1).

One module-wide set of processes, every one given the same API key and cluster token (the scheduler
through $PDSERVE_API_KEY / $PDSERVE_CLUSTER_TOKEN, the instances through the flags): a scheduler with
a prefill and a decode instance that register, link and serve with the token, and a colocated
instance asked directly. After every test, every instance settles with all blocks released.
"""

from __future__ import annotations

import json
import time
import urllib.request

import pytest
from cluster_checks import TINY_CPU, open_stream, post_error, settle_and_check
from pdserve.cli import main
from pdserve.server.auth import CLUSTER_TOKEN_HEADER, cluster_headers
from pdserve.server.launcher import ProcessGroup, free_port, http_json

KEY = "sk-test-public-key"
TOKEN = "test-cluster-token"
BEARER = {"Authorization": f"Bearer {KEY}"}
INTERNAL = cluster_headers(TOKEN)
COMMON = [
    *TINY_CPU,
    "--heartbeat-interval",
    "0.3",
]
SECRETS = ["--api-key", KEY, "--cluster-token", TOKEN]


@pytest.fixture(scope="module")
def cluster():
    group = ProcessGroup(env={"PDSERVE_API_KEY": KEY, "PDSERVE_CLUSTER_TOKEN": TOKEN})
    try:
        sp, pp, dp, cp = free_port(), free_port(), free_port(), free_port()
        urls = {
            "sched": f"http://127.0.0.1:{sp}",
            "prefill": f"http://127.0.0.1:{pp}",
            "decode": f"http://127.0.0.1:{dp}",
            "colo": f"http://127.0.0.1:{cp}",
        }
        sched = group.start(
            "scheduler",
            ["scheduler", "--model", "tiny", "--port", str(sp), "--poll-interval", "0.2"],
        )
        for role, port in (("prefill", pp), ("decode", dp)):
            group.start(
                role,
                [
                    "serve",
                    "--role",
                    role,
                    "--port",
                    str(port),
                    "--scheduler",
                    urls["sched"],
                    "--enable-radix-caching",
                    "--enable-dcache",
                    "--enable-layer",
                    *COMMON,
                    *SECRETS,
                ],
            )
        colo = group.start(
            "colo", ["serve", "--port", str(cp), "--scheduler", "none", *COMMON, *SECRETS]
        )
        group.wait_healthy(sched, urls["sched"], timeout=90, ready_key="ready")
        group.wait_healthy(colo, urls["colo"], timeout=90)
        deadline = time.monotonic() + 90
        while not http_json(f"{urls['sched']}/internal/v1/cluster", headers=INTERNAL)["linked"]:
            assert time.monotonic() < deadline, "the scheduler never linked P and D"
            time.sleep(0.1)
        yield urls
    finally:
        group.close()


@pytest.fixture(autouse=True)
def _settled_after_each_test(cluster):
    yield
    settle_and_check([cluster["prefill"], cluster["decode"], cluster["colo"]], cluster_token=TOKEN)


def completion_body(stream: bool = False) -> dict:
    return {
        "prompt": list(range(30, 70)),  # several blocks
        "max_tokens": 6,
        "temperature": 0,
        "ignore_eos": True,
        "stream": stream,
    }


def sse_token_ids(url: str, body: dict) -> list[int]:
    ids = []
    with open_stream(url, body, BEARER) as resp:
        for raw in resp.read().decode().splitlines():
            if raw.startswith("data: {"):
                for choice in json.loads(raw[len("data: ") :])["choices"]:
                    ids += choice.get("token_ids") or []
    return ids


def test_public_api_refuses_a_missing_or_wrong_key(cluster):
    for name in ("sched", "colo", "prefill"):
        url = f"{cluster[name]}/v1/completions"
        status, msg = post_error(url, completion_body())
        assert status == 401 and "missing API key" in msg, (name, msg)
        status, msg = post_error(url, completion_body(), {"Authorization": "Bearer sk-nope"})
        assert status == 401 and "wrong API key" in msg, (name, msg)
        # the cluster token is no API key
        status, msg = post_error(url, completion_body(), {"Authorization": f"Bearer {TOKEN}"})
        assert status == 401 and "wrong API key" in msg and TOKEN not in msg, (name, msg)
    status, msg = post_error(f"{cluster['sched']}/v1/models", None)
    assert status == 401 and "missing API key" in msg


def test_completions_with_the_key_through_the_scheduler_and_on_an_instance(cluster):
    ref = http_json(f"{cluster['colo']}/v1/completions", completion_body(), headers=BEARER)
    ref_ids = ref["choices"][0]["token_ids"]
    assert len(ref_ids) == 6
    got = http_json(f"{cluster['sched']}/v1/completions", completion_body(), headers=BEARER)
    assert got["choices"][0]["token_ids"] == ref_ids
    # the disaggregated path ran: the route names both instances
    routes = http_json(f"{cluster['sched']}/internal/v1/cluster", headers=INTERNAL)["routes"]
    assert routes[-1][1].startswith("prefill@") and routes[-1][2].startswith("decode@")
    assert sse_token_ids(f"{cluster['sched']}/v1/completions", completion_body(True)) == ref_ids
    # the scheduler's background calls carry the token too: D's new KV blocks go back to P (dcache)
    http_json(
        f"{cluster['sched']}/v1/completions",
        {**completion_body(), "max_tokens": 30},
        headers=BEARER,
    )
    deadline = time.monotonic() + 10
    while not http_json(f"{cluster['prefill']}/internal/v1/stats", headers=INTERNAL)[
        "kv_bytes_received"
    ]:
        assert time.monotonic() < deadline, "no KV came back to the prefill instance"
        time.sleep(0.1)
    models = http_json(f"{cluster['sched']}/v1/models", headers=BEARER)
    assert models["data"][0]["id"] == "tiny"


def test_internal_api_needs_the_cluster_token_not_the_api_key(cluster):
    calls = [
        (f"{cluster['sched']}/internal/v1/cluster", None),
        (f"{cluster['prefill']}/internal/v1/stats", None),
        (f"{cluster['decode']}/internal/v1/info", None),
        (f"{cluster['prefill']}/internal/v1/link", {"peer_url": cluster["decode"]}),
        (f"{cluster['sched']}/internal/v1/register", {"url": cluster["colo"]}),
        (
            f"{cluster['colo']}/internal/v1/generate",
            {"request_id": "t-auth-1", "prompt_token_ids": [1, 2, 3]},
        ),
    ]
    for url, body in calls:
        status, msg = post_error(url, body)
        assert status == 401 and "missing cluster token" in msg, (url, msg)
        status, msg = post_error(url, body, {CLUSTER_TOKEN_HEADER: "wrong"})
        assert status == 401 and "wrong cluster token" in msg, (url, msg)
        status, msg = post_error(url, body, BEARER)  # the API key opens no internal door
        assert status == 401 and "does not open the internal API" in msg, (url, msg)
        status, msg = post_error(url, body, {CLUSTER_TOKEN_HEADER: KEY})
        assert status == 401 and KEY not in msg, (url, msg)
    assert http_json(f"{cluster['decode']}/internal/v1/info", headers=INTERNAL)["role"] == "decode"


def test_colocated_generate_with_the_token(cluster):
    """What a scheduler in front of a colocated instance calls: /internal/v1/generate (NDJSON)."""
    body = {
        "request_id": "t-auth-gen",
        "prompt_token_ids": list(range(30, 70)),
        "sampling": {"max_tokens": 6, "temperature": 0, "ignore_eos": True},
    }
    with open_stream(f"{cluster['colo']}/internal/v1/generate", body, INTERNAL) as resp:
        lines = [json.loads(x) for x in resp.read().decode().splitlines() if x.strip()]
    assert sum(len(x["token_ids"]) for x in lines) == 6 and lines[-1]["finish_reason"] == "length"


def test_health_and_metrics_stay_open(cluster):
    for url in cluster.values():
        assert http_json(f"{url}/health")["status"] == "ok"
        with urllib.request.urlopen(f"{url}/metrics", timeout=30) as resp:
            assert resp.status == 200 and b"pdserve_" in resp.read()


def test_bench_with_the_key_and_a_clear_error_without(cluster, monkeypatch, capsys):
    for name in ("PDSERVE_API_KEY", "OPENAI_API_KEY"):
        monkeypatch.delenv(name, raising=False)
    argv = ["bench", "--url", cluster["sched"], "--num-requests", "3", "--input-len", "8"]
    argv += ["--output-len", "4", "--request-rate", "inf", "--no-progress"]
    assert main([*argv, "--api-key", KEY]) == 0
    assert "pdserve bench" in capsys.readouterr().out
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "401" in err and "missing API key" in err and "--api-key" in err


def test_link_by_hand_sends_the_token(cluster, capsys):
    pair = ["--prefill", cluster["prefill"], "--decode", cluster["decode"]]
    assert main(["link", *pair, "--cluster-token", TOKEN]) == 0  # idempotent
    assert main(["link", *pair, "--cluster-token", "wrong"]) == 1
    assert "wrong cluster token" in capsys.readouterr().err
