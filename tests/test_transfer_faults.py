"""Failure paths of the transfer engine in one process: expect deadlines, aborts on either side,
send deadlines against a peer that stops reading, closed engines. Nothing may hang or write late."""

from __future__ import annotations

import socket
import struct
import threading
import time

import numpy as np
import pytest
from pdserve.transfer import TransferEngine

HEADER = struct.Struct("<IBBHIIQQ")  # the 32-byte wire header (tcp_wire.h)
MAGIC, HELLO_ACK = 0x46544450, 2


@pytest.fixture
def pair():
    sender, receiver = TransferEngine(max_message_nbytes=1 << 20), TransferEngine()
    src = np.full(64 << 20, 7, dtype=np.uint8)
    dst = np.zeros(64 << 20, dtype=np.uint8)
    sender.register_memory(src)
    receiver.register_memory(dst)
    sender.connect(receiver.address)
    yield sender, receiver, src, dst
    sender.close()
    receiver.close()


def whole(src, dst, nbytes=None):
    return [(src.ctypes.data, dst.ctypes.data, nbytes or src.nbytes)]


def wait_until(predicate, timeout_s=5.0):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.01)
    return False


def test_expect_deadline_fires_and_late_data_is_refused(pair):
    sender, receiver, src, dst = pair
    receiver.expect("late", 1000, timeout_s=0.2)
    t0 = time.monotonic()
    result = receiver.wait_recv("late", timeout_s=5)
    assert result.status == "timed_out" and "received 0 B" in result.error
    assert 0.15 < time.monotonic() - t0 < 2
    # The receiver told the sender: new pushes of the request fail at once, without any traffic.
    assert wait_until(lambda: (sender.poll_recv("late") or result).status == "aborted")
    rejected = receiver.stats()["bytes_rejected"]
    sent = sender.wait(sender.send(receiver.address, "late", whole(src, dst, 1000)), 10)
    assert sent.status == "aborted" and "receive timed out" in sent.error, sent
    assert receiver.stats()["bytes_rejected"] == rejected
    assert not dst.any()
    assert receiver.stats()["recvs_timed_out"] == 1


def test_wait_with_timeout_returns_pending(pair):
    _, receiver, _, _ = pair
    receiver.expect("slow", 10, timeout_s=0)
    assert receiver.wait_recv("slow", timeout_s=0.05).status == "pending"
    with pytest.raises(ValueError, match="already pending"):
        receiver.expect("slow", 10, timeout_s=0)
    with pytest.raises(ValueError, match="not expected"):
        receiver.wait_recv("never")


def test_receiver_abort_releases_and_tells_the_sender(pair):
    sender, receiver, src, dst = pair
    receiver.expect("ab", src.nbytes, timeout_s=30)
    ticket = sender.send(receiver.address, "ab", whole(src, dst))
    receiver.abort("ab", "client went away")
    # abort() returned: no write for "ab" may land any more.
    snapshot = dst.copy()
    result = sender.wait(ticket, 10)
    assert result.status in ("done", "aborted", "failed"), result
    if result.status != "done":
        assert "client went away" in result.error or "aborted" in result.error
    time.sleep(0.1)
    assert np.array_equal(dst, snapshot)
    recv = receiver.wait_recv("ab", 1)
    assert recv.status == "aborted" and recv.error == "client went away"


def test_sender_abort_stops_the_transfer_and_the_receive(pair):
    sender, receiver, src, dst = pair
    receiver.expect("sab", src.nbytes, timeout_s=30)
    ticket = sender.send(receiver.address, "sab", whole(src, dst))
    sender.abort("sab", "prefill cancelled")
    result = sender.wait(ticket, 10)
    assert result.status in ("aborted", "done")
    recv = receiver.wait_recv("sab", 10)
    if result.status == "aborted":
        assert recv.status == "aborted" and "prefill cancelled" in recv.error
    after = receiver.poll_recv("sab")
    time.sleep(0.1)
    assert receiver.poll_recv("sab") == after


def test_abort_before_expect_makes_the_expect_start_aborted(pair):
    sender, receiver, _, _ = pair
    sender.abort("early", "scheduler gave up")
    assert wait_until(lambda: receiver.poll_recv("early") is not None)
    receiver.expect("early", 100, timeout_s=10)
    result = receiver.wait_recv("early", 1)
    assert result.status == "aborted" and "scheduler gave up" in result.error


def test_receiver_close_fails_pending_sends(pair):
    sender, receiver, src, dst = pair
    receiver.expect("bye", src.nbytes, timeout_s=30)
    tickets = [sender.send(receiver.address, "bye", whole(src, dst)) for _ in range(3)]
    receiver.close()
    results = [sender.wait(t, 10) for t in tickets]
    assert all(r.finished for r in results)
    assert any(r.status == "failed" for r in results)
    # The channel is gone: a new send fails fast instead of hanging, connect() reopens later.
    assert wait_until(lambda: not sender.connected(receiver.address))
    late = sender.wait(sender.send(receiver.address, "bye2", whole(src, dst, 10)), 5)
    assert late.status == "failed" and "lost" in late.error


def test_sender_close_fails_the_receive_from_that_peer(pair):
    sender, receiver, _, _ = pair
    receiver.expect("orphan", 100, timeout_s=30, from_peer=sender.address)
    t0 = time.monotonic()
    sender.close()
    result = receiver.wait_recv("orphan", 10)
    assert result.status == "failed" and "disconnected" in result.error
    assert time.monotonic() - t0 < 2


