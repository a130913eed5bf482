"""Typed wrapper of the C++ watermark evictor (`pdserve._core.Evictor`)."""

from __future__ import annotations

from pdserve import _core
from pdserve.cache.radix import RadixTree


class Evictor(_core.Evictor):
    """Keeps each tier's used fraction under its high watermark (fractions of the pool).

    `plan() -> EvictionPlan(demote_ticket, freed_gpu_block_ids, freed_host_block_ids)` frees LRU
    HOST leaves above the host high watermark, then brings the GPU tier down to its low watermark:
    one demote ticket when a host tier exists (copy the blocks, then `tree.commit(ticket, ok)`),
    freeing GPU leaves for what demotion cannot cover. GPU blocks in open demote tickets count as
    already gone. Host watermarks default to the GPU ones. Freed and ticket ids are `BlockIds`.
    Thread-safe.
    """

    def __init__(
        self,
        tree: RadixTree,
        gpu_high: float,
        gpu_low: float,
        host_high: float | None = None,
        host_low: float | None = None,
    ) -> None:
        super().__init__(tree, gpu_high, gpu_low, host_high, host_low)
        self.tree = tree
