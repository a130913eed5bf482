"""The cuda_ipc transfer backend on a GPU: a sender in this process, a receiver in a spawned one (CUDA
IPC maps memory between processes), both on GPU 0 as a prefill and a decode instance sharing a GPU.

Checked: scattered pieces land byte for byte; the sender waits for the batch's ready event (the data
is written by a kernel queued behind a long sleep); a receive that was not expected is refused and the
ticket fails naming why; host memory is refused at send time with the reason; an abort at the receiver
fails the sender's next batch; two engines in one process (no IPC mapping possible) still copy.
"""

from __future__ import annotations

import multiprocessing
import traceback

import numpy as np
import pytest
import torch
from pdserve.transfer import TransferEngine

pytestmark = pytest.mark.gpu

NBYTES = 4 << 20


def _receiver(conn) -> None:
    """Child: a cuda_ipc engine over a zeroed GPU buffer, driven by (command, args) messages."""
    try:
        engine = TransferEngine("cuda_ipc")
        buf = torch.zeros(NBYTES, dtype=torch.uint8, device="cuda")
        engine.register_memory(buf)
        conn.send((engine.address, buf.data_ptr()))
        while True:
            cmd, *args = conn.recv()
            if cmd == "stop":
                break
            if cmd == "expect":
                engine.expect(*args)
                conn.send(None)
            elif cmd == "wait":
                r = engine.wait_recv(args[0], 30.0)
                conn.send((r.status, r.nbytes_received, r.error, buf.cpu().numpy()))
            elif cmd == "abort":
                engine.abort(args[0], "receiver gave up")
                conn.send(None)
        engine.close()
    except BaseException:  # noqa: BLE001 - reported to the test process
        conn.send(("error", traceback.format_exc()))


@pytest.fixture(scope="module")
def receiver():
    ctx = multiprocessing.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_receiver, args=(child,), daemon=True)
    proc.start()
    first = parent.recv()
    assert first[0] != "error", first[1]
    address, base = first
    sender = TransferEngine("cuda_ipc")
    src = torch.randint(0, 256, (NBYTES,), dtype=torch.uint8, device="cuda")
    sender.register_memory(src)
    sender.connect(address)
    try:
        yield {"conn": parent, "address": address, "base": base, "sender": sender, "src": src}
    finally:
        parent.send(("stop",))
        proc.join(30)
        sender.close()


def _call(conn, *msg):
    conn.send(msg)
    out = conn.recv()
    assert not (isinstance(out, tuple) and out and out[0] == "error"), out[1]
    return out