def test_close_fails_pending_expects():
    engine = TransferEngine()
    engine.expect("x", 10, timeout_s=0)
    engine.close()
    result = engine.wait_recv("x", 1)
    assert result.status == "failed" and "closed" in result.error


class SilentPeer:
    """A TCP peer that completes the handshake and then never reads (a hung receiver), or with
    drain=True reads and drops everything but never acknowledges."""

    def __init__(self, drain: bool = False) -> None:
        self.drain = drain
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(1)
        self.address = f"127.0.0.1:{self.sock.getsockname()[1]}"
        self.conns: list[socket.socket] = []
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        conn, _ = self.sock.accept()
        self.conns.append(conn)
        head = conn.recv(HEADER.size, socket.MSG_WAITALL)
        text_len = HEADER.unpack(head)[5]
        conn.recv(text_len, socket.MSG_WAITALL)
        text = self.address.encode()
        conn.sendall(HEADER.pack(MAGIC, HELLO_ACK, 0, 0, 0, len(text), 0, 0) + text)
        while self.drain and conn.recv(1 << 20):
            pass

    def close(self) -> None:
        for c in self.conns:
            c.close()
        self.sock.close()


def test_send_deadline_and_stall_against_a_hung_peer():
    peer = SilentPeer()
    with TransferEngine(stall_timeout_s=1.0) as sender:
        src = np.ones(32 << 20, dtype=np.uint8)
        sender.register_memory(src)
        sender.connect(peer.address)
        t0 = time.monotonic()
        ticket = sender.send(
            peer.address, "hung", [(src.ctypes.data, 4096, src.nbytes)], timeout_s=0.3
        )
        result = sender.wait(ticket, 10)
        assert result.status == "timed_out", result
        assert time.monotonic() - t0 < 5
        assert not sender.connected(peer.address)  # the stalled connection was dropped
    peer.close()


def test_finished_records_are_forgotten_after_retention():
    with TransferEngine(retention_s=0.1) as sender, TransferEngine(retention_s=0.1) as receiver:
        src, dst = np.ones(64, dtype=np.uint8), np.zeros(64, dtype=np.uint8)
        sender.register_memory(src)
        receiver.register_memory(dst)
        sender.connect(receiver.address)
        receiver.expect("old", 64, timeout_s=10)
        ticket = sender.send(receiver.address, "old", whole(src, dst))
        assert sender.wait(ticket, 10).ok and receiver.wait_recv("old", 10).ok
        assert wait_until(lambda: sender.poll(ticket) is None and receiver.poll_recv("old") is None)
        with pytest.raises(ValueError, match="unknown ticket"):
            sender.wait(ticket)


def test_garbage_from_a_peer_drops_only_that_connection():
    with TransferEngine() as receiver, TransferEngine() as sender:
        dst = np.zeros(4096, dtype=np.uint8)
        src = np.ones(4096, dtype=np.uint8)
        receiver.register_memory(dst)
        sender.register_memory(src)
        sender.connect(receiver.address)
        host, port = receiver.address.split(":")
        with socket.create_connection((host, int(port))) as rogue:
            text = b"127.0.0.1:1"
            rogue.sendall(HEADER.pack(MAGIC, 1, 0, 0, 0, len(text), 0, 0) + text)  # HELLO
            ack = HEADER.unpack(rogue.recv(HEADER.size, socket.MSG_WAITALL))
            assert ack[1] == HELLO_ACK
            assert rogue.recv(ack[5], socket.MSG_WAITALL).decode() == receiver.address
            # A DATA frame whose pieces claim more bytes than its payload: a protocol error.
            rid = b"rogue"
            rogue.sendall(
                HEADER.pack(MAGIC, 3, 1, len(rid), 1, 0, 7, 8)
                + rid
                + struct.pack("<QQ", dst.ctypes.data, 4096)
                + b"x" * 8
            )
            rogue.settimeout(5)
            assert rogue.recv(1) == b""  # the receiver hung up on it
        assert not dst.any()
        receiver.expect("fine", 4096, timeout_s=10)
        ticket = sender.send(receiver.address, "fine", [(src.ctypes.data, dst.ctypes.data, 4096)])
        assert sender.wait(ticket, 10).ok and receiver.wait_recv("fine", 10).ok
        assert dst.all()


def test_port_in_use_raises_transfer_error():
    from pdserve.transfer import TransferError

    with TransferEngine() as first:
        port = int(first.address.rsplit(":", 1)[1])
        with pytest.raises(TransferError, match="bind"):
            TransferEngine(port=port)


def test_send_deadline_without_an_ack():
    peer = SilentPeer(drain=True)
    with TransferEngine() as sender:
        src = np.ones(1 << 20, dtype=np.uint8)
        sender.register_memory(src)
        sender.connect(peer.address)
        t0 = time.monotonic()
        ticket = sender.send(
            peer.address, "noack", [(src.ctypes.data, 4096, src.nbytes)], timeout_s=0.3
        )
        result = sender.wait(ticket, 10)
        assert result.status == "timed_out" and "deadline" in result.error, result
        assert time.monotonic() - t0 < 2
        assert sender.connected(peer.address)  # the channel itself is fine
    peer.close()
