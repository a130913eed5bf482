"""The transfer engine's public API over real TCP on 127.0.0.1, two engines in one process:
bytes land exactly, refusals are reported, counters count, asyncio waits resolve."""

from __future__ import annotations

import ast
import asyncio
import pathlib
import threading
import time

import numpy as np
import pytest
from pdserve import _transfer
from pdserve.transfer import TransferEngine, TransferError


@pytest.fixture
def pair():
    sender, receiver = TransferEngine(), TransferEngine()
    src = np.random.default_rng(0).integers(0, 256, 4 << 20, dtype=np.uint8)
    dst = np.zeros(4 << 20, dtype=np.uint8)
    sender.register_memory(src)
    receiver.register_memory(dst)
    sender.connect(receiver.address)
    yield sender, receiver, src, dst
    sender.close()
    receiver.close()


def addr(a: np.ndarray, offset: int = 0) -> int:
    return a.ctypes.data + offset


def test_one_piece_lands_exactly(pair):
    sender, receiver, src, dst = pair
    receiver.expect("r1", 1 << 20, timeout_s=10)
    ticket = sender.send(receiver.address, "r1", [(addr(src), addr(dst, 4096), 1 << 20)])
    result = sender.wait(ticket, timeout_s=10)
    assert result.ok and result.nbytes == 1 << 20, result
    recv = receiver.wait_recv("r1", timeout_s=10)
    assert recv.ok and recv.nbytes_received == 1 << 20
    assert np.array_equal(dst[4096 : 4096 + (1 << 20)], src[: 1 << 20])
    assert not dst[:4096].any() and not dst[4096 + (1 << 20) :].any()


