"""--enable-direct end to end on one GPU: prefill and decode instances in separate processes on GPU 0,
the KV moving straight between their KV caches through the cuda_ipc transfer backend (no host staging).

One module-wide set of processes: a colocated instance (the reference), cluster L (layer-wise, radix
caching, dcache back-transfer) and cluster W (whole-request, block-major blocks, no caching), all with
--enable-direct. Greedy outputs must equal the colocated instance's; bytes sent must match what D lacks;
after every test nothing stays reserved, pinned or in flight.
"""

from __future__ import annotations

import time

import pytest
from cluster_checks import settle_and_check
from pdserve.server.launcher import ProcessGroup, free_port, http_json
from test_cluster_disagg import (
    BS,
    PROMPTS,
    _start_cluster,
    _wait_linked,
    check_first_token_kv_kept_on_decode,
    check_greedy_like_colocated,
    complete,
    stats,
)

pytestmark = pytest.mark.gpu

GPU_COMMON = [
    "--model",
    "tiny",
    "--device",
    "cuda",
    "--gpu-memory-utilization",
    "0.12",  # five instances share the GPU
    "--block-size",
    str(BS),
    "--heartbeat-interval",
    "0.3",
]


@pytest.fixture(scope="module")
def cluster():
    group = ProcessGroup()
    try:
        cp = free_port()
        colo = group.start("colo", ["serve", "--port", str(cp), "--scheduler", "none", *GPU_COMMON])
        direct = ["--enable-direct"]
        lay, lay_sched = _start_cluster(
            group,
            "layer",
            [*direct, "--enable-layer", "--enable-radix-caching", "--enable-dcache"],
            GPU_COMMON,
        )
        whole, whole_sched = _start_cluster(
            group, "whole", [*direct, "--use-agg-block"], GPU_COMMON
        )
        colo_url = f"http://127.0.0.1:{cp}"
        group.wait_healthy(colo, colo_url, timeout=180)
        _wait_linked(group, lay_sched, lay.url, timeout=180)
        _wait_linked(group, whole_sched, whole.url, timeout=180)
        yield {"colo": colo_url, "layer": lay, "whole": whole}
    finally:
        group.close()


@pytest.fixture(autouse=True)
def _invariants_after_each_test(cluster):
    yield
    settle_and_check([cluster["colo"], *cluster["layer"].instances, *cluster["whole"].instances])


def test_instances_use_the_cuda_ipc_backend_without_staging(cluster):
    for name in ("layer", "whole"):
        for url in cluster[name].instances:
            info = http_json(f"{url}/internal/v1/info")
            assert info["transfer"]["backend"] == "cuda_ipc", (name, url)
            assert info["transfer"]["layout"]["device"].startswith("cuda")
            assert stats(url)["num_staging_slots"] == 0


def test_greedy_outputs_identical_to_colocated(cluster):
    for prompt in PROMPTS:
        check_greedy_like_colocated(cluster, prompt)


def test_bytes_sent_are_the_blocks_decode_lacks(cluster):
    lay = cluster["layer"]
    info = http_json(f"{lay.prefill}/internal/v1/info")["layout"]
    block_nbytes = info["num_layers"] * info["piece_nbytes"]
    prompt = [(i * 13 + 1) % 250 for i in range(70)]  # 4 whole blocks + 6 tokens
    sent0 = stats(lay.prefill)["kv_bytes_sent"]
    first = complete(lay.url, prompt, max_tokens=8)["choices"][0]["token_ids"]
    settle_and_check(lay.instances)
    sent1 = stats(lay.prefill)["kv_bytes_sent"]
    assert sent1 - sent0 == 5 * block_nbytes
    again = complete(lay.url, prompt, max_tokens=8)["choices"][0]["token_ids"]
    settle_and_check(lay.instances)
    assert stats(lay.prefill)["kv_bytes_sent"] - sent1 == 1 * block_nbytes and again == first
    received = stats(lay.decode)["kv_bytes_received"]
    assert received >= 6 * block_nbytes


def test_second_turn_hits_the_blocks_decode_sent_back(cluster):
    lay = cluster["layer"]
    turn1 = [(i * 11 + 3) % 250 for i in range(45)]
    out1 = complete(lay.url, turn1, max_tokens=20)["choices"][0]["token_ids"]
    time.sleep(0.1)
    settle_and_check(lay.instances)
    turn2 = turn1 + out1 + [(i * 7 + 5) % 250 for i in range(30)]
    before = stats(lay.prefill)["num_prefill_computed_tokens"]
    resp = complete(lay.url, turn2, max_tokens=4)
    num_back = (len(turn1) + len(out1) - 1) // BS * BS
    assert stats(lay.prefill)["num_prefill_computed_tokens"] - before == len(turn2) - num_back
    assert (
        resp["choices"][0]["token_ids"]
        == complete(cluster["colo"], turn2, max_tokens=4)["choices"][0]["token_ids"]
    )


def test_kv_of_a_request_ending_at_its_first_token_stays_on_decode(cluster):
    check_first_token_kv_kept_on_decode(cluster["layer"], cluster["colo"])
