"""KV layout arithmetic and KV pushes between two engines in one process, with torch CPU tensors
as the KV memory: layer-wise and whole-request, both layouts (also mixed), exact bytes."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
import torch
from pdserve.transfer import (
    BLOCK_MAJOR,
    LAYER_MAJOR,
    CommDomain,
    Endpoint,
    KVLayout,
    KVReceiver,
    KVSender,
    TransferEngine,
    build_pieces,
    merge_pieces,
    request_pieces,
)

NUM_LAYERS, NUM_BLOCKS, BLOCK_SIZE, NUM_HEADS, HEAD_DIM = 4, 32, 4, 2, 8


def make_kv(layout: str, fill: bool, seed: int = 0) -> torch.Tensor:
    inner = (2, BLOCK_SIZE, NUM_HEADS, HEAD_DIM)
    shape = (
        (NUM_LAYERS, NUM_BLOCKS, *inner)
        if layout == LAYER_MAJOR
        else (NUM_BLOCKS, NUM_LAYERS, *inner)
    )
    if not fill:
        return torch.zeros(shape, dtype=torch.float32)
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def block(kv: torch.Tensor, layout: str, layer_idx: int, block_id: int) -> torch.Tensor:
    return kv[layer_idx, block_id] if layout == LAYER_MAJOR else kv[block_id, layer_idx]


@pytest.mark.parametrize("layout", [LAYER_MAJOR, BLOCK_MAJOR])
def test_layout_addresses_match_the_tensor(layout):
    kv = make_kv(layout, fill=False)
    lay = KVLayout.from_tensor(kv, layout)
    assert lay.piece_nbytes == 2 * BLOCK_SIZE * NUM_HEADS * HEAD_DIM * 4
    assert lay.nbytes == kv.numel() * 4
    for layer_idx, block_id in [(0, 0), (1, 5), (3, 31)]:
        assert (
            lay.piece_addr(layer_idx, block_id) == block(kv, layout, layer_idx, block_id).data_ptr()
        )
    assert KVLayout.from_dict(lay.to_dict()) == lay


def test_layout_rejects_inconsistent_values():
    with pytest.raises(ValueError, match="past nbytes"):
        KVLayout(4096, 100, 2, 2, 64, 128, 64)
    with pytest.raises(ValueError, match="num_layers"):
        KVLayout(4096, 100, 0, 2, 64, 128, 64)


def test_block_major_whole_request_merges_into_runs():
    src = KVLayout.block_major(1 << 20, NUM_LAYERS, NUM_BLOCKS, 256)
    dst = KVLayout.block_major(1 << 30, NUM_LAYERS, NUM_BLOCKS, 256)
    pieces = request_pieces(src, dst, [3, 4, 5, 9], [10, 11, 12, 0])
    # blocks 3..5 -> 10..12 are one run of 3 blocks x all layers; 9 -> 0 is another
    assert pieces.tolist() == [
        [src.piece_addr(0, 3), dst.piece_addr(0, 10), 3 * NUM_LAYERS * 256],
        [src.piece_addr(0, 9), dst.piece_addr(0, 0), NUM_LAYERS * 256],
    ]


def test_layer_major_layer_pieces_merge_consecutive_blocks():
    src = KVLayout.layer_major(1 << 20, NUM_LAYERS, NUM_BLOCKS, 256)
    dst = KVLayout.layer_major(1 << 30, NUM_LAYERS, NUM_BLOCKS, 256)
    pieces = build_pieces(src, dst, [1, 2, 7], [4, 5, 6], [2])
    assert pieces.tolist() == [
        [src.piece_addr(2, 1), dst.piece_addr(2, 4), 512],
        [src.piece_addr(2, 7), dst.piece_addr(2, 6), 256],
    ]


def test_merge_preserves_the_byte_mapping():
    rng = np.random.default_rng(0)
    for _ in range(50):
        n = int(rng.integers(1, 40))
        starts = rng.permutation(64)[:n] * 8  # disjoint 8-byte source slots
        dests = rng.integers(0, 64, n) * 8
        pieces = np.stack([starts, dests, np.full(n, 8)], axis=1).astype(np.uint64)
        same = rng.random(n) < 0.5
        pieces[same, 1] = pieces[same, 0]  # identity offsets: adjacent sources form runs

        def mapping(p):
            return {int(s) + k: int(d) + k for s, d, m in p for k in range(int(m))}

        merged = merge_pieces(pieces)
        assert mapping(merged) == mapping(pieces)
        assert len(merged) <= len(pieces)


def test_build_pieces_checks_ids_and_compatibility():
    a = KVLayout.layer_major(4096, NUM_LAYERS, NUM_BLOCKS, 256)
    with pytest.raises(ValueError, match="outside"):
        build_pieces(a, a, [NUM_BLOCKS], [0], [0])
    with pytest.raises(ValueError, match="source blocks"):
        build_pieces(a, a, [1, 2], [0], [0])
    with pytest.raises(ValueError, match="layouts differ"):
        build_pieces(a, KVLayout.layer_major(4096, NUM_LAYERS, NUM_BLOCKS, 128), [1], [0], [0])
    assert build_pieces(a, a, [], [], [0]).shape == (0, 3)


@pytest.fixture
def engines():
    p, d = TransferEngine(), TransferEngine()
    yield p, d
    p.close()
    d.close()


def link(p_engine, d_engine, p_kv, d_kv, p_layout, d_layout):
    p_lay, d_lay = KVLayout.from_tensor(p_kv, p_layout), KVLayout.from_tensor(d_kv, d_layout)
    p_engine.register_memory(p_kv)
    d_engine.register_memory(d_kv)
    p_ep, d_ep = Endpoint.local(p_engine, p_lay), Endpoint.local(d_engine, d_lay)
    # The endpoints travel as JSON between the instances.
    p_side = CommDomain(p_engine, p_ep, Endpoint.from_dict(d_ep.to_dict())).open()
    d_side = CommDomain(d_engine, d_ep, Endpoint.from_dict(p_ep.to_dict())).open()
    return p_side, d_side


@pytest.mark.parametrize("p_layout", [LAYER_MAJOR, BLOCK_MAJOR])
@pytest.mark.parametrize("d_layout", [LAYER_MAJOR, BLOCK_MAJOR])
@pytest.mark.parametrize("layer_wise", [True, False])
def test_push_lands_exactly(engines, p_layout, d_layout, layer_wise):
    p_kv, d_kv = make_kv(p_layout, fill=True), make_kv(d_layout, fill=False)
    p_side, d_side = link(*engines, p_kv, d_kv, p_layout, d_layout)
    src_ids, dst_ids = [2, 3, 4, 10, 30], [7, 8, 9, 0, 1]
    assert d_side.receiver.expect("req", len(dst_ids), timeout_s=20) == (
        NUM_LAYERS * len(dst_ids) * p_kv[0, 0].numel() * 4
    )
    if layer_wise:
        for layer_idx in range(NUM_LAYERS):
            assert p_side.sender.push_layer("req", layer_idx, src_ids, dst_ids) is not None
    else:
        p_side.sender.push_request("req", src_ids, dst_ids)
    assert p_side.sender.wait("req", timeout_s=20).ok
    recv = d_side.receiver.wait("req", timeout_s=20)
    assert recv.ok and recv.nbytes_received == recv.nbytes_expected
    for layer_idx in range(NUM_LAYERS):
        for s, d in zip(src_ids, dst_ids, strict=True):
            assert torch.equal(
                block(d_kv, d_layout, layer_idx, d), block(p_kv, p_layout, layer_idx, s)
            )
        for d in set(range(NUM_BLOCKS)) - set(dst_ids):
            assert not block(d_kv, d_layout, layer_idx, d).any()


def test_dcache_back_transfer_uses_the_same_domain(engines):
    p_kv, d_kv = make_kv(LAYER_MAJOR, fill=False), make_kv(LAYER_MAJOR, fill=True, seed=3)
    p_side, d_side = link(*engines, p_kv, d_kv, LAYER_MAJOR, LAYER_MAJOR)
    p_side.receiver.expect("turn1", 2, timeout_s=20)
    d_side.sender.push_request("turn1", [5, 6], [20, 21])
    assert d_side.sender.wait("turn1", 20).ok and p_side.receiver.wait("turn1", 20).ok
    assert torch.equal(p_kv[:, 20:22], d_kv[:, 5:7])


def test_nothing_to_send_completes_at_once(engines):
    p_kv, d_kv = make_kv(LAYER_MAJOR, fill=True), make_kv(LAYER_MAJOR, fill=False)
    p_side, d_side = link(*engines, p_kv, d_kv, LAYER_MAJOR, LAYER_MAJOR)
    assert d_side.receiver.expect("cached", 0, timeout_s=5) == 0
    assert p_side.sender.push_layer("cached", 0, [], []) is None
    assert p_side.sender.wait("cached").ok and d_side.receiver.wait("cached").ok


def test_receiver_only_accepts_its_peer(engines):
    p, d = engines
    p_kv, d_kv = make_kv(LAYER_MAJOR, fill=True), make_kv(LAYER_MAJOR, fill=False)
    _, d_side = link(p, d, p_kv, d_kv, LAYER_MAJOR, LAYER_MAJOR)
    with TransferEngine() as stranger:
        other = make_kv(LAYER_MAJOR, fill=True)
        stranger.register_memory(other)
        stranger.connect(d.address)
        d_side.receiver.expect("mine", 1, timeout_s=10)
        sender = KVSender(stranger, d.address, KVLayout.from_tensor(other), d_side.local.layout)
        sender.push_request("mine", [0], [0])
        result = sender.wait("mine", 10)
        assert result.status == "failed" and "accepts data only from" in result.error
    assert not d_kv.any()
    assert d_side.receiver.wait("mine", 0.01).status == "pending"


def test_kv_receiver_without_domain(engines):
    p, d = engines
    p_kv, d_kv = make_kv(BLOCK_MAJOR, fill=True), make_kv(BLOCK_MAJOR, fill=False)
    p.register_memory(p_kv)
    d.register_memory(d_kv)
    p.connect(d.address)
    recv = KVReceiver(d, KVLayout.from_tensor(d_kv, BLOCK_MAJOR))
    recv.expect("x", 3, timeout_s=10)
    send = KVSender(p, d.address, KVLayout.from_tensor(p_kv, BLOCK_MAJOR), recv.layout)
    send.push_request("x", [0, 1, 2], [3, 4, 5])
    assert send.wait("x", 10).ok and recv.wait("x", 10).ok
    assert torch.equal(d_kv[3:6], p_kv[0:3])


def test_asyncio_layer_wise_push_with_an_abort(engines):
    p_kv, d_kv = make_kv(LAYER_MAJOR, fill=True), make_kv(BLOCK_MAJOR, fill=False)
    p_side, d_side = link(*engines, p_kv, d_kv, LAYER_MAJOR, BLOCK_MAJOR)

    async def main():
        ids = [f"r{i}" for i in range(8)]
        for rid in ids:
            d_side.receiver.expect(rid, 2, timeout_s=20)
        receives = [asyncio.ensure_future(d_side.receiver.wait_async(rid)) for rid in ids]
        d_side.receiver.abort("r3", "client disconnected")
        for layer_idx in range(NUM_LAYERS):  # as the layer hook would, request by request
            for i, rid in enumerate(ids):
                p_side.sender.push_layer(rid, layer_idx, [2 * i, 2 * i + 1], [2 * i, 2 * i + 1])
        sends = await asyncio.gather(*(p_side.sender.wait_async(rid) for rid in ids))
        return sends, await asyncio.gather(*receives)

    sends, recvs = asyncio.run(asyncio.wait_for(main(), 30))
    for i, (sent, got) in enumerate(zip(sends, recvs, strict=True)):
        if i == 3:
            assert sent.status in ("aborted", "failed") and got.status == "aborted"
            assert not d_kv[6:8].any()
        else:
            assert sent.ok and got.ok, (sent, got)
            assert torch.equal(d_kv[2 * i : 2 * i + 2].transpose(0, 1), p_kv[:, 2 * i : 2 * i + 2])


def test_sender_wait_tracks_pushes_made_after_an_earlier_wait(engines):
    p_kv, d_kv = make_kv(LAYER_MAJOR, fill=True), make_kv(LAYER_MAJOR, fill=False)
    p_side, d_side = link(*engines, p_kv, d_kv, LAYER_MAJOR, LAYER_MAJOR)
    d_side.receiver.expect("twice", 1, timeout_s=20)
    p_side.sender.push_layer("twice", 0, [1], [1])
    first = p_side.sender.wait("twice", 10)
    assert first.ok and first.nbytes == p_kv[0, 0].numel() * 4
    for layer_idx in range(1, NUM_LAYERS):
        p_side.sender.push_layer("twice", layer_idx, [1], [1])
    rest = p_side.sender.wait("twice", 10)
    assert rest.ok and rest.nbytes == (NUM_LAYERS - 1) * first.nbytes
    assert d_side.receiver.wait("twice", 10).ok
    assert torch.equal(d_kv[:, 1], p_kv[:, 1])
    with pytest.raises(ValueError, match="num_blocks"):
        d_side.receiver.expect("neg", -1, timeout_s=1)
