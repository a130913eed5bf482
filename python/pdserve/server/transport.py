"""KV transport as the servers see it: expect / send / wait / abort over registered KV memory.

`KVTransport` is the interface the instance server uses. `TcpKVTransport` adapts the C++ transfer
engine (`pdserve.transfer.TransferEngine`, DESIGN §4); `HttpKVTransport` is a pure-Python stand-in over
the instances' own HTTP servers (host memory only), kept for `--kv-transport http` and for builds
without `pdserve._transfer`. Send is called from the engine thread (the layer hook)
and never blocks it: bytes are copied out at once (the layer's KV is final) and posted from the event loop.
"""

from __future__ import annotations

import asyncio
import ctypes
import json
import logging
import struct
import threading
import time
from dataclasses import dataclass, field
from urllib.parse import quote

import aiohttp

from pdserve.server.kv_pieces import LayoutInfo, Piece

log = logging.getLogger("pdserve.transport")


class TransferAborted(RuntimeError):
    pass


@dataclass
class _Expected:
    nbytes: int
    future: asyncio.Future
    received_nbytes: int = 0
    started: float = field(default_factory=time.perf_counter)


class KVTransport:
    """What the instance server needs from a KV transport (one per instance)."""

    kind = "abstract"
    bytes_sent = 0
    bytes_received = 0
    seconds_receiving = 0.0

    def endpoint(self) -> dict:
        raise NotImplementedError

    async def connect(self, peer_id: str, endpoint: dict) -> None:
        raise NotImplementedError

    def expect(self, request_id: str, nbytes: int) -> None:
        raise NotImplementedError

    async def wait(self, request_id: str, timeout: float) -> None:
        """Returns when every expected byte landed; raises TimeoutError or TransferAborted."""
        raise NotImplementedError

    async def abort(self, request_id: str) -> None:
        """Stops the request's transfers both ways; when it returns no byte of it moves any more."""
        raise NotImplementedError

    def send(self, peer_id: str, request_id: str, pieces: list[Piece]) -> None:
        """Thread-safe, non-blocking; the bytes at the local addresses must not change until `flush`."""
        raise NotImplementedError

    async def flush(self, request_id: str) -> None:
        """Returns when every send of this request left (or failed: raises)."""
        raise NotImplementedError

    def num_pending(self) -> int:
        return 0

    async def aclose(self) -> None:
        pass


