"""This instance's KV links: the transfer engine (DESIGN §4) and one communication domain per peer.

Adapts `pdserve.transfer` (TransferEngine, Endpoint, CommDomain, KVSender/KVReceiver) to the server:
link by exchanging endpoints, expect a request's blocks from one peer (a peer that disconnects fails
the receive at once), push blocks layer by layer (from the engine thread: never blocks) or whole,
flush before unpinning, abort on every early exit. The TCP backend moves host memory (the KV of a CPU
instance, or a GPU instance's host staging slots); `cuda_ipc` (--enable-direct) moves GPU memory, the
sender copying its KV blocks straight into the receiver's once the layer's ready event completed. NCCL
will come in through the same `Endpoint`/`CommDomain`.

Tensor parallelism: one transfer engine per instance, in the engine's process, registers every rank's
KV region (the ranks' memory is mapped there). A link is one CommDomain per rank pair over that engine
and one connection; rank i's pieces go to the peer's rank i. A receive expects every rank's bytes under
one request id, so it completes once all ranks' KV landed. The endpoint carries all ranks' layouts in
`extra["layouts"]` (rank 0's is also its `layout`, what a TP-1 peer reads).
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Sequence

from pdserve.transfer import CommDomain, Endpoint, KVLayout, TransferEngine, check_compatible


class LinkMismatch(ValueError):
    """Two instances whose KV cannot be paired rank to rank (different TP sizes or shard shapes)."""


class TransferAborted(RuntimeError):
    """A transfer ended without every byte (aborted, peer gone, failed)."""


def endpoint_layouts(endpoint: dict) -> list[KVLayout]:
    """Every rank's transfer layout an endpoint dict announces (index = rank; a single-rank endpoint,
    which has no `extra["layouts"]`, announces its `layout` only)."""
    ranks = (endpoint.get("extra") or {}).get("layouts")
    if not ranks:
        return [KVLayout.from_dict(endpoint["layout"])]
    return [KVLayout.from_dict(d) for d in ranks]


def check_rank_layouts(local: Sequence[KVLayout], remote: Sequence[KVLayout], peer: str) -> None:
    """Raises LinkMismatch unless rank i of `local` can exchange blocks with rank i of `remote`."""
    if len(local) != len(remote):
        raise LinkMismatch(
            f"tensor parallel sizes differ: this instance runs --tensor-parallel-size {len(local)}, "
            f"peer {peer} runs --tensor-parallel-size {len(remote)}; rank i's KV goes to the peer's "
            "rank i, so both sides of a link need the same --tensor-parallel-size"
        )
    for rank, (a, b) in enumerate(zip(local, remote, strict=True)):
        try:
            check_compatible(a, b)
        except ValueError as exc:
            raise LinkMismatch(f"rank {rank} of peer {peer}: {exc}") from None


def check_same_model(local: dict, peer: dict) -> None:
    """Raises LinkMismatch unless two instances' /internal/v1/info describe interchangeable KV: the
    same model, block size and KV dtype (bf16 and fp16 pieces have the same size, so the layout
    check alone would let one side read the other's KV as garbage)."""
    keys = ("model", "block_size", "kv_dtype")
    mine, theirs = (tuple(info.get(k) for k in keys) for info in (local, peer))
    if mine != theirs:

        def show(values: tuple) -> str:
            return ", ".join(f"{k}={v}" for k, v in zip(keys, values, strict=True))

        raise LinkMismatch(
            f"peer {peer.get('instance_id')} serves {show(theirs)}; this instance serves "
            f"{show(mine)}: their KV caches are not interchangeable"
        )


class _PeerLink:
    """One peer: a CommDomain per rank pair, all over this instance's single TransferEngine."""

    def __init__(self, domains: list[CommDomain]):
        self.domains = domains
        self.address = domains[0].remote.address

    @property
    def is_open(self) -> bool:
        return self.domains[0].is_open


class KVLinks:
    """Owns the TransferEngine; thread-safe where the engine thread calls it (`push_*`).

    `layouts[i]` is rank i's registered KV memory (the engine's shard, or its host staging arena).
    `cluster_token`: the instance's --cluster-token; the engine refuses peers without it and
    presents it when connecting (None: no check)."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        bind_host: str,
        advertise_host: str,
        port: int,
        layouts: Sequence[KVLayout],
        instance_id: str,
        timeout_s: float,
        backend: str = "tcp",
        cluster_token: str | None = None,
    ):
        layouts = list(layouts)
        on_gpu = backend != "tcp"
        for layout in layouts:
            if layout.device.startswith("cuda") != on_gpu:
                raise ValueError(
                    f"the registered KV memory is on {layout.device}, but the {backend} transfer "
                    f"backend moves {'GPU' if on_gpu else 'host'} memory only"
                )
        self._loop = loop
        self.layouts = layouts
        self.layout = layouts[0]
        self.timeout_s = timeout_s
        self.engine = TransferEngine(
            backend, host=bind_host, port=port, cluster_token=cluster_token
        )
        for layout in layouts:
            device = int(layout.device.partition(":")[2] or 0) if on_gpu else -1
            self.engine.register_memory(layout.base_addr, layout.nbytes, device)
        # peers connect to the advertised host (the bound one may be a wildcard such as 0.0.0.0)
        port_str = self.engine.address.rsplit(":", 1)[1]
        address = f"{advertise_host}:{port_str}"
        self.locals = [
            Endpoint(self.engine.backend, address, layout, rank, instance_id)
            for rank, layout in enumerate(layouts)
        ]
        self.local = Endpoint(
            self.engine.backend,
            address,
            layouts[0],
            0,
            instance_id,
            {"tensor_parallel_size": len(layouts), "layouts": [x.to_dict() for x in layouts]},
        )
        self._domains: dict[str, _PeerLink] = {}  # peer instance id -> its link
        # request id -> peer it expects KV from (event loop only)
        self._recv_peer: dict[str, str] = {}
        self._empty_recvs: set[str] = set()  # expected with 0 bytes: done at once
        self._lock = threading.Lock()
        self.bytes_sent = 0
        # batches queued (layer-wise: one per layer and step; whole: one per request)
        self.num_sends = 0
        self.bytes_received = 0
        self.seconds_receiving = 0.0

    def endpoint(self) -> dict:
        return self.local.to_dict()

    async def link(self, peer_id: str, endpoint: dict) -> None:
        """Connect to a peer's endpoint (idempotent; a new endpoint address replaces the old link).
        Raises LinkMismatch when the peer's ranks do not pair with ours."""
        remote_layouts = endpoint_layouts(endpoint)
        check_rank_layouts(self.layouts, remote_layouts, peer_id)
        base = Endpoint.from_dict(endpoint)
        old = self._domains.get(peer_id)
        if old is not None and old.address == base.address and old.is_open:
            return
        domains = [
            CommDomain(
                self.engine,
                self.locals[rank],
                Endpoint(base.backend, base.address, layout, rank, base.instance_id),
                send_timeout_s=self.timeout_s,
            )
            for rank, layout in enumerate(remote_layouts)
        ]
        await self._loop.run_in_executor(None, domains[0].open)  # one connection serves every rank
        self._domains[peer_id] = _PeerLink(domains)

    def _domain(self, peer_id: str) -> _PeerLink:
        domain = self._domains.get(peer_id)
        if domain is None:
            raise TransferAborted(
                f"no link to peer {peer_id}: run `pdserve link` or register both with a scheduler"
            )
        return domain

    # ---- receiving
    def expect(self, peer_id: str, request_id: str, num_blocks: int) -> int:
        """Expect `num_blocks` blocks (all layers, all ranks) of `request_id` from `peer_id`; returns the
        bytes."""
        if request_id in self._recv_peer:
            raise ValueError(f"request {request_id} already expects KV")
        link = self._domain(peer_id)
        if num_blocks < 0:
            raise ValueError(f"expect: num_blocks must be >= 0, got {num_blocks}")
        nbytes = sum(layout.request_nbytes(num_blocks) for layout in self.layouts)
        if nbytes == 0:
            self._empty_recvs.add(request_id)
        else:
            self.engine.expect(request_id, nbytes, self.timeout_s, from_peer=link.address)
        self._recv_peer[request_id] = peer_id
        return nbytes

    async def wait(self, request_id: str, timeout: float) -> None:
        """Returns once every expected byte landed; raises TimeoutError or TransferAborted."""
        peer_id = self._recv_peer.get(request_id)
        if peer_id is None:
            raise TransferAborted(f"request {request_id} expects no KV (aborted or never reserved)")
        if request_id in self._empty_recvs:
            self._empty_recvs.discard(request_id)
            self._recv_peer.pop(request_id, None)
            return
        try:
            result = await asyncio.wait_for(self.engine.wait_recv_async(request_id), timeout)
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
        ready_event: int = 0,
    ) -> int:
        """Queue one layer of the blocks on every rank; returns the bytes queued. Never blocks.
        `ready_event` (cuda_ipc): a recorded CUDA event the sends wait for (needed only during the call)."""
        for d in self._domain(peer_id).domains:
            d.sender.push_layer(request_id, layer_idx, src_block_ids, dst_block_ids, ready_event)
        return self._count(len(src_block_ids))

    def push_request(
        self,
        peer_id: str,
        request_id: str,
        src_block_ids: Sequence[int],
        dst_block_ids: Sequence[int],
        ready_event: int = 0,
    ) -> int:
        """Queue every layer of the blocks on every rank (block-major layouts: few large pieces)."""
        for d in self._domain(peer_id).domains:
            d.sender.push_request(request_id, src_block_ids, dst_block_ids, ready_event)
        return self._count(len(src_block_ids) * self.layout.num_layers)

    def _count(self, num_pieces_per_rank: int) -> int:
        nbytes = num_pieces_per_rank * sum(layout.piece_nbytes for layout in self.layouts)
        with self._lock:
            self.bytes_sent += nbytes
            self.num_sends += num_pieces_per_rank > 0
        return nbytes

    async def flush(self, peer_id: str, request_id: str) -> None:
        """Returns once the peer acknowledged every byte sent for the request on every rank (then the
        source blocks may be unpinned); raises TransferAborted otherwise."""
        results = [await d.sender.wait_async(request_id) for d in self._domain(peer_id).domains]
        for rank, result in enumerate(results):
            if not result.ok:
                raise TransferAborted(
                    f"KV send of {request_id} (rank {rank}) {result.status}: {result.error}"
                )

    # ---- both
    async def abort(self, request_id: str) -> None:
        """Stops the request's transfers here and at the peers; returns when none touches its blocks."""
        self._recv_peer.pop(request_id, None)
        self._empty_recvs.discard(request_id)
        await self._loop.run_in_executor(None, self.engine.abort, request_id)

    async def aclose(self) -> None:
        await self._loop.run_in_executor(None, self.engine.close)