def _scattered_pieces(src_base: int, dst_base: int, seed: int) -> tuple[np.ndarray, int]:
    rng = np.random.default_rng(seed)
    slots = rng.permutation(NBYTES // 4096)[:300]  # 4 KiB slots, out of order
    pieces = []
    for i, s in enumerate(slots):
        n = int(rng.integers(1, 4097))
        pieces.append((src_base + int(s) * 4096, dst_base + i * 4096, n))
    arr = np.array(pieces, dtype=np.uint64)
    return arr, int(arr[:, 2].sum())


def test_scattered_pieces_land_exactly(receiver):
    conn, src, sender = receiver["conn"], receiver["src"], receiver["sender"]
    pieces, nbytes = _scattered_pieces(src.data_ptr(), receiver["base"], seed=1)
    _call(conn, "expect", "scatter", nbytes, 30.0)
    ticket = sender.send(receiver["address"], "scatter", pieces)
    res = sender.wait(ticket, 30.0)
    assert res.status == "done", res.error
    status, received, error, dst = _call(conn, "wait", "scatter")
    assert status == "done" and received == nbytes, error
    host = src.cpu().numpy()
    src0, dst0 = src.data_ptr(), receiver["base"]
    for s, d, n in pieces.tolist():
        assert np.array_equal(dst[d - dst0 : d - dst0 + n], host[s - src0 : s - src0 + n])


def test_sender_waits_for_the_ready_event(receiver):
    conn, src, sender = receiver["conn"], receiver["src"], receiver["sender"]
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        torch.cuda._sleep(200_000_000)  # ~0.1 s of GPU time before the write below
        src[: 1 << 20].fill_(77)
        event = torch.cuda.Event()
        event.record(stream)
    _call(conn, "expect", "ready", 1 << 20, 30.0)
    ticket = sender.send(
        receiver["address"],
        "ready",
        [(src.data_ptr(), receiver["base"], 1 << 20)],
        ready_event=event.cuda_event,
    )
    del event  # the engine waits through its own event: the caller's may go at once
    assert sender.wait(ticket, 30.0).status == "done"
    status, _, error, dst = _call(conn, "wait", "ready")
    assert status == "done", error
    assert (dst[: 1 << 20] == 77).all()  # without the wait the copy would see the old bytes


def test_abort_while_the_ready_event_is_pending(receiver):
    """The sender aborts while its batch still waits for the KV to be computed: abort returns once the
    wait ended, the ticket ends aborted, nothing is written at the receiver."""
    conn, src, sender = receiver["conn"], receiver["src"], receiver["sender"]
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        torch.cuda._sleep(400_000_000)  # ~0.2 s
        event = torch.cuda.Event()
        event.record(stream)
    _call(conn, "expect", "late", 4096, 30.0)
    ticket = sender.send(
        receiver["address"],
        "late",
        [(src.data_ptr(), receiver["base"], 4096)],
        ready_event=event.cuda_event,
    )
    sender.abort("late", "client went away")
    res = sender.wait(ticket, 30.0)
    assert res.status == "aborted", res
    status, received, _, _ = _call(conn, "wait", "late")
    assert status == "aborted" and received == 0


def test_unexpected_data_is_refused_and_the_ticket_says_why(receiver):
    sender = receiver["sender"]
    ticket = sender.send(
        receiver["address"], "nobody-expects", [(receiver["src"].data_ptr(), receiver["base"], 64)]
    )
    res = sender.wait(ticket, 30.0)
    assert res.status == "failed" and "refused" in res.error and "nobody-expects" in res.error


def test_host_memory_is_refused_with_the_reason(receiver):
    sender = receiver["sender"]
    host = np.ones(4096, dtype=np.uint8)
    sender.register_memory(host)
    _call(receiver["conn"], "expect", "host", 4096, 30.0)
    ticket = sender.send(receiver["address"], "host", [(host.ctypes.data, receiver["base"], 4096)])
    res = sender.wait(ticket, 30.0)
    assert res.status == "failed" and "not CUDA device memory" in res.error
    _call(receiver["conn"], "abort", "host")


def test_abort_at_the_receiver_fails_the_next_batch(receiver):
    conn, sender = receiver["conn"], receiver["sender"]
    _call(conn, "expect", "gone", 8192, 30.0)
    _call(conn, "abort", "gone")
    ticket = sender.send(
        receiver["address"], "gone", [(receiver["src"].data_ptr(), receiver["base"], 8192)]
    )
    res = sender.wait(ticket, 30.0)
    assert res.status in ("aborted", "failed"), res
    status, received, _, _ = _call(conn, "wait", "gone")
    assert status == "aborted" and received == 0


def test_many_messages_and_a_piece_larger_than_a_message():
    """1,100 pieces (three messages of at most 512) plus one 80 MiB piece (three 32 MiB messages)."""
    a, b = (TransferEngine("cuda_ipc", max_message_nbytes=32 << 20) for _ in range(2))
    try:
        big = 80 << 20
        src = torch.randint(0, 256, (big + (1100 << 12),), dtype=torch.uint8, device="cuda")
        dst = torch.zeros_like(src)
        a.register_memory(src)
        b.register_memory(dst)
        a.connect(b.address)
        s0, d0 = src.data_ptr(), dst.data_ptr()
        order = np.random.default_rng(3).permutation(1100)
        pieces = [
            (s0 + big + i * 4096, d0 + big + int(j) * 4096, 4096) for i, j in enumerate(order)
        ]
        pieces.append((s0, d0, big))
        b.expect("many", big + 1100 * 4096, 30.0)
        assert a.wait(a.send(b.address, "many", pieces), 30.0).status == "done"
        assert b.wait_recv("many", 30.0).status == "done"
        host_src, host_dst = src.cpu(), dst.cpu()
        assert torch.equal(host_dst[:big], host_src[:big])
        for s, d, n in pieces[:-1]:
            assert torch.equal(host_dst[d - d0 : d - d0 + n], host_src[s - s0 : s - s0 + n])
    finally:
        a.close()
        b.close()


@pytest.mark.parametrize("copy", ["kernel", "driver"])
def test_two_engines_in_one_process_copy_directly(copy, monkeypatch):
    """Same process (no IPC mapping possible): the receiver uses the sender's addresses. Runs of odd
    sizes and offsets check the copy kernel's vector body and byte tail; "driver" checks the
    fallback without pdserve._cuda (the driver's batch copy)."""
    from pdserve.transfer import engine as engine_module

    if copy == "driver":
        monkeypatch.setattr(engine_module, "_device_copy_fn", lambda: 0)
    a, b = TransferEngine("cuda_ipc"), TransferEngine("cuda_ipc")
    try:
        src = torch.randint(0, 256, (1 << 22,), dtype=torch.uint8, device="cuda")
        dst = torch.zeros_like(src)
        a.register_memory(src)
        b.register_memory(dst)
        a.connect(b.address)
        rng = np.random.default_rng(7)
        pieces, at = [], 0
        for n in [1, 15, 16, 17, 4096, 100_003, 1 << 20, 3]:
            off = int(rng.integers(0, 64))
            pieces.append((src.data_ptr() + off, dst.data_ptr() + at, n))
            at += n + int(rng.integers(0, 32))
        nbytes = sum(p[2] for p in pieces)
        b.expect("same", nbytes, 30.0)
        assert a.wait(a.send(b.address, "same", pieces), 30.0).status == "done"
        assert b.wait_recv("same", 30.0).status == "done"
        host_src, host_dst = src.cpu(), dst.cpu()
        s0, d0 = src.data_ptr(), dst.data_ptr()
        for s, d, n in pieces:
            assert torch.equal(host_dst[d - d0 : d - d0 + n], host_src[s - s0 : s - s0 + n]), n
    finally:
        a.close()
        b.close()
