"""Type stub of `pdserve._core`, the pybind11 extension of the C++ cache core (cpp/, bindings/core/).

Use the typed wrappers in `pdserve.cache` instead of this module directly. Token and block id
arguments accept lists/tuples of ints or 1-D numpy int32/int64 arrays (contiguous int32 is read
in place). Every call that walks or mutates a structure releases the GIL. C++ errors arrive as
ValueError (bad value, named in the message) or RuntimeError (broken invariant); a non-int
element raises TypeError.
"""

from collections.abc import Sequence
from typing import Any

TokenIds = Sequence[int] | Any  # or a 1-D numpy integer array
# (ticket_id, kind 0=demote/1=promote, src_tier, dst_tier, src_block_ids, dst_block_ids)
TicketTuple = tuple[int, int, int, int, list[int], list[int]]

TIER_GPU: int  # 0
TIER_HOST: int  # 1

def hash_blocks(tokens: TokenIds, block_size: int, parent_hash: int = 0) -> list[int]:
    """Chained 64-bit hashes of the whole blocks of `tokens` (partial tail ignored):
    h_i = hash_block(h_{i-1}, block i), h_{-1} = parent_hash. Same values as the events carry."""

class BlockPool:
    """Reference-counted block ids 0..num_blocks-1 of one tier; thread-safe."""

    def __init__(self, num_blocks: int, tier: int = 0) -> None: ...
    @property
    def tier(self) -> int: ...
    @property
    def num_total(self) -> int: ...
    @property
    def num_free(self) -> int: ...
    @property
    def num_cached(self) -> int: ...
    @property
    def num_in_use(self) -> int: ...
    @property
    def num_reserved(self) -> int: ...
    def can_allocate(self, num_blocks: int) -> bool: ...
    def allocate(self, num_blocks: int) -> list[int]:
        """Ref 1 each, owned by the caller; ValueError (nothing taken) if not can_allocate."""
    def incref(self, block_ids: TokenIds) -> None: ...
    def decref(self, block_ids: TokenIds) -> None:
        """All or nothing; ValueError on double free / unknown id / last ref held by a reservation."""
    def ref_count(self, block_id: int) -> int: ...
    def is_owned(self, block_id: int) -> bool: ...
    def reserve(self, request_id: str, num_blocks: int) -> list[int]: ...
    def reserved_blocks(self, request_id: str) -> list[int]: ...
    def release_reservation(self, request_id: str) -> int: ...
    def transfer_reservation(self, request_id: str) -> list[int]: ...
    def check_invariants(self) -> None:
        """RuntimeError with the numbers unless free + cached + in_use == total (and per block)."""

class RadixTree:
    """Radix tree over token ids at block granularity; thread-safe (lock order tree -> pool)."""

    def __init__(
        self,
        block_size: int,
        gpu_pool: BlockPool,
        host_pool: BlockPool | None = None,
        record_events: bool = True,
    ) -> None: ...
    @property
    def block_size(self) -> int: ...
    @property
    def has_host_tier(self) -> bool: ...
    def match_prefix(self, tokens: TokenIds) -> tuple[int, list[int], list[int], int]:
        """(num_tokens, block_ids, tiers, node handle); touches the path (LRU)."""
    def insert(self, tokens: TokenIds, block_ids: TokenIds) -> tuple[int, list[int], list[int]]:
        """(num_adopted, adopted_block_ids, duplicate_block_ids); all or nothing."""
    def lock(self, node: int) -> int: ...
    def unlock(self, handle: int) -> None: ...
    def evict(self, num_blocks: int, tier: int = 0) -> list[int]:
        """Freed block ids in eviction order (LRU unlocked unreferenced leaves first)."""
    def begin_demote(self, num_blocks: int) -> TicketTuple: ...
    def begin_promote(self, node: int) -> TicketTuple: ...
    def commit(self, ticket_id: int, ok: bool) -> None: ...
    def drain_events(self) -> list[tuple[int, int, int, list[int], list[int]]]:
        """[(kind 0=inserted/1=evicted/2=demoted/3=promoted, tier, parent_hash, block_hashes,
        token_ids)] since the last call."""
    @property
    def num_nodes(self) -> int: ...
    def num_tree_blocks(self, tier: int = 0) -> int: ...
    @property
    def num_pending_demote_blocks(self) -> int: ...
    @property
    def num_locks(self) -> int: ...
    def check_invariants(self) -> None: ...

class Evictor:
    """Watermark policy over a RadixTree (fractions of each pool; host ones default to GPU's)."""

    def __init__(
        self,
        tree: RadixTree,
        gpu_high: float,
        gpu_low: float,
        host_high: float | None = None,
        host_low: float | None = None,
    ) -> None: ...
    def plan(self) -> tuple[TicketTuple | None, list[int], list[int]]:
        """(demote ticket or None, freed GPU block ids, freed HOST block ids)."""
