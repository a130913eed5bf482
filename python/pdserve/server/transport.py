"""KV transport as the servers see it: expect / send / wait / abort over registered KV memory.

`KVTransport` is the interface the instance server uses; `HttpKVTransport` implements it in Python over
the instances' own HTTP servers (host memory only): a stand-in used when the C++ transfer engine
(`pdserve.transfer`, DESIGN §4) is not available. Send is called from the engine thread (the layer hook)
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
from urllib.parse import quote
from dataclasses import dataclass, field

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

    def abort(self, request_id: str) -> None:
        raise NotImplementedError

    def send(self, peer_id: str, request_id: str, pieces: list[Piece]) -> None:
        """Thread-safe, non-blocking; the bytes at the local addresses must not change until `flush`."""
        raise NotImplementedError

    async def flush(self, request_id: str) -> None:
        """Returns when every send of this request left (or failed: raises)."""
        raise NotImplementedError

    def num_pending(self) -> int:
        return 0

    def close(self) -> None:
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

    def abort(self, request_id: str) -> None:
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
