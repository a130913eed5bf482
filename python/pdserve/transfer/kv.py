"""KV-cache transfer orchestration over a memory layout (DESIGN §2): which bytes of which blocks
go where, per layer (layer-wise push) or for all layers at once (whole-request push).

Pure arithmetic on `KVLayout` plus thin sender/receiver helpers; it does not know the engine's
tensors, only base addresses and strides, so P and D may use different layouts and block ids.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence

import numpy as np

from pdserve.kv_layout import KVLayout
from pdserve.transfer.engine import DONE, PENDING, RecvResult, SendResult, TransferEngine


def check_compatible(src: KVLayout, dst: KVLayout) -> None:
    """Raises ValueError unless blocks of `src` can be copied piece by piece into `dst`."""
    if src.num_layers != dst.num_layers or src.piece_nbytes != dst.piece_nbytes:
        raise ValueError(
            f"KV layouts differ: source has {src.num_layers} layers of {src.piece_nbytes} B "
            f"pieces, destination {dst.num_layers} layers of {dst.piece_nbytes} B pieces"
        )


def _block_array(block_ids: Sequence[int], layout: KVLayout, what: str) -> np.ndarray:
    ids = np.asarray(block_ids, dtype=np.int64).reshape(-1)
    if ids.size and (ids.min() < 0 or ids.max() >= layout.num_blocks):
        bad = int(ids[(ids < 0) | (ids >= layout.num_blocks)][0])
        raise ValueError(f"{what} block id {bad} outside [0, {layout.num_blocks})")
    return ids


def merge_pieces(pieces: np.ndarray) -> np.ndarray:
    """Sorts rows (local_addr, remote_addr, nbytes) by local address and merges rows that continue
    each other on both sides into one run. Returns a new (M, 3) uint64 array, M <= N."""
    if len(pieces) <= 1:
        return pieces.astype(np.uint64, copy=True)
    p = pieces[np.argsort(pieces[:, 0], kind="stable")].astype(np.uint64)
    local, remote, n = p[:, 0], p[:, 1], p[:, 2]
    starts = np.ones(len(p), dtype=bool)
    starts[1:] = (local[1:] != local[:-1] + n[:-1]) | (remote[1:] != remote[:-1] + n[:-1])
    idx = np.flatnonzero(starts)
    out = np.empty((len(idx), 3), dtype=np.uint64)
    out[:, 0] = local[idx]
    out[:, 1] = remote[idx]
    out[:, 2] = np.add.reduceat(n, idx)
    return out


def build_pieces(
    src: KVLayout,
    dst: KVLayout,
    src_block_ids: Sequence[int],
    dst_block_ids: Sequence[int],
    layer_ids: Sequence[int],
) -> np.ndarray:
    """Pieces copying `src_block_ids[i]` of `src` into `dst_block_ids[i]` of `dst` for the given
    layers, merged into the fewest contiguous runs. Returns an (N, 3) uint64 array."""
    check_compatible(src, dst)
    s = _block_array(src_block_ids, src, "source")
    d = _block_array(dst_block_ids, dst, "destination")
    if s.size != d.size:
        raise ValueError(f"{s.size} source blocks but {d.size} destination blocks")
    layers = np.asarray(layer_ids, dtype=np.int64).reshape(-1)
    if layers.size and (layers.min() < 0 or layers.max() >= src.num_layers):
        raise ValueError(f"layer ids must lie in [0, {src.num_layers}), got {layers.tolist()}")
    if s.size == 0 or layers.size == 0:
        return np.empty((0, 3), dtype=np.uint64)
    lay = layers[:, None]
    pieces = np.empty((layers.size * s.size, 3), dtype=np.uint64)
    pieces[:, 0] = (
        src.base_addr + lay * src.layer_stride_nbytes + s * src.block_stride_nbytes
    ).ravel()
    pieces[:, 1] = (
        dst.base_addr + lay * dst.layer_stride_nbytes + d * dst.block_stride_nbytes
    ).ravel()
    pieces[:, 2] = src.piece_nbytes
    return merge_pieces(pieces)


def layer_pieces(
    src: KVLayout,
    dst: KVLayout,
    layer_idx: int,
    src_block_ids: Sequence[int],
    dst_block_ids: Sequence[int],
) -> np.ndarray:
    """Pieces of one layer (layer-wise push)."""
    return build_pieces(src, dst, src_block_ids, dst_block_ids, [layer_idx])


def request_pieces(
    src: KVLayout, dst: KVLayout, src_block_ids: Sequence[int], dst_block_ids: Sequence[int]
) -> np.ndarray:
    """Pieces of all layers (whole-request push); with block-major layouts each run of consecutive
    blocks becomes one piece."""
    return build_pieces(src, dst, src_block_ids, dst_block_ids, range(src.num_layers))


def _combine(request_id: str, peer: str, results: list[SendResult]) -> SendResult:
    # "pending" wins over failures: the blocks may be released only once nothing reads them.
    pending = [r for r in results if r.status == PENDING]
    failed = [r for r in results if r.status not in (DONE, PENDING)]
    first = pending[0] if pending else failed[0] if failed else None
    return SendResult(
        ticket=results[-1].ticket if results else 0,
        request_id=request_id,
        peer=peer,
        status=first.status if first else DONE,
        nbytes=sum(r.nbytes for r in results),
        seconds=max((r.seconds for r in results), default=0.0),
        error=first.error if first else "",
    )


class KVSender:
    """The pushing side of one link (P → D for prefill KV, D → P for dcache): turns block ids into
    pieces and sends them, tracking every ticket of a request until `wait` / `wait_async`.

    `push_layer` / `push_request` never block (safe from the engine's layer hook); `wait` blocks.
    """

    def __init__(
        self,
        engine: TransferEngine,
        peer: str,
        src_layout: KVLayout,
        dst_layout: KVLayout,
        *,
        timeout_s: float | None = None,
    ) -> None:
        check_compatible(src_layout, dst_layout)
        self.engine = engine
        self.peer = peer
        self.src_layout = src_layout
        self.dst_layout = dst_layout
        self.timeout_s = timeout_s
        self._lock = threading.Lock()
        self._tickets: dict[str, list[int]] = {}
        # (source ids, destination ids) -> their layer-0 pieces, for the blocks of recent steps
        self._layer0: dict[tuple[tuple[int, ...], tuple[int, ...]], np.ndarray] = {}

    def _send(self, request_id: str, pieces: np.ndarray, ready_event: int) -> int | None:
        if len(pieces) == 0:
            return None
        ticket = self.engine.send(
            self.peer, request_id, pieces, timeout_s=self.timeout_s, ready_event=ready_event
        )
        with self._lock:
            self._tickets.setdefault(request_id, []).append(ticket)
        return ticket

    def push_layer(
        self,
        request_id: str,
        layer_idx: int,
        src_block_ids: Sequence[int],
        dst_block_ids: Sequence[int],
        ready_event: int = 0,
    ) -> int | None:
        """Sends layer `layer_idx` of the given blocks; returns the ticket (None if no blocks).
        `ready_event` (GPU backends): a recorded cudaEvent_t, as an int, that completes once the
        blocks are written; needed only during the call (the engine waits through its own event).

        A prefill step pushes the same blocks of a request for every layer, so layer 0's pieces are
        built once per step and request and shifted by the layer strides (addresses are linear in the layer index and merging
        consecutive pieces does not depend on it)."""
        if not 0 <= layer_idx < self.src_layout.num_layers:
            raise ValueError(
                f"layer_idx must lie in [0, {self.src_layout.num_layers}), got {layer_idx}"
            )
        key = (tuple(src_block_ids), tuple(dst_block_ids))
        with self._lock:
            pieces = self._layer0.get(key)
        if pieces is None:
            pieces = layer_pieces(self.src_layout, self.dst_layout, 0, src_block_ids, dst_block_ids)
            with self._lock:
                if len(self._layer0) >= 256:  # one entry per request of a step; bound it
                    self._layer0.clear()
                self._layer0[key] = pieces
        if layer_idx and len(pieces):
            shift = np.array(
                [
                    layer_idx * self.src_layout.layer_stride_nbytes,
                    layer_idx * self.dst_layout.layer_stride_nbytes,
                    0,
                ],
                dtype=np.uint64,
            )
            pieces = pieces + shift
        return self._send(request_id, pieces, ready_event)

    def push_request(
        self,
        request_id: str,
        src_block_ids: Sequence[int],
        dst_block_ids: Sequence[int],
        ready_event: int = 0,
    ) -> int | None:
        """Sends every layer of the given blocks in one batch; returns the ticket (None if none)."""
        pieces = request_pieces(self.src_layout, self.dst_layout, src_block_ids, dst_block_ids)
        return self._send(request_id, pieces, ready_event)

    def _take(self, request_id: str) -> list[int]:
        with self._lock:
            return self._tickets.pop(request_id, [])

    def wait(self, request_id: str, timeout_s: float | None = None) -> SendResult:
        """Blocks until every ticket pushed so far for the request is terminal; returns the
        combined result ("done" only if all are, also when nothing was pushed; else the first
        failure) and forgets those tickets. The source blocks may be released after this returns.
        With `timeout_s` (for all tickets together), a request still pending stays tracked."""
        tickets = self._take(request_id)
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        results = []
        for t in tickets:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            results.append(self.engine.wait(t, left))
        combined = _combine(request_id, self.peer, results)
        if combined.status == PENDING:
            with self._lock:
                self._tickets.setdefault(request_id, [])[:0] = tickets
        return combined

    async def wait_async(self, request_id: str) -> SendResult:
        """`wait` for asyncio code: awaits completions without blocking the loop."""
        tickets = self._take(request_id)
        results = [await self.engine.wait_async(t) for t in tickets]
        return _combine(request_id, self.peer, results)

    def abort(self, request_id: str, reason: str = "aborted") -> None:
        """Aborts the request's sends here and its receive at the peer; blocks until no transfer
        reads the source blocks, then forgets the request."""
        self._take(request_id)
        self.engine.abort(request_id, reason)


class KVReceiver:
    """The receiving side of one link: expects the bytes of a request's destination blocks.

    `expect` never blocks (call it before answering the peer's reservation, so data never arrives
    unexpected); `wait` blocks; `wait_async` awaits.
    """

    def __init__(self, engine: TransferEngine, layout: KVLayout, peer: str | None = None) -> None:
        self.engine = engine
        self.layout = layout
        self.peer = peer
        self._empty: set[str] = set()
        self._lock = threading.Lock()

    def expect(self, request_id: str, num_blocks: int, timeout_s: float) -> int:
        """Expects `num_blocks` blocks of every layer; returns the byte count (0: nothing to
        receive, and `wait` then returns "done" at once)."""
        if num_blocks < 0:
            raise ValueError(f"expect: num_blocks must be >= 0, got {num_blocks}")
        nbytes = self.layout.request_nbytes(num_blocks)
        if nbytes == 0:
            with self._lock:
                self._empty.add(request_id)
            return 0
        self.engine.expect(request_id, nbytes, timeout_s, from_peer=self.peer)
        return nbytes

    def _empty_result(self, request_id: str) -> RecvResult | None:
        with self._lock:
            if request_id in self._empty:
                self._empty.discard(request_id)
                return RecvResult(request_id, DONE, 0, 0, 0.0)
        return None

    def wait(self, request_id: str, timeout_s: float | None = None) -> RecvResult:
        """Blocks until the receive is terminal; on "done" every byte landed."""
        return self._empty_result(request_id) or self.engine.wait_recv(request_id, timeout_s)

    async def wait_async(self, request_id: str) -> RecvResult:
        empty = self._empty_result(request_id)
        return empty if empty is not None else await self.engine.wait_recv_async(request_id)

    def abort(self, request_id: str, reason: str = "aborted") -> None:
        """Aborts the receive (and the peer's sends); blocks until no write lands in its blocks."""
        with self._lock:
            self._empty.discard(request_id)
        self.engine.abort(request_id, reason)
