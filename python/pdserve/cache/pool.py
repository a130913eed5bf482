"""Typed wrapper of the C++ block pool (`pdserve._core.BlockPool`): one pool per memory tier."""

from __future__ import annotations

from collections.abc import Sequence

from pdserve import _core
from pdserve.cache.types import Tier


class BlockPool:
    """Reference-counted block ids `0..num_blocks-1` of one tier.

    Each block is free, cached (ref 0, owned by the radix tree) or in use (ref > 0), and
    `num_free + num_cached + num_in_use == num_total` always (`check_invariants()`). Reserved
    blocks are in use. Thread-safe (a mutex per pool). Errors raise `ValueError` naming the value.
    `block_ids` arguments accept lists or 1-D numpy int32/int64 arrays.
    """

    def __init__(self, num_blocks: int, tier: Tier = Tier.GPU) -> None:
        self._pool = _core.BlockPool(num_blocks, int(tier))
        self.tier = Tier(tier)

    @property
    def native(self) -> _core.BlockPool:
        """The extension object (for passing to `RadixTree`)."""
        return self._pool

    @property
    def num_total(self) -> int:
        return self._pool.num_total

    @property
    def num_free(self) -> int:
        return self._pool.num_free

    @property
    def num_cached(self) -> int:
        return self._pool.num_cached

    @property
    def num_in_use(self) -> int:
        return self._pool.num_in_use

    @property
    def num_reserved(self) -> int:
        return self._pool.num_reserved

    def can_allocate(self, num_blocks: int) -> bool:
        """True when `allocate(num_blocks)` would succeed."""
        return self._pool.can_allocate(num_blocks)

    def allocate(self, num_blocks: int) -> list[int]:
        """Takes `num_blocks` free blocks (ref 1 each, caller owns them); raises, taking nothing,
        if not `can_allocate(num_blocks)`."""
        return self._pool.allocate(num_blocks)

    def incref(self, block_ids: Sequence[int]) -> None:
        """Adds one reference to each (in-use or cached) block."""
        self._pool.incref(block_ids)

    def decref(self, block_ids: Sequence[int]) -> None:
        """Drops one reference from each; at 0 a block is freed, or cached if the tree owns it."""
        self._pool.decref(block_ids)

    def ref_count(self, block_id: int) -> int:
        return self._pool.ref_count(block_id)

    def is_owned(self, block_id: int) -> bool:
        """True when the radix tree owns the block."""
        return self._pool.is_owned(block_id)

    def reserve(self, request_id: str, num_blocks: int) -> list[int]:
        """Allocates `num_blocks` blocks held for `request_id` (added to any it holds already)."""
        return self._pool.reserve(request_id, num_blocks)

    def reserved_blocks(self, request_id: str) -> list[int]:
        return self._pool.reserved_blocks(request_id)

    def release_reservation(self, request_id: str) -> int:
        """Drops the reservation's references; returns how many blocks it held (0 if unknown)."""
        return self._pool.release_reservation(request_id)

    def transfer_reservation(self, request_id: str) -> list[int]:
        """Ends the reservation; the caller takes over one reference on each returned block."""
        return self._pool.transfer_reservation(request_id)

    def check_invariants(self) -> None:
        """Raises RuntimeError with the numbers unless free + cached + in_use == total."""
        self._pool.check_invariants()

    def __repr__(self) -> str:
        return (
            f"BlockPool(tier={self.tier.name}, total={self.num_total}, free={self.num_free}, "
            f"cached={self.num_cached}, in_use={self.num_in_use}, reserved={self.num_reserved})"
        )
