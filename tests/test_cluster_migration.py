"""A decode instance dies mid-stream: the request migrates (prompt + streamed tokens prefilled again, on
the surviving decode instance) and the client's stream goes on to the same tokens: seeded sampling
and penalties count the tokens streamed before the move."""

from __future__ import annotations

import json
import signal
import time

import pytest
from cluster_checks import TINY_CPU, open_stream
from pdserve.server.launcher import ProcessGroup, free_port, http_json

FLAGS = [
    *TINY_CPU,
    "--enable-layer",
    "--heartbeat-interval",
    "0.3",
]


@pytest.fixture(scope="module")
def cluster():
    group = ProcessGroup()
    try:
        sp = free_port()
        url = f"http://127.0.0.1:{sp}"
        sched = group.start(
            "scheduler",
            ["scheduler", "--model", "tiny", "--port", str(sp), "--poll-interval", "0.2"],
        )
        children = {}
        for name, role in (("p", "prefill"), ("d1", "decode"), ("d2", "decode")):
            port = free_port()
            children[name] = (
                group.start(
                    name, ["serve", "--role", role, "--port", str(port), "--scheduler", url, *FLAGS]
                ),
                f"http://127.0.0.1:{port}",
            )
        for child, curl in children.values():
            group.wait_healthy(child, curl, timeout=90)
        group.wait_healthy(sched, url, timeout=90, ready_key="ready")
        deadline = time.monotonic() + 60
        while len(http_json(f"{url}/internal/v1/cluster")["linked"]) < 2:
            assert time.monotonic() < deadline
            time.sleep(0.1)
        yield {"group": group, "url": url, "children": children}
    finally:
        group.close()


def test_stream_survives_a_decode_instance_dying(cluster):
    url, children = cluster["url"], cluster["children"]
    prompt = [(i * 9 + 4) % 250 for i in range(37)]
    body = {
        "prompt": prompt,
        "max_tokens": 300,
        "temperature": 0.7,
        "seed": 3,
        "frequency_penalty": 0.6,
        "presence_penalty": 0.4,
        "ignore_eos": True,
    }
    reference = http_json(f"{url}/v1/completions", body)["choices"][0]["token_ids"]
    tokens, finish, killed = [], None, None
    with open_stream(f"{url}/v1/completions", {**body, "stream": True}, timeout=120) as resp:
        for raw in resp:
            line = raw.decode().strip()
            if not line or line == "data: [DONE]":
                continue
            chunk = json.loads(line[len("data: ") :])
            assert "error" not in chunk, chunk
            tokens.extend(chunk["choices"][0]["token_ids"])
            finish = chunk["choices"][0]["finish_reason"] or finish
            if killed is None:  # at the first chunk, long before D is done with 300 tokens
                serving = http_json(f"{url}/internal/v1/cluster")["routes"][-1][2]
                killed = next(
                    n for n, (_, u) in children.items() if serving.endswith(u.rsplit("/", 1)[1])
                )
                cluster["group"].stop(children[killed][0], signal.SIGKILL)
    assert killed is not None and finish == "length"
    assert tokens == reference  # the migrated request continues exactly
    routes = http_json(f"{url}/internal/v1/cluster")["routes"]
    assert routes[-1][0].endswith(".m1")  # it did move
    survivors = [u for n, (_, u) in children.items() if n != killed]
    deadline = time.monotonic() + 10
    while True:
        held = [http_json(f"{u}/internal/v1/stats") for u in survivors]
        if all(
            s["num_used_blocks"] == 0
            and s["num_reservations"] == 0
            and s["num_pinned_prefills"] == 0
            and s["invariant_error"] is None
            for s in held
        ):
            break
        assert time.monotonic() < deadline, held
        time.sleep(0.2)
