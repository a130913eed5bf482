"""KV transfer between two real processes over 127.0.0.1 (numpy arrays as KV memory): exact bytes
for layer-wise and whole-request pushes, and fast failure when the peer process dies."""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import time

import numpy as np
import pytest
from pdserve.transfer import (
    BLOCK_MAJOR,
    LAYER_MAJOR,
    CommDomain,
    Endpoint,
    KVLayout,
    TransferEngine,
)

NUM_LAYERS, NUM_BLOCKS, PIECE_FLOATS = 4, 64, 512  # 2 KiB pieces, 512 KiB per instance


def kv_array(layout: str, seed: int | None) -> np.ndarray:
    shape = (
        (NUM_LAYERS, NUM_BLOCKS, PIECE_FLOATS)
        if layout == LAYER_MAJOR
        else (NUM_BLOCKS, NUM_LAYERS, PIECE_FLOATS)
    )
    if seed is None:
        return np.zeros(shape, dtype=np.float32)
    return np.random.default_rng(seed).standard_normal(shape, dtype=np.float32)


def decode_process(pipe, layout: str) -> None:
    """D: expects the blocks P announces, returns its whole KV array when they landed."""
    with TransferEngine() as engine:
        kv = kv_array(layout, seed=None)
        engine.register_memory(kv)
        local = Endpoint.local(engine, KVLayout.from_tensor(kv, layout))
        pipe.send(local.to_dict())
        remote = Endpoint.from_dict(pipe.recv())
        domain = CommDomain(engine, local, remote).open()
        request_id, dst_block_ids = pipe.recv()
        domain.receiver.expect(request_id, len(dst_block_ids), timeout_s=30)
        pipe.send("ready")
        result = domain.receiver.wait(request_id, timeout_s=30)
        pipe.send((result.status, result.error, kv))
        pipe.recv()  # stay alive until the parent is done


def dying_sender_process(pipe) -> None:
    """P that connects, sends part of a request, then dies without closing anything."""
    engine = TransferEngine()
    buf = np.ones(1 << 20, dtype=np.uint8)
    engine.register_memory(buf)
    peer, remote_addr = pipe.recv()
    engine.connect(peer)
    pipe.send(engine.address)
    pipe.recv()
    engine.wait(engine.send(peer, "doomed", [(buf.ctypes.data, remote_addr, 4096)]), 10)
    os._exit(1)


def stopped_receiver_process(pipe) -> None:
    """D that expects a large request, then freezes (SIGSTOP) so the sender's batches stay pending."""
    engine = TransferEngine()
    buf = np.zeros(64 << 20, dtype=np.uint8)
    engine.register_memory(buf)
    engine.expect("frozen", buf.nbytes, timeout_s=60)
    pipe.send((engine.address, buf.ctypes.data))
    pipe.recv()
    os.kill(os.getpid(), signal.SIGSTOP)


@pytest.fixture
def spawn():
    ctx = mp.get_context("spawn")
    procs = []

    def start(target, *args):
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=target, args=(child, *args), daemon=True)
        proc.start()
        procs.append(proc)
        return proc, parent

    yield start
    for proc in procs:
        if proc.is_alive():
            proc.kill()
        proc.join(5)


@pytest.mark.parametrize(
    ("p_layout", "d_layout", "layer_wise"),
    [
        (LAYER_MAJOR, LAYER_MAJOR, True),
        (BLOCK_MAJOR, BLOCK_MAJOR, False),
        (LAYER_MAJOR, BLOCK_MAJOR, True),
    ],
)
def test_push_to_another_process(spawn, p_layout, d_layout, layer_wise):
    _, pipe = spawn(decode_process, d_layout)
    with TransferEngine() as engine:
        kv = kv_array(p_layout, seed=1)
        engine.register_memory(kv)
        local = Endpoint.local(engine, KVLayout.from_tensor(kv, p_layout))
        remote = Endpoint.from_dict(pipe.recv())
        pipe.send(local.to_dict())
        domain = CommDomain(engine, local, remote).open()
        src_ids, dst_ids = list(range(8, 40)), list(range(63, 31, -1))
        pipe.send(("req-1", dst_ids))
        assert pipe.recv() == "ready"
        if layer_wise:
            for layer_idx in range(NUM_LAYERS):
                domain.sender.push_layer("req-1", layer_idx, src_ids, dst_ids)
        else:
            domain.sender.push_request("req-1", src_ids, dst_ids)
        assert domain.sender.wait("req-1", 30).ok
        status, error, d_kv = pipe.recv()
        assert status == "done", error
        pipe.send("bye")
        stats = engine.stats()
        assert stats["bytes_sent"] == NUM_LAYERS * len(src_ids) * PIECE_FLOATS * 4
    for layer_idx in range(NUM_LAYERS):
        for s, d in zip(src_ids, dst_ids, strict=True):
            got = d_kv[layer_idx, d] if d_layout == LAYER_MAJOR else d_kv[d, layer_idx]
            want = kv[layer_idx, s] if p_layout == LAYER_MAJOR else kv[s, layer_idx]
            assert np.array_equal(got, want)
    untouched = sorted(set(range(NUM_BLOCKS)) - set(dst_ids))
    assert not (d_kv[:, untouched] if d_layout == LAYER_MAJOR else d_kv[untouched]).any()


def test_sender_process_death_fails_the_receive_fast(spawn):
    proc, pipe = spawn(dying_sender_process)
    with TransferEngine() as engine:
        buf = np.zeros(1 << 20, dtype=np.uint8)
        engine.register_memory(buf)
        pipe.send((engine.address, buf.ctypes.data))
        sender_address = pipe.recv()
        engine.expect("doomed", buf.nbytes, timeout_s=60, from_peer=sender_address)
        pipe.send("go")
        t0 = time.monotonic()
        result = engine.wait_recv("doomed", 20)
        assert result.status == "failed" and "disconnected" in result.error, result
        assert result.nbytes_received == 4096
        assert time.monotonic() - t0 < 5
    proc.join(5)


def test_receiver_process_death_fails_pending_sends_fast(spawn):
    proc, pipe = spawn(stopped_receiver_process)
    peer, remote_addr = pipe.recv()
    with TransferEngine() as engine:
        src = np.ones(64 << 20, dtype=np.uint8)
        engine.register_memory(src)
        engine.connect(peer)
        pipe.send("freeze")
        assert wait_stopped(proc.pid)
        tickets = [
            engine.send(
                peer,
                "frozen",
                [(src.ctypes.data + i * (16 << 20), remote_addr + i * (16 << 20), 16 << 20)],
            )
            for i in range(4)
        ]
        time.sleep(0.3)
        assert engine.poll(tickets[-1]).status == "pending"
        t0 = time.monotonic()
        os.kill(proc.pid, signal.SIGKILL)
        results = [engine.wait(t, 10) for t in tickets]
        assert all(r.finished for r in results)
        assert results[-1].status == "failed" and "lost" in results[-1].error
        assert time.monotonic() - t0 < 5


def wait_stopped(pid: int, timeout_s: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with open(f"/proc/{pid}/stat") as f:
            if f.read().split(") ")[1].startswith("T"):
                return True
        time.sleep(0.01)
    return False
