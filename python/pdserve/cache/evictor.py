"""Typed wrapper of the C++ watermark evictor (`pdserve._core.Evictor`)."""

from __future__ import annotations

from pdserve import _core
from pdserve.cache.radix import RadixTree, ticket_from_tuple
from pdserve.cache.types import EvictionPlan


class Evictor:
    """Keeps each tier's used fraction under its high watermark (fractions of the pool).

    `plan()` frees LRU HOST leaves above the host high watermark, then brings the GPU tier down to
    its low watermark: one demote ticket when a host tier exists (copy the blocks, then
    `tree.commit(ticket, ok)`), freeing GPU leaves for what demotion cannot cover.
    Host watermarks default to the GPU ones.
    """

    def __init__(
        self,
        tree: RadixTree,
        gpu_high: float,
        gpu_low: float,
        host_high: float | None = None,
        host_low: float | None = None,
    ) -> None:
        self.tree = tree
        self._evictor = _core.Evictor(tree.native, gpu_high, gpu_low, host_high, host_low)

    def plan(self) -> EvictionPlan:
        ticket, freed_gpu, freed_host = self._evictor.plan()
        return EvictionPlan(
            None if ticket is None else ticket_from_tuple(ticket), freed_gpu, freed_host
        )
