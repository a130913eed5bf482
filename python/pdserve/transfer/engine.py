"""Typed wrapper of the native transfer engine (`pdserve._transfer`).

Every server-side use goes through `TransferEngine`: it accepts tensors/arrays for memory
registration, returns dataclasses instead of native structs, and adds asyncio waits that never
block the event loop (completions arrive through an eventfd watched by the loop).
"""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from pdserve import _transfer

TransferError = _transfer.TransferError

PENDING = "pending"
DONE = "done"
TIMED_OUT = "timed_out"
ABORTED = "aborted"
FAILED = "failed"


class _Status:
    """`ok` and `finished` of a ticket's status string (shared by SendResult and RecvResult)."""

    status: str

    @property
    def ok(self) -> bool:
        return self.status == DONE

    @property
    def finished(self) -> bool:
        return self.status != PENDING


@dataclass(frozen=True)
class SendResult(_Status):
    """State of one send ticket. `status` is one of pending/done/timed_out/aborted/failed; a
    terminal status means the engine no longer reads the ticket's local memory."""

    ticket: int
    request_id: str
    peer: str
    status: str
    nbytes: int
    seconds: float
    error: str = ""


@dataclass(frozen=True)
class RecvResult(_Status):
    """State of one expected receive. A terminal status means no write into the receiver's memory
    for this request is in flight any more (its blocks may be released or used)."""

    request_id: str
    status: str
    nbytes_expected: int
    nbytes_received: int
    seconds: float
    error: str = ""


def _send_result(r: Any) -> SendResult:
    return SendResult(r.ticket, r.request_id, r.peer, r.status, r.nbytes, r.seconds, r.error)


def _recv_result(r: Any) -> RecvResult:
    return RecvResult(
        r.request_id, r.status, r.nbytes_expected, r.nbytes_received, r.seconds, r.error
    )


def memory_span(memory: Any) -> tuple[int, int, int]:
    """Returns (addr, nbytes, device) of a contiguous torch tensor or numpy array; device is -1
    for host memory, else the CUDA ordinal. Raises ValueError for non-contiguous memory."""
    if hasattr(memory, "data_ptr"):  # torch.Tensor, duck-typed so this module imports no torch
        if not memory.is_contiguous():
            raise ValueError("register_memory: tensor must be contiguous")
        device = memory.device
        ordinal = -1 if device.type == "cpu" else (device.index or 0)
        return int(memory.data_ptr()), int(memory.numel() * memory.element_size()), ordinal
    if isinstance(memory, np.ndarray):
        if not memory.flags.c_contiguous:
            raise ValueError("register_memory: array must be C-contiguous")
        return int(memory.ctypes.data), int(memory.nbytes), -1
    raise TypeError(
        f"register_memory: expected an int address, a torch tensor or a numpy array, "
        f"got {type(memory).__name__}"
    )


def _default_message_nbytes(backend: str) -> int:
    """Payload bytes per wire message: 1 MiB over TCP (cache-friendly copies, bounded abort waits);
    512 MiB for cuda_ipc, where a message costs two round trips and its copy ~0.4 ms on an H100."""
    return 512 << 20 if backend == "cuda_ipc" else 1 << 20


def _device_copy_fn() -> int:
    """The CUDA kernel that copies a cuda_ipc message's pieces in one launch (pdserve._cuda), or 0
    where the kernels are not built or PDSERVE_IPC_COPY=driver asks for the driver's per-piece
    copies (the copy engines; for measurements)."""
    choice = os.environ.get("PDSERVE_IPC_COPY", "kernel")
    if choice not in ("kernel", "driver"):
        raise ValueError(f"PDSERVE_IPC_COPY must be 'kernel' or 'driver', got {choice!r}")
    if choice == "driver":
        return 0
    try:
        from pdserve import _cuda
    except ImportError:
        return 0
    return int(_cuda.copy_runs_address())