class HttpKVTransport(KVTransport):
    """Pieces travel as POST /internal/v1/kv/{request_id}: [u32 header len][JSON header][payload]."""

    kind = "http"

    def __init__(self, loop: asyncio.AbstractEventLoop, base_url: str, layout: LayoutInfo):
        self._loop = loop
        self._base_url = base_url
        self._layout = layout
        self._peers: dict[str, str] = {}
        self._expected: dict[str, _Expected] = {}  # event loop only
        self._pending_sends: dict[str, list[asyncio.Future]] = {}  # event loop only
        self._session: aiohttp.ClientSession | None = None
        self._lock = threading.Lock()  # guards byte counters touched from the engine thread
        self.bytes_sent = 0
        self.bytes_received = 0
        self.seconds_receiving = 0.0

    def endpoint(self) -> dict:
        return {"kind": self.kind, "url": self._base_url}

    async def connect(self, peer_id: str, endpoint: dict) -> None:
        if endpoint.get("kind") != self.kind:
            raise ValueError(
                f"peer {peer_id} offers a {endpoint.get('kind')!r} transport, this one is {self.kind!r}"
            )
        self._peers[peer_id] = endpoint["url"].rstrip("/")

    # ---- receiving
    def expect(self, request_id: str, nbytes: int) -> None:
        if request_id in self._expected:
            raise ValueError(f"request {request_id} already expects KV")
        fut = self._loop.create_future()
        self._expected[request_id] = _Expected(nbytes, fut)
        if nbytes == 0:
            fut.set_result(None)

    async def wait(self, request_id: str, timeout: float) -> None:
        exp = self._expected.get(request_id)
        if exp is None:
            raise TransferAborted(f"request {request_id} expects no KV (aborted or never reserved)")
        try:
            await asyncio.wait_for(asyncio.shield(exp.future), timeout)
        except asyncio.TimeoutError:
            raise TimeoutError(
                f"request {request_id}: {exp.received_nbytes} of {exp.nbytes} KV bytes arrived within {timeout}s"
            ) from None
        finally:
            if exp.future.done():
                self._expected.pop(request_id, None)

    async def abort(self, request_id: str) -> None:
        exp = self._expected.pop(request_id, None)
        if exp is not None and not exp.future.done():
            exp.future.set_exception(TransferAborted(f"request {request_id} aborted"))
            exp.future.exception()  # mark retrieved
        for fut in self._pending_sends.pop(request_id, []):
            fut.cancel()

    def receive(self, request_id: str, body: bytes) -> int:
        """Lands one POSTed batch of pieces into registered memory; returns bytes written."""
        exp = self._expected.get(request_id)
        if exp is None:
            raise TransferAborted(f"no KV expected for request {request_id}")
        (header_len,) = struct.unpack_from("<I", body, 0)
        header = json.loads(body[4 : 4 + header_len])
        offset = 4 + header_len
        lo, hi = self._layout.base_addr, self._layout.base_addr + self._layout.nbytes
        total = sum(n for _, n in header["pieces"])
        if offset + total != len(body):
            raise ValueError(f"KV batch carries {len(body) - offset} bytes, header says {total}")
        for remote_addr, nbytes in header["pieces"]:
            if not (lo <= remote_addr and remote_addr + nbytes <= hi):
                raise ValueError(
                    f"piece [{remote_addr:#x}, +{nbytes}) outside the registered KV memory"
                )
        if exp.received_nbytes + total > exp.nbytes:
            raise ValueError(
                f"request {request_id}: {exp.received_nbytes + total} bytes exceed the {exp.nbytes} expected"
            )
        for remote_addr, nbytes in header["pieces"]:
            ctypes.memmove(remote_addr, body[offset : offset + nbytes], nbytes)
            offset += nbytes
        exp.received_nbytes += total
        self.bytes_received += total
        if exp.received_nbytes == exp.nbytes and not exp.future.done():
            self.seconds_receiving += time.perf_counter() - exp.started
            exp.future.set_result(None)
        return total

    def num_pending(self) -> int:
        return len(self._expected)

    # ---- sending
    def send(self, peer_id: str, request_id: str, pieces: list[Piece]) -> None:
        url = self._peers.get(peer_id)
        if url is None:
            raise RuntimeError(
                f"no link to peer {peer_id}: run `pdserve link` or register both with a scheduler"
            )
        if not pieces:
            return
        lo, hi = self._layout.base_addr, self._layout.base_addr + self._layout.nbytes
        chunks = []
        for local_addr, _, nbytes in pieces:
            if not (lo <= local_addr and local_addr + nbytes <= hi):
                raise ValueError(f"local piece [{local_addr:#x}, +{nbytes}) outside the KV memory")
            chunks.append(ctypes.string_at(local_addr, nbytes))
        header = json.dumps({"pieces": [[r, n] for _, r, n in pieces]}).encode()
        body = b"".join([struct.pack("<I", len(header)), header, *chunks])
        with self._lock:
            self.bytes_sent += len(body) - 4 - len(header)
        self._loop.call_soon_threadsafe(self._start_post, url, request_id, body)

    def _start_post(self, url: str, request_id: str, body: bytes) -> None:
        task = self._loop.create_task(self._post(url, request_id, body))
        self._pending_sends.setdefault(request_id, []).append(task)

    async def _post(self, url: str, request_id: str, body: bytes) -> None:
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120))
        async with self._session.post(
            f"{url}/internal/v1/kv/{quote(request_id, safe='')}", data=body
        ) as resp:
            if resp.status != 200:
                raise TransferAborted(
                    f"peer refused KV for {request_id}: HTTP {resp.status} {await resp.text()}"
                )

    async def flush(self, request_id: str) -> None:
        # sends are scheduled with call_soon_threadsafe: let queued callbacks run first
        await asyncio.sleep(0)
        tasks = self._pending_sends.pop(request_id, [])
        if tasks:
            results = await asyncio.gather(*tasks, return_exceptions=True)
            for r in results:
                if isinstance(r, BaseException):
                    raise r

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()


