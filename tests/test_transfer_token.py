"""`--cluster-token` guards an instance's KV transfer port too, not only its HTTP internal API.

A prefill and a decode instance (CPU, `tiny` preset, processes on 127.0.0.1) with the same token link
through their transfer engines; a bare `pdserve.transfer.TransferEngine` with another token, or none,
is refused at the decode instance's transfer address, and one with the token connects afterwards.
"""

from __future__ import annotations

import pytest
from pdserve.cli import main
from pdserve.server.auth import cluster_headers
from pdserve.server.launcher import ProcessGroup, free_port, http_json
from pdserve.transfer import TransferEngine, TransferError

TOKEN = "test-transfer-token"
FLAGS = ["--model", "tiny", "--device", "cpu", "--kv-cache-gb", "0.02", "--scheduler", "none"]


@pytest.fixture(scope="module")
def instances():
    group = ProcessGroup(env={"PDSERVE_CLUSTER_TOKEN": ""})  # the token comes from the flag only
    try:
        urls = {}
        for role in ("prefill", "decode"):
            port = free_port()
            urls[role] = f"http://127.0.0.1:{port}"
            child = group.start(
                role,
                ["serve", "--role", role, "--port", str(port), *FLAGS, "--cluster-token", TOKEN],
            )
            group.wait_healthy(child, urls[role], timeout=90)
        yield urls
    finally:
        group.close()


def transfer_address(url: str) -> str:
    info = http_json(f"{url}/internal/v1/info", headers=cluster_headers(TOKEN))
    return info["transfer"]["address"]


def test_instances_with_the_token_link_through_their_transfer_engines(instances):
    pair = ["--prefill", instances["prefill"], "--decode", instances["decode"]]
    assert main(["link", *pair, "--cluster-token", TOKEN]) == 0


def test_a_peer_without_the_token_is_refused_at_the_transfer_port(instances):
    address = transfer_address(instances["decode"])
    for token in ("not-the-token", None):
        with TransferEngine(cluster_token=token) as intruder:
            with pytest.raises(TransferError) as info:
                intruder.connect(address, timeout_s=5)
            msg = str(info.value)
            assert f"peer {address} refused the connection" in msg, msg
            assert "the cluster tokens differ" in msg and "--cluster-token" in msg, msg
            assert TOKEN not in msg, msg
    with TransferEngine(cluster_token=TOKEN) as peer:  # the instance still serves the cluster
        peer.connect(address, timeout_s=5)
        assert peer.connected(address)
    assert http_json(f"{instances['decode']}/health")["status"] == "ok"
    pair = ["--prefill", instances["prefill"], "--decode", instances["decode"]]
    assert main(["link", *pair, "--cluster-token", TOKEN]) == 0