class TransferEngine:
    """One transfer endpoint (per process or rank): registered memory, a listening address,
    connections to peers, receives (`expect`) and sends (`send`).

    Backends: "tcp" moves host memory over sockets; "cuda_ipc" moves GPU memory between processes
    on one host (the socket carries the pieces' locations, the sender copies them through CUDA IPC
    mappings of the receiver's allocations; raises TransferError where no CUDA driver or GPU is).

    Threading: every method is thread-safe. `connect`, `wait`, `wait_recv`, `abort`,
    `unregister_memory` and `close` block (with the GIL released) and may be run in an executor;
    `expect`, `send`, `poll`, `poll_recv` and `stats` return at once and are safe on the event
    loop. In asyncio code prefer `wait_async` / `wait_recv_async`, which use no threads.

    `cluster_token` (the cluster's --cluster-token; None or "": none) guards the listening port:
    with one, a peer's `connect` is refused unless it presents the same token (checked once per
    connection, in constant time), and its `connect` raises TransferError saying the tokens
    differ. `connect` always presents this engine's own token. At most 1024 bytes (ValueError).
    """

    def __init__(
        self,
        backend: str = "tcp",
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        stall_timeout_s: float = 30.0,
        max_message_nbytes: int | None = None,
        retention_s: float = 60.0,
        cluster_token: str | None = None,
    ) -> None:
        self._native = _transfer.Engine(
            backend=backend,
            host=host,
            port=port,
            stall_timeout_s=stall_timeout_s,
            max_message_nbytes=(
                _default_message_nbytes(backend)
                if max_message_nbytes is None
                else max_message_nbytes
            ),
            retention_s=retention_s,
            device_copy_fn=_device_copy_fn() if backend == "cuda_ipc" else 0,
            cluster_token=cluster_token or "",
        )
        self._async_lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._send_waiters: dict[int, list[asyncio.Future[SendResult]]] = {}
        self._recv_waiters: dict[str, list[asyncio.Future[RecvResult]]] = {}
        self._closed = False

    # ---- identity ----
    @property
    def backend(self) -> str:
        return self._native.backend

    @property
    def address(self) -> str:
        """The "host:port" that peers pass to `connect`."""
        return self._native.address

    # ---- memory ----
    def register_memory(
        self, memory: Any, nbytes: int | None = None, device: int | None = None
    ) -> int:
        """Registers memory for sending from and receiving into; returns the region id.

        `memory` is an int address (then `nbytes` is required) or a contiguous torch tensor /
        numpy array. The caller keeps the memory alive until `unregister_memory`. Regions may not
        overlap. The TCP backend takes host memory only.
        """
        if isinstance(memory, int):
            if nbytes is None:
                raise ValueError("register_memory: nbytes is required with a raw address")
            addr, ordinal = memory, -1 if device is None else device
        else:
            addr, span_nbytes, ordinal = memory_span(memory)
            nbytes = span_nbytes if nbytes is None else nbytes
            if nbytes > span_nbytes:
                raise ValueError(
                    f"register_memory: nbytes={nbytes} exceeds the {span_nbytes} B given"
                )
            ordinal = ordinal if device is None else device
        return self._native.register_memory(addr, nbytes, ordinal)

    def unregister_memory(self, region_id: int) -> bool:
        """Waits for transfers touching registered memory in flight, then forgets the region."""
        return self._native.unregister_memory(region_id)

    # ---- peers ----
    def connect(self, peer: str, timeout_s: float = 10.0) -> str:
        """Opens (or reopens after a failure) the channel to `peer` ("host:port"); returns the peer
        name to pass to `send`. Blocks; raises TransferError when unreachable or when the peer
        refuses this engine's cluster token."""
        self._native.connect(peer, timeout_s)
        return peer

    def connected(self, peer: str) -> bool:
        return self._native.connected(peer)

    # ---- receiver ----
    def expect(
        self, request_id: str, nbytes: int, timeout_s: float, from_peer: str | None = None
    ) -> None:
        """Announces `nbytes` for `request_id`, due within `timeout_s` seconds (0: no deadline).

        Must come before the sender starts: data for an unexpected request is refused. With
        `from_peer` (the sender's `address`) only that peer may write, and its disconnect fails the
        receive at once. A request aborted earlier starts aborted. Non-blocking.
        """
        self._native.expect(request_id, nbytes, timeout_s, from_peer or "")

    def wait_recv(self, request_id: str, timeout_s: float | None = None) -> RecvResult:
        """Blocks until the receive is terminal (or `timeout_s` passes: status "pending")."""
        return _recv_result(
            self._native.wait_recv(request_id, -1.0 if timeout_s is None else timeout_s)
        )

    def poll_recv(self, request_id: str) -> RecvResult | None:
        r = self._native.poll_recv(request_id)
        return None if r is None else _recv_result(r)

    # ---- sender ----
    def send(
        self,
        peer: str,
        request_id: str,
        pieces: np.ndarray | Sequence[tuple[int, int, int]],
        *,
        timeout_s: float | None = None,
        stream: int = 0,
        ready_event: int = 0,
    ) -> int:
        """Queues pieces (rows of local_addr, remote_addr, nbytes) for `peer`; returns a ticket.

        Non-blocking. The ticket ends "done" once the receiver acknowledged every byte; keep the
        local memory unchanged until then. `stream` / `ready_event` (CUDA handles as ints) are the
        slot for GPU backends; the TCP backend requires 0. cuda_ipc waits for `ready_event` (through an
        event of its own made during this call, so the caller's may be destroyed afterwards) and
        ignores `stream`: it copies on a stream of its own.
        """
        return self._native.send(peer, request_id, pieces, timeout_s or 0.0, stream, ready_event)

    def wait(self, ticket: int, timeout_s: float | None = None) -> SendResult:
        """Blocks until the ticket is terminal (or `timeout_s` passes: status "pending")."""
        return _send_result(self._native.wait(ticket, -1.0 if timeout_s is None else timeout_s))

    def poll(self, ticket: int) -> SendResult | None:
        r = self._native.poll(ticket)
        return None if r is None else _send_result(r)

    # ---- both ----
    def abort(self, request_id: str, reason: str = "aborted") -> None:
        """Aborts `request_id` here and at every connected peer. Blocks until no transfer touches
        memory for it (at most one in-flight message), so its blocks may be released after."""
        self._native.abort(request_id, reason)

    def stats(self) -> dict[str, Any]:
        """Byte counters and timings: totals, "peers" (per peer address), receive counts."""
        return self._native.stats()

    # ---- asyncio ----
    async def wait_async(self, ticket: int) -> SendResult:
        """Awaits a send ticket without blocking the loop or using a thread."""
        fut = self._register(self._send_waiters, ticket)
        self._native.watch(ticket)  # before the poll: a completion in between is queued too
        done = self.poll(ticket)
        if done is None:
            raise ValueError(f"wait_async: unknown ticket {ticket}")
        if done.finished and not fut.done():
            fut.set_result(done)
        return await fut

    async def wait_recv_async(self, request_id: str) -> RecvResult:
        """Awaits an expected receive without blocking the loop or using a thread."""
        fut = self._register(self._recv_waiters, request_id)
        self._native.watch_recv(request_id)
        done = self.poll_recv(request_id)
        if done is None:
            raise ValueError(f"wait_recv_async: request {request_id!r} was not expected here")
        if done.finished and not fut.done():
            fut.set_result(done)
        return await fut

    def _register(self, waiters: dict, key: Any) -> asyncio.Future:
        loop = asyncio.get_running_loop()
        with self._async_lock:
            if self._loop is None:
                self._loop = loop
                loop.add_reader(self._native.completion_fd(), self._on_completions)
            elif self._loop is not loop:
                raise RuntimeError("TransferEngine async waits are bound to one event loop")
            fut = loop.create_future()
            waiters.setdefault(key, []).append(fut)
        return fut

    def _on_completions(self) -> None:
        for c in self._native.drain_completions():
            if c.is_send:
                key, result, table = c.send.ticket, _send_result(c.send), self._send_waiters
            else:
                key, result, table = c.recv.request_id, _recv_result(c.recv), self._recv_waiters
            with self._async_lock:
                futures = table.pop(key, [])
            for fut in futures:
                if not fut.done():
                    fut.set_result(result)
        # Futures resolved through poll() in wait_*_async leave their lists behind; drop them.
        with self._async_lock:
            for table in (self._send_waiters, self._recv_waiters):
                for key in [k for k, futs in table.items() if all(f.done() for f in futs)]:
                    del table[key]

    # ---- lifetime ----
    def close(self) -> None:
        """Fails everything pending and stops the engine's threads. Idempotent. Blocks until every
        message in flight ended; cuda_ipc: a receiver waits up to 3 x stall_timeout_s for a sender that
        went silent while it may be copying into this engine's memory."""
        if self._closed:
            return
        self._closed = True
        loop = self._loop
        if loop is not None and not loop.is_closed():
            fd = self._native.completion_fd()
            try:
                running = asyncio.get_running_loop()
            except RuntimeError:
                running = None
            if running is loop:
                loop.remove_reader(fd)
            else:
                loop.call_soon_threadsafe(loop.remove_reader, fd)
        self._native.close()
        if loop is not None and not loop.is_closed():
            self._on_completions_threadsafe(loop)

    def _on_completions_threadsafe(self, loop: asyncio.AbstractEventLoop) -> None:
        try:
            if asyncio.get_running_loop() is loop:
                self._on_completions()
                return
        except RuntimeError:
            pass
        loop.call_soon_threadsafe(self._on_completions)

    def __enter__(self) -> TransferEngine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"TransferEngine(backend={self.backend!r}, address={self.address!r})"
