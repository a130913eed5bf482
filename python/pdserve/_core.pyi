"""Type stub of `pdserve._core`, the pybind11 extension of the C++ cache core (cpp/, bindings/core/).

Use the typed wrappers in `pdserve.cache` (subclasses of these classes) instead of this module
directly. Results are the dataclasses of `pdserve.cache.types`, built in C++, with every sequence
of block ids (and MatchResult.tiers) a `BlockIds`; hashes and event token ids stay lists. Token and
block id arguments accept a BlockIds, lists/tuples of ints or 1-D numpy int32/int64 arrays
(BlockIds and contiguous int32 arrays are read in place). Every call that walks or mutates a structure releases
the GIL. C++ errors arrive as ValueError (bad value, named in the message) or RuntimeError (broken
invariant); a non-int element raises TypeError.
"""

from collections.abc import Iterable, Iterator, Sequence
from typing import Any, SupportsIndex, overload

from pdserve.cache.types import (
    CacheEvent,
    EvictionPlan,
    InsertResult,
    MatchResult,
    Ticket,
    Tier,
)

TokenIds = Sequence[int] | Any  # BlockIds, list / tuple of ints or a 1-D numpy integer array

class BlockIds(Sequence[int]):
    """Immutable sequence of int32 block ids: what every block-id result of this module is.

    One object with the ids stored inline (no Python int per id until one is read). Supports len,
    indexing (negative too; IndexError), slicing (a BlockIds), iteration, `in`, truth (non-empty),
    `+` with a BlockIds or any sequence of ints (a BlockIds; `list += ids` still extends the list),
    `==` / `!=` elementwise with BlockIds, lists and tuples of ints, hash (that of the equal tuple),
    pickling, and the buffer protocol (format "i", read-only, 1-D): `numpy.asarray(ids)` views the
    ids without a copy. Every argument that takes block ids reads a BlockIds in place.
    """

    def __new__(cls, ids: Iterable[int] = ...) -> BlockIds:
        """From any iterable of ints (a BlockIds is returned as is). TypeError for a non-int
        element, ValueError for one outside int32; both name the position and the value."""
    def __len__(self) -> int: ...
    @overload
    def __getitem__(self, index: SupportsIndex) -> int: ...
    @overload
    def __getitem__(self, index: slice) -> BlockIds: ...
    def __iter__(self) -> Iterator[int]: ...
    def __contains__(self, value: object) -> bool: ...
    def __add__(self, other: Sequence[int] | Any) -> BlockIds: ...
    def __eq__(self, other: object) -> bool: ...
    def __ne__(self, other: object) -> bool: ...
    def __hash__(self) -> int: ...
    def __buffer__(self, flags: int) -> memoryview: ...
    def tolist(self) -> list[int]:
        """A new list of the ids (e.g. for JSON, or to mutate)."""
    def count(self, value: object) -> int: ...
    def index(self, value: object, start: int = 0, stop: int = ...) -> int: ...

TIER_GPU: int  # 0
TIER_HOST: int  # 1

def hash_blocks(tokens: TokenIds, block_size: int, parent_hash: int = 0) -> list[int]:
    """Chained 64-bit hashes of the whole blocks of `tokens` (partial tail ignored):
    h_i = hash_block(h_{i-1}, block i), h_{-1} = parent_hash. Same values as the events carry."""

class BlockPool:
    """Reference-counted block ids 0..num_blocks-1 of one tier; thread-safe."""

    def __init__(self, num_blocks: int, tier: int = 0) -> None: ...
    @property
    def tier(self) -> Tier: ...
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
    def allocate(self, num_blocks: int) -> BlockIds:
        """Ref 1 each, owned by the caller; ValueError (nothing taken) if not can_allocate."""
    def incref(self, block_ids: TokenIds) -> None: ...
    def decref(self, block_ids: TokenIds) -> None:
        """All or nothing; ValueError on double free / unknown id / last ref held by a reservation."""
    def ref_count(self, block_id: int) -> int: ...
    def is_owned(self, block_id: int) -> bool: ...
    def reserve(self, request_id: str, num_blocks: int) -> BlockIds: ...
    def reserved_blocks(self, request_id: str) -> BlockIds: ...
    def release_reservation(self, request_id: str) -> int: ...
    def transfer_reservation(self, request_id: str) -> BlockIds: ...
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
    def match_prefix(self, tokens: TokenIds) -> MatchResult:
        """Longest cached whole-block prefix; touches the path (LRU); splits a node the match
        ends inside so that `node` names exactly the matched prefix."""
    def insert(self, tokens: TokenIds, block_ids: TokenIds) -> InsertResult:
        """Caches the whole blocks; all or nothing. The caller keeps its references."""
    def lock(self, node: int) -> int: ...
    def unlock(self, handle: int) -> None: ...
    def evict(self, num_blocks: int, tier: int = 0) -> BlockIds:
        """Freed block ids in eviction order (LRU unlocked unreferenced leaves first)."""
    def begin_demote(self, num_blocks: int) -> Ticket:
        """LRU demote candidates covering num_blocks GPU blocks; HOST copies allocated."""
    def begin_promote(self, node: int) -> Ticket:
        """GPU blocks for the HOST nodes on the root->node path; ValueError if short."""
    def commit(self, ticket_id: int, ok: bool) -> None: ...
    def drain_events(self) -> list[CacheEvent]:
        """Events since the last call, in order."""
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
    def plan(self) -> EvictionPlan:
        """Applies frees, opens at most one demote ticket (see pdserve.cache.Evictor)."""
