"""Result objects of the cache core, shared by the C++-backed wrappers and the Python reference.

Keeping them in one module lets tests compare the two implementations result by result.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass, field


class Tier(enum.IntEnum):
    """Memory tier of a block pool; block ids are dense per tier and meaningless across tiers."""

    GPU = 0
    HOST = 1


EVENT_KINDS = ("inserted", "evicted", "demoted", "promoted")
TICKET_KINDS = ("demote", "promote")

NodeHandle = int
"""Opaque id of a radix-tree node (0 = root). Never reused: a stale handle raises ValueError."""
LockHandle = int
"""Opaque id returned by `RadixTree.lock`, consumed by `unlock`."""
BlockIdSeq = Sequence[int]
"""Block ids of a result: a `pdserve._core.BlockIds` from the C++ core (an immutable int32 sequence
that compares equal to the list of the same ids; `tolist()` for a list to mutate or send as JSON,
`numpy.asarray(ids)` for a zero-copy array), a `list[int]` from the reference model."""


@dataclass(slots=True)
class MatchResult:
    """Longest cached prefix: `num_tokens` (multiple of block_size), per block its id and tier."""

    num_tokens: int
    block_ids: BlockIdSeq
    tiers: Sequence[int]  # Tier values, one per block (a BlockIds from the C++ core)
    node: NodeHandle  # deepest matched node, for lock() / begin_promote()


@dataclass(slots=True)
class InsertResult:
    """Which given blocks the tree adopted and which duplicate positions it already caches."""

    num_adopted: int
    adopted_block_ids: BlockIdSeq
    duplicate_block_ids: BlockIdSeq


@dataclass(slots=True)
class Ticket:
    """Pending tier copy: copy `src_block_ids[i]` to `dst_block_ids[i]`, then `commit(ticket, ok)`."""

    ticket_id: int
    kind: str  # "demote" (GPU -> HOST) or "promote" (HOST -> GPU)
    src_tier: Tier
    dst_tier: Tier
    src_block_ids: BlockIdSeq
    dst_block_ids: BlockIdSeq

    @property
    def copies(self) -> list[tuple[int, int]]:
        """(src block id, dst block id) pairs in copy order."""
        return list(zip(self.src_block_ids, self.dst_block_ids, strict=True))


@dataclass(slots=True)
class CacheEvent:
    """One node's change. `block_hashes` are chained (`hash_blocks`); `token_ids` only for inserted."""

    kind: str  # one of EVENT_KINDS
    tier: Tier  # where the blocks are after the event (evicted: the tier freed from)
    parent_hash: int  # hash of the block before the first one (0 at the root)
    block_hashes: list[int]
    token_ids: list[int] = field(default_factory=list)


@dataclass(slots=True)
class EvictionPlan:
    """What `Evictor.plan()` did: an open demote ticket (copy, then commit) and the freed blocks."""

    demote_ticket: Ticket | None
    freed_gpu_block_ids: BlockIdSeq
    freed_host_block_ids: BlockIdSeq
