"""Typed wrapper of the C++ block pool (`pdserve._core.BlockPool`): one pool per memory tier.

The wrapper subclasses the extension class, so hot calls (allocate, incref, decref) go straight to
C++ without a Python frame in between; `pdserve/_core.pyi` documents every inherited method.
"""

from __future__ import annotations

from pdserve import _core
from pdserve.cache.types import Tier


class BlockPool(_core.BlockPool):
    """Reference-counted block ids `0..num_blocks-1` of one tier.

    Each block is free, cached (ref 0, owned by the radix tree) or in use (ref > 0), and
    `num_free + num_cached + num_in_use == num_total` always (`check_invariants()`). Reserved
    blocks are in use (the reservation holds one reference). Thread-safe: a mutex per pool.
    Errors raise `ValueError` naming the value. `block_ids` arguments accept a `BlockIds`, lists or
    1-D numpy int32/int64 arrays; block-id results are `BlockIds` (immutable int32 sequences that
    compare equal to lists; `.tolist()` for a list).

    - `can_allocate(n) -> bool`; `allocate(n) -> BlockIds` (ref 1 each; nothing taken on error)
    - `incref(block_ids)`, `decref(block_ids)` (all or nothing; 0 -> free, or cached if tree-owned)
    - `ref_count(block_id)`, `is_owned(block_id)`
    - `reserve(request_id, n) -> BlockIds`, `reserved_blocks(request_id) -> BlockIds`,
      `release_reservation(request_id) -> int`, `transfer_reservation(request_id) -> BlockIds`
    - `num_total`, `num_free`, `num_cached`, `num_in_use`, `num_reserved`, `tier`
    """

    def __init__(self, num_blocks: int, tier: Tier = Tier.GPU) -> None:
        super().__init__(num_blocks, int(tier))

    def __repr__(self) -> str:
        return (
            f"BlockPool(tier={self.tier.name}, total={self.num_total}, free={self.num_free}, "
            f"cached={self.num_cached}, in_use={self.num_in_use}, reserved={self.num_reserved})"
        )