def test_many_small_pieces_in_one_batch_land_exactly(pair):
    sender, receiver, src, dst = pair
    rng = np.random.default_rng(1)
    n, size = 3000, 256  # more pieces than one wire message holds
    src_offsets = rng.permutation(len(src) // size)[:n] * size
    dst_offsets = rng.permutation(len(dst) // size)[:n] * size
    pieces = np.stack(
        [addr(src) + src_offsets, addr(dst) + dst_offsets, np.full(n, size)], axis=1
    ).astype(np.uint64)
    receiver.expect("small", n * size, timeout_s=10)
    assert sender.wait(sender.send(receiver.address, "small", pieces), 10).ok
    assert receiver.wait_recv("small", 10).ok
    for s, d in zip(src_offsets[:200], dst_offsets[:200], strict=True):
        assert np.array_equal(dst[d : d + size], src[s : s + size])


def test_large_transfer_spans_many_messages():
    with TransferEngine(max_message_nbytes=256 << 10) as a, TransferEngine() as b:
        src = np.random.default_rng(2).integers(0, 256, 64 << 20, dtype=np.uint8)
        dst = np.zeros_like(src)
        a.register_memory(src)
        b.register_memory(dst)
        a.connect(b.address)
        b.expect("big", src.nbytes, timeout_s=30)
        assert a.wait(a.send(b.address, "big", [(addr(src), addr(dst), src.nbytes)]), 30).ok
        assert b.wait_recv("big", 30).ok
        assert np.array_equal(src, dst)


def test_many_concurrent_requests(pair):
    sender, receiver, src, dst = pair
    num_requests, size = 64, 16 << 10
    for i in range(num_requests):
        receiver.expect(f"c{i}", 2 * size, timeout_s=20)
    tickets = []
    for i in range(num_requests):  # two batches per request, interleaved across requests
        for half in range(2):
            off = (2 * i + half) * size
            tickets.append(
                sender.send(receiver.address, f"c{i}", [(addr(src, off), addr(dst, off), size)])
            )
    assert all(sender.wait(t, 20).ok for t in tickets)
    assert all(receiver.wait_recv(f"c{i}", 20).ok for i in range(num_requests))
    n = num_requests * 2 * size
    assert np.array_equal(dst[:n], src[:n])


def test_unexpected_request_is_refused_and_nothing_written(pair):
    sender, receiver, src, dst = pair
    result = sender.wait(
        sender.send(receiver.address, "nobody", [(addr(src), addr(dst), 1024)]), 10
    )
    assert result.status == "failed" and "not expected" in result.error
    assert not dst.any()
    assert receiver.stats()["bytes_rejected"] == 1024


def test_out_of_range_write_is_refused_and_fails_the_receive(pair):
    sender, receiver, src, dst = pair
    receiver.expect("oob", 2048, timeout_s=10)
    past_end = addr(dst, dst.nbytes - 1024)  # the last 1024 B are inside, the next 1024 B are not
    result = sender.wait(sender.send(receiver.address, "oob", [(addr(src), past_end, 2048)]), 10)
    assert result.status == "failed" and "not inside memory registered" in result.error
    recv = receiver.wait_recv("oob", 10)
    assert recv.status == "failed" and "not inside" in recv.error
    assert not dst.any()


def test_overflowing_the_expected_bytes_is_refused(pair):
    sender, receiver, src, dst = pair
    receiver.expect("over", 1000, timeout_s=10)
    result = sender.wait(sender.send(receiver.address, "over", [(addr(src), addr(dst), 1001)]), 10)
    assert result.status == "failed" and "overflow" in result.error
    assert receiver.wait_recv("over", 10).status == "failed"
    assert not dst.any()


def test_sender_checks_its_local_ranges(pair):
    sender, receiver, src, dst = pair
    with pytest.raises(ValueError, match="not inside registered memory"):
        sender.send(receiver.address, "x", [(addr(src, src.nbytes - 8), addr(dst), 16)])
    with pytest.raises(ValueError, match="shape"):
        sender.send(receiver.address, "x", [(1, 2)])
    with pytest.raises(ValueError, match="not connected"):
        sender.send("127.0.0.1:1", "x", [(addr(src), addr(dst), 16)])
    with pytest.raises(ValueError, match="stream"):
        sender.send(receiver.address, "x", [(addr(src), addr(dst), 16)], stream=1)
    with pytest.raises(ValueError, match="longer than 1024"):
        receiver.expect("x" * 1025, 16, timeout_s=1)
    with pytest.raises(ValueError, match="nbytes must be > 0"):
        receiver.expect("x", 0, timeout_s=1)


def test_register_rejects_overlap_and_device_memory():
    with TransferEngine() as e:
        buf = np.zeros(4096, dtype=np.uint8)
        e.register_memory(buf)
        with pytest.raises(ValueError, match="overlaps"):
            e.register_memory(addr(buf, 100), 10)
        with pytest.raises(ValueError, match="host memory only"):
            e.register_memory(addr(buf) + 8192, 10, device=0)


def _gpu_visible() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


@pytest.mark.skipif(
    _gpu_visible(), reason="checks the error where no GPU is (GPU: test_transfer_ipc_gpu)"
)
def test_cuda_ipc_without_a_gpu_says_why():
    with pytest.raises(TransferError, match="cuda_ipc backend needs"):
        TransferEngine("cuda_ipc")
    with pytest.raises(ValueError, match="available: tcp, cuda_ipc"):
        TransferEngine("infiniband")


def test_connect_to_nothing_raises_transfer_error():
    with TransferEngine() as e, TransferEngine() as gone:
        dead = gone.address
        gone.close()
        with pytest.raises(TransferError, match="connect"):
            e.connect(dead, timeout_s=2)


def _moves_bytes(sender: TransferEngine, receiver: TransferEngine, request_id: str) -> bool:
    """Connects sender to receiver and pushes 4 KiB under request_id; whether it all landed."""
    src = np.random.default_rng(3).integers(0, 256, 4096, dtype=np.uint8)
    dst = np.zeros_like(src)
    sender.register_memory(src)
    receiver.register_memory(dst)
    sender.connect(receiver.address, timeout_s=5)
    receiver.expect(request_id, src.nbytes, timeout_s=10)
    ticket = sender.send(receiver.address, request_id, [(addr(src), addr(dst), 4096)])
    sent = sender.wait(ticket, timeout_s=10)
    return sent.ok and receiver.wait_recv(request_id, 10).ok and np.array_equal(src, dst)


def test_same_cluster_token_connects_and_moves_bytes():
    with (
        TransferEngine(cluster_token="tok-a") as sender,
        TransferEngine(cluster_token="tok-a") as receiver,
    ):
        assert _moves_bytes(sender, receiver, "same-token")


def test_wrong_or_missing_cluster_token_is_refused_and_the_receiver_keeps_serving():
    with (
        TransferEngine(cluster_token="tok-a") as receiver,
        TransferEngine(cluster_token="tok-b") as wrong,
        TransferEngine() as none,
        TransferEngine(cluster_token="tok-a") as right,
    ):
        for sender, side in ((wrong, "this engine's token is not the peer's"), (none, "has none")):
            with pytest.raises(TransferError) as info:
                sender.connect(receiver.address, timeout_s=5)
            msg = str(info.value)
            assert f"peer {receiver.address} refused the connection" in msg, msg
            assert "the cluster tokens differ" in msg and side in msg, msg
            assert "--cluster-token" in msg and "PDSERVE_CLUSTER_TOKEN" in msg, msg
            assert "tok-" not in msg, msg  # neither token is echoed
            assert not sender.connected(receiver.address)
        assert _moves_bytes(right, receiver, "after-refusals")


def test_receiver_without_cluster_token_accepts_a_sender_with_one():
    with TransferEngine(cluster_token="tok-a") as sender, TransferEngine() as receiver:
        assert _moves_bytes(sender, receiver, "open-receiver")


def test_cluster_token_longer_than_the_handshake_allows_is_refused():
    with pytest.raises(ValueError, match="cluster_token is 1025 bytes long.*at most 1024"):
        TransferEngine(cluster_token="x" * 1025)


def test_stats_count_bytes_per_peer(pair):
    sender, receiver, src, dst = pair
    receiver.expect("s", 5000, timeout_s=10)
    assert sender.wait(sender.send(receiver.address, "s", [(addr(src), addr(dst), 5000)]), 10).ok
    assert receiver.wait_recv("s", 10).ok
    s, r = sender.stats(), receiver.stats()
    assert s["bytes_sent"] == 5000 and s["tickets_done"] == 1
    assert s["peers"][receiver.address]["bytes_sent"] == 5000
    assert r["bytes_received"] == 5000 and r["peers"][sender.address]["bytes_received"] == 5000
    assert r["recvs_done"] == 1 and r["num_pending_recvs"] == 0 and s["num_pending_tickets"] == 0


def test_asyncio_waits_resolve_without_threads(pair):
    sender, receiver, src, dst = pair

    async def main():
        receiver.expect("a", 1 << 16, timeout_s=10)
        recv_task = asyncio.ensure_future(receiver.wait_recv_async("a"))
        ticket = sender.send(receiver.address, "a", [(addr(src), addr(dst), 1 << 16)])
        sent = await asyncio.wait_for(sender.wait_async(ticket), 10)
        got = await asyncio.wait_for(recv_task, 10)
        # Already finished: resolves from poll at once.
        again = await asyncio.wait_for(sender.wait_async(ticket), 10)
        return sent, got, again

    sent, got, again = asyncio.run(main())
    assert sent.ok and got.ok and again.ok
    assert np.array_equal(dst[: 1 << 16], src[: 1 << 16])


def test_blocking_calls_release_the_gil(pair):
    _, receiver, _, _ = pair
    receiver.expect("gil", 10, timeout_s=0)
    waiter = threading.Thread(target=receiver.wait_recv, args=("gil", 0.5))
    waiter.start()
    time.sleep(0.05)  # the waiter is inside wait_recv now
    count, t0 = 0, time.monotonic()
    while time.monotonic() - t0 < 0.2:
        count += 1
    waiter.join()
    assert count > 10_000  # this thread ran Python while the other one waited


def test_a_long_batch_does_not_hold_up_another_request():
    with TransferEngine(max_message_nbytes=256 << 10) as a, TransferEngine() as b:
        src = np.full(128 << 20, 3, dtype=np.uint8)
        dst = np.zeros_like(src)
        a.register_memory(src)
        b.register_memory(dst)
        a.connect(b.address)
        b.expect("whole", 64 << 20, timeout_s=30)
        b.expect("layer", 4096, timeout_s=30)
        t_big = time.perf_counter()
        big = a.send(b.address, "whole", [(addr(src), addr(dst), 64 << 20)])
        t_small = time.perf_counter()
        small = a.send(b.address, "layer", [(addr(src, 64 << 20), addr(dst, 64 << 20), 4096)])
        small_result, big_result = a.wait(small, 10), a.wait(big, 30)
        assert small_result.ok and big_result.ok and b.wait_recv("whole", 10).ok
        # Settle times on the engine's clock: "layer" went out after a few of the 256 messages of
        # "whole" instead of after all of them.
        assert t_small + small_result.seconds < t_big + big_result.seconds
        assert np.array_equal(dst[: (64 << 20) + 4096], src[: (64 << 20) + 4096])


def test_stub_matches_the_native_module():
    stub = pathlib.Path(__file__).parents[1] / "python" / "pdserve" / "_transfer.pyi"
    for node in ast.parse(stub.read_text()).body:
        if isinstance(node, ast.ClassDef):
            native = getattr(_transfer, node.name)
            for item in node.body:
                name = getattr(item, "name", None) or getattr(
                    getattr(item, "target", None), "id", None
                )
                if name and not name.startswith("__"):
                    assert hasattr(native, name), f"{node.name}.{name} is in the stub only"
