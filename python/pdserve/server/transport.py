"""This instance's KV links: the transfer engine (DESIGN §4) and one communication domain per peer.

Adapts `pdserve.transfer` (TransferEngine, Endpoint, CommDomain, KVSender/KVReceiver) to the server:
link by exchanging endpoints, expect a request's blocks from one peer (a peer that disconnects fails
the receive at once), push blocks layer by layer (from the engine thread: never blocks) or whole,
flush before unpinning, abort on every early exit. The TCP backend moves host memory only; the GPU
backends (NCCL, CUDA IPC) will come in through the same `Endpoint`/`CommDomain`.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Sequence

from pdserve.transfer import CommDomain, Endpoint, KVLayout, TransferEngine


class TransferAborted(RuntimeError):
    """A transfer ended without every byte (aborted, peer gone, failed)."""


def transfer_layout(engine_layout) -> KVLayout:
    """The transfer engine's KVLayout of the engine's `kv_layout()` (same names, DESIGN §2)."""
    fields = (
        "base_addr",
        "nbytes",
        "num_layers",
        "num_blocks",
        "piece_nbytes",
        "layer_stride_nbytes",
        "block_stride_nbytes",
        "device",
    )
    get = (
        engine_layout.get
        if isinstance(engine_layout, dict)
        else (lambda k: getattr(engine_layout, k))
    )
    return KVLayout(**{f: (str(get(f)) if f == "device" else int(get(f))) for f in fields})


class KVLinks:
    """Owns the TransferEngine; thread-safe where the engine thread calls it (`push_*`)."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        bind_host: str,
        advertise_host: str,
        port: int,
        layout: KVLayout,
        instance_id: str,
        timeout_s: float,
    ):
        if not layout.device.startswith("cpu"):
            raise ValueError(
                f"the KV cache is on {layout.device}, but the TCP transfer backend moves host memory only; "
                "run disaggregated instances with --device cpu until the GPU transports (--enable-direct) land"
            )
        self._loop = loop
        self.layout = layout
        self.timeout_s = timeout_s
        self.engine = TransferEngine("tcp", host=bind_host, port=port)
        self.engine.register_memory(layout.base_addr, layout.nbytes, -1)
        local = Endpoint.local(self.engine, layout, instance_id=instance_id)
        # peers connect to the advertised host (the bound one may be a wildcard such as 0.0.0.0)
        port_str = local.address.rsplit(":", 1)[1]
        self.local = Endpoint(
            local.backend, f"{advertise_host}:{port_str}", layout, local.rank, instance_id
        )
        self._domains: dict[str, CommDomain] = {}  # peer instance id -> domain
        self._recv_peer: dict[
            str, str
        ] = {}  # request id -> peer it expects KV from (event loop only)
        self._lock = threading.Lock()
        self.bytes_sent = 0
        self.num_sends = (
            0  # batches queued (layer-wise: one per layer and step; whole: one per request)
        )
        self.bytes_received = 0
        self.seconds_receiving = 0.0

    def endpoint(self) -> dict:
        return self.local.to_dict()

    async def link(self, peer_id: str, endpoint: dict) -> None:
        """Connect to a peer's endpoint (idempotent; a new endpoint address replaces the old domain)."""
        remote = Endpoint.from_dict(endpoint)
        old = self._domains.get(peer_id)
        if old is not None and old.remote.address == remote.address and old.is_open:
            return
        domain = CommDomain(self.engine, self.local, remote, send_timeout_s=self.timeout_s)
        await self._loop.run_in_executor(None, domain.open)
        self._domains[peer_id] = domain

    def _domain(self, peer_id: str) -> CommDomain:
        domain = self._domains.get(peer_id)
        if domain is None:
            raise TransferAborted(
                f"no link to peer {peer_id}: run `pdserve link` or register both with a scheduler"
            )
        return domain

    # ---- receiving
    def expect(self, peer_id: str, request_id: str, num_blocks: int) -> int:
        """Expect `num_blocks` blocks (all layers) of `request_id` from `peer_id`; returns the bytes."""
        if request_id in self._recv_peer:
            raise ValueError(f"request {request_id} already expects KV")
        nbytes = self._domain(peer_id).receiver.expect(request_id, num_blocks, self.timeout_s)
        self._recv_peer[request_id] = peer_id
        return nbytes

    async def wait(self, request_id: str, timeout: float) -> None:
        """Returns once every expected byte landed; raises TimeoutError or TransferAborted."""
        peer_id = self._recv_peer.get(request_id)
        if peer_id is None:
            raise TransferAborted(f"request {request_id} expects no KV (aborted or never reserved)")
        try:
            result = await asyncio.wait_for(
                self._domain(peer_id).receiver.wait_async(request_id), timeout
            )
        except asyncio.TimeoutError:
            raise TimeoutError(
                f"request {request_id}: its KV did not arrive within {timeout}s"
            ) from None
        self._recv_peer.pop(request_id, None)
        if not result.ok:
            exc = TimeoutError if result.status == "timed_out" else TransferAborted
            raise exc(
                f"request {request_id}: KV receive {result.status} after {result.nbytes_received} of "
                f"{result.nbytes_expected} bytes {result.error}".rstrip()
            )
        self.bytes_received += result.nbytes_received
        self.seconds_receiving += result.seconds

    def num_pending(self) -> int:
        return len(self._recv_peer)

    # ---- sending (push_* run on the engine thread)
    def push_layer(
        self,
        peer_id: str,
        request_id: str,
        layer_idx: int,
        src_block_ids: Sequence[int],
        dst_block_ids: Sequence[int],
    ) -> int:
        """Queue one layer of the blocks; returns the bytes queued. Never blocks."""
        self._domain(peer_id).sender.push_layer(request_id, layer_idx, src_block_ids, dst_block_ids)
        return self._count(len(src_block_ids))

    def push_request(
        self,
        peer_id: str,
        request_id: str,
        src_block_ids: Sequence[int],
        dst_block_ids: Sequence[int],
    ) -> int:
        """Queue every layer of the blocks (block-major layouts make this few large pieces)."""
        self._domain(peer_id).sender.push_request(request_id, src_block_ids, dst_block_ids)
        return self._count(len(src_block_ids) * self.layout.num_layers)

    def _count(self, num_pieces: int) -> int:
        nbytes = num_pieces * self.layout.piece_nbytes
        with self._lock:
            self.bytes_sent += nbytes
            self.num_sends += num_pieces > 0
        return nbytes

    async def flush(self, peer_id: str, request_id: str) -> None:
        """Returns once the peer acknowledged every byte sent for the request (then the source blocks
        may be unpinned); raises TransferAborted otherwise."""
        result = await self._domain(peer_id).sender.wait_async(request_id)
        if not result.ok:
            raise TransferAborted(f"KV send of {request_id} {result.status}: {result.error}")

    # ---- both
    async def abort(self, request_id: str) -> None:
        """Stops the request's transfers here and at the peers; returns when none touches its blocks."""
        peer_id = self._recv_peer.pop(request_id, None)
        domain = self._domains.get(peer_id) if peer_id else None
        if domain is not None:
            await self._loop.run_in_executor(None, domain.receiver.abort, request_id)
        else:
            await self._loop.run_in_executor(None, self.engine.abort, request_id)

    async def aclose(self) -> None:
        await self._loop.run_in_executor(None, self.engine.close)
