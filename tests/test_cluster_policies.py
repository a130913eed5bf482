"""Each routing policy routes as specified, through real schedulers over the same four instances.

Two prefill and two decode instances (radix caching on) start once; several schedulers in fixed mode
(`--prefill URL --decode URL`), one per policy, share them. The scheduler's route log says where
each request went.
"""

from __future__ import annotations

import time

import pytest
from cluster_checks import TINY_CPU, open_stream
from pdserve.server.launcher import ProcessGroup, free_port, http_json
from pdserve.server.policies import InstanceSnapshot, RouteContext, make_policy

COMMON = [
    *TINY_CPU,
    "--scheduler",
    "none",
    "--enable-radix-caching",
    "--enable-layer",
]
POLICIES = ("rr", "random", "prefix", "least", "cost")


@pytest.fixture(scope="module")
def cluster():
    group = ProcessGroup()
    try:
        urls = {}
        children = []
        for role in ("prefill", "prefill", "decode", "decode"):
            port = free_port()
            url = f"http://127.0.0.1:{port}"
            children.append(
                (
                    group.start(
                        f"{role}-{port}", ["serve", "--role", role, "--port", str(port), *COMMON]
                    ),
                    url,
                )
            )
            urls.setdefault(role, []).append(url)
        fixed = [a for u in urls["prefill"] for a in ("--prefill", u)] + [
            a for u in urls["decode"] for a in ("--decode", u)
        ]
        scheds = {}
        for policy in POLICIES:
            port = free_port()
            child = group.start(
                f"sched-{policy}",
                [
                    "scheduler",
                    "--model",
                    "tiny",
                    "--port",
                    str(port),
                    "--ep-policy",
                    policy,
                    "--ed-policy",
                    policy,
                    "--seed",
                    "3",
                    "--poll-interval",
                    "0.2",
                    *fixed,
                ],
            )
            scheds[policy] = (child, f"http://127.0.0.1:{port}")
        for child, url in children:
            group.wait_healthy(child, url, timeout=90)
        for child, url in scheds.values():
            group.wait_healthy(child, url, timeout=90, ready_key="ready")
            deadline = time.monotonic() + 60
            while len(http_json(f"{url}/internal/v1/cluster")["linked"]) < 4:
                assert time.monotonic() < deadline, "scheduler did not link all pairs"
                time.sleep(0.1)
        ids = {}
        for role in ("prefill", "decode"):
            ids[role] = sorted(
                http_json(f"{u}/internal/v1/info")["instance_id"] for u in urls[role]
            )
        yield {"urls": urls, "sched": {k: v[1] for k, v in scheds.items()}, "ids": ids}
    finally:
        group.close()


@pytest.fixture(autouse=True)
def _nothing_held_after_each_test(cluster):
    yield
    urls = cluster["urls"]["prefill"] + cluster["urls"]["decode"]
    deadline = time.monotonic() + 15
    while True:
        stats = [http_json(f"{u}/internal/v1/stats") for u in urls]
        held = [
            (
                s["instance_id"],
                s["invariant_error"],
                s["num_reservations"],
                s["num_pinned_prefills"],
                s["num_used_blocks"],
                s["num_reserved_blocks"],
            )
            for s in stats
        ]
        if not any(any(h[1:]) for h in held):
            return
        assert time.monotonic() < deadline, held
        time.sleep(0.2)


def send(url, prompt, max_tokens=4):
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}
    return http_json(f"{url}/v1/completions", body)


def last_route(url):
    return http_json(f"{url}/internal/v1/cluster")["routes"][-1]


def test_rr_alternates_in_id_order(cluster):
    url = cluster["sched"]["rr"]
    routes = []
    for i in range(4):
        send(url, [10 + i] * 20)
        routes.append(last_route(url))
    p_ids, d_ids = cluster["ids"]["prefill"], cluster["ids"]["decode"]
    assert [r[1] for r in routes] == [p_ids[0], p_ids[1], p_ids[0], p_ids[1]]
    assert [r[2] for r in routes] == [d_ids[0], d_ids[1], d_ids[0], d_ids[1]]


def test_random_is_the_seeded_sequence(cluster):
    url = cluster["sched"]["random"]
    routes = []
    for i in range(6):
        send(url, [30 + i] * 18)
        routes.append(last_route(url))
    # the scheduler's policies: seed for P, seed + 1 for D, over the instances in id order
    p_policy, d_policy = make_policy("random", "prefill", 3), make_policy("random", "decode", 4)
    ctx = RouteContext([1])
    ps = [InstanceSnapshot(i, "prefill") for i in cluster["ids"]["prefill"]]
    ds = [InstanceSnapshot(i, "decode") for i in cluster["ids"]["decode"]]
    expected = [
        (p_policy.choose(ps, ctx).instance_id, d_policy.choose(ds, ctx).instance_id)
        for _ in range(6)
    ]
    assert [(r[1], r[2]) for r in routes] == expected


@pytest.mark.parametrize("policy", ["prefix", "cost"])
def test_prefix_and_cost_follow_the_cached_prompt(cluster, policy):
    """With idle instances, `cost` reduces to cache affinity too (uncached compute and transfer)."""
    rr, prefix = cluster["sched"]["rr"], cluster["sched"][policy]
    salt = 0 if policy == "prefix" else 100
    a = [(i * 7 + 1 + salt) % 250 for i in range(64)]
    b = [(i * 5 + 2 + salt) % 250 for i in range(64)]
    send(rr, a)
    route_a = last_route(rr)
    send(rr, b)
    route_b = last_route(rr)
    assert route_a[1] != route_b[1] and route_a[2] != route_b[2]  # rr spread them
    http_json(f"{prefix}/internal/v1/refresh", {})  # pull the cache events now
    cl = http_json(f"{prefix}/internal/v1/cluster")
    assert all(i["num_mirrored_blocks"] > 0 for i in cl["instances"]), cl["instances"]
    for prompt, route in ((b + [3, 4, 5], route_b), (a + [9, 9], route_a), (b + [1], route_b)):
        send(prefix, prompt)
        got = last_route(prefix)
        assert (got[1], got[2]) == (route[1], route[2])


def test_least_decode_avoids_the_busy_decode_instance(cluster):
    url = cluster["sched"]["least"]
    body = {
        "prompt": list(range(100, 200)),
        "max_tokens": 1500,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
    }
    resp = open_stream(f"{url}/v1/completions", body)
    try:
        for raw in resp:
            if raw.strip():
                break
        busy = last_route(url)[2]
        time.sleep(0.6)  # a stats poll sees the busy instance's used blocks
        send(url, [5] * 40)
        assert last_route(url)[2] != busy
    finally:
        resp.close()
    # once the long request is gone (aborted on disconnect) nothing stays held
    deadline = time.monotonic() + 15
    while True:
        held = [
            http_json(f"{u}/internal/v1/stats")["num_used_blocks"]
            for u in cluster["urls"]["decode"]
        ]
        if not any(held):
            break
        assert time.monotonic() < deadline, held
        time.sleep(0.2)