class TcpKVTransport(KVTransport):
    """The C++ transfer engine's TCP backend. Sends are tickets: P keeps blocks pinned until `flush`."""

    kind = "tcp"

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        host: str,
        port: int,
        layout: LayoutInfo,
        timeout_s: float,
    ):
        from pdserve.transfer import TransferEngine

        if layout.device != "cpu":
            raise ValueError(
                f"the KV cache is on {layout.device}, but the TCP transfer backend moves host memory only; "
                "run disaggregated instances with --device cpu until the GPU transports land"
            )
        self._loop = loop
        self._timeout_s = timeout_s
        self._engine = TransferEngine("tcp", host=host, port=port)
        self._engine.register_memory(layout.base_addr, layout.nbytes, -1)
        self._peers: dict[str, str] = {}  # peer instance id -> "host:port"
        self._expected: set[str] = set()
        self._nothing_expected: set[str] = set()
        self._tickets: dict[str, list[int]] = {}
        self._lock = threading.Lock()
        self.bytes_sent = 0
        self.bytes_received = 0
        self.seconds_receiving = 0.0

    def endpoint(self) -> dict:
        return {"kind": self.kind, "address": self._engine.address}

    async def connect(self, peer_id: str, endpoint: dict) -> None:
        if endpoint.get("kind") != self.kind:
            raise ValueError(
                f"peer {peer_id} offers a {endpoint.get('kind')!r} transport, this one is {self.kind!r}"
            )
        address = endpoint["address"]
        await self._loop.run_in_executor(None, self._engine.connect, address)
        self._peers[peer_id] = address

    def expect(self, request_id: str, nbytes: int) -> None:
        if request_id in self._expected or request_id in self._nothing_expected:
            raise ValueError(f"request {request_id} already expects KV")
        if (
            nbytes == 0
        ):  # the peer holds it all: nothing will come (the engine refuses 0-byte receives)
            self._nothing_expected.add(request_id)
            return
        self._engine.expect(request_id, nbytes, self._timeout_s)
        self._expected.add(request_id)

    async def wait(self, request_id: str, timeout: float) -> None:
        if request_id in self._nothing_expected:
            self._nothing_expected.discard(request_id)
            return
        if request_id not in self._expected:
            raise TransferAborted(f"request {request_id} expects no KV (aborted or never reserved)")
        try:
            result = await asyncio.wait_for(self._engine.wait_recv_async(request_id), timeout)
        except asyncio.TimeoutError:
            raise TimeoutError(
                f"request {request_id}: its KV did not arrive within {timeout}s"
            ) from None
        self._expected.discard(request_id)
        if not result.ok:
            exc = TimeoutError if result.status == "timed_out" else TransferAborted
            raise exc(
                f"request {request_id}: KV receive {result.status} after {result.nbytes_received} of "
                f"{result.nbytes_expected} bytes {result.error}".rstrip()
            )
        self.bytes_received += result.nbytes_received
        self.seconds_receiving += result.seconds

    async def abort(self, request_id: str) -> None:
        self._expected.discard(request_id)
        self._nothing_expected.discard(request_id)
        with self._lock:
            self._tickets.pop(request_id, None)
        # blocks until no transfer touches the request's memory (so its blocks may be freed after)
        await self._loop.run_in_executor(None, self._engine.abort, request_id)

    def send(self, peer_id: str, request_id: str, pieces: list[Piece]) -> None:
        address = self._peers.get(peer_id)
        if address is None:
            raise RuntimeError(
                f"no link to peer {peer_id}: run `pdserve link` or register both with a scheduler"
            )
        if not pieces:
            return
        import numpy as np

        rows = np.asarray(pieces, dtype=np.uint64).reshape(-1, 3)
        ticket = self._engine.send(address, request_id, rows, timeout_s=self._timeout_s)
        with self._lock:
            self._tickets.setdefault(request_id, []).append(ticket)
            self.bytes_sent += int(rows[:, 2].sum())

    async def flush(self, request_id: str) -> None:
        with self._lock:
            tickets = self._tickets.pop(request_id, [])
        for ticket in tickets:
            result = await self._engine.wait_async(ticket)
            if not result.ok:
                raise TransferAborted(f"KV send of {request_id} {result.status}: {result.error}")

    def num_pending(self) -> int:
        return len(self._expected) + len(self._nothing_expected)

    async def aclose(self) -> None:
        await self._loop.run_in_executor(None, self._engine.close)


def make_transport(
    kind: str,
    loop: asyncio.AbstractEventLoop,
    host: str,
    port: int,
    base_url: str,
    layout: LayoutInfo,
    timeout_s: float,
) -> KVTransport:
    """`kind`: tcp (the C++ engine), http (the Python stand-in) or auto (tcp when built)."""
    if kind == "auto":
        try:
            import pdserve._transfer  # noqa: F401
        except ImportError:
            kind = "http"
        else:
            kind = "tcp"
    if kind == "tcp":
        return TcpKVTransport(loop, host, port, layout, timeout_s)
    if kind == "http":
        return HttpKVTransport(loop, base_url, layout)
    raise ValueError(f"--kv-transport must be auto, tcp or http, got {kind!r}")
