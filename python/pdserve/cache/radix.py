"""Typed wrapper of the C++ radix tree (`pdserve._core.RadixTree`): the prefix cache of one instance.

Token ids may be Python lists or 1-D numpy int32/int64 arrays (int32 contiguous arrays are read
in place, the fastest input).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from pdserve import _core
from pdserve.cache.pool import BlockPool
from pdserve.cache.types import (
    EVENT_KINDS,
    TICKET_KINDS,
    CacheEvent,
    InsertResult,
    LockHandle,
    MatchResult,
    NodeHandle,
    Ticket,
    Tier,
)

TokenIds = Sequence[int] | Any  # list / tuple of ints or a 1-D numpy integer array


def ticket_from_tuple(raw: tuple) -> Ticket:
    ticket_id, kind, src_tier, dst_tier, src_ids, dst_ids = raw
    return Ticket(ticket_id, TICKET_KINDS[kind], Tier(src_tier), Tier(dst_tier), src_ids, dst_ids)


class RadixTree:
    """Radix tree over token ids at block granularity (only whole blocks are cached).

    LRU order comes from a logical clock advanced by every `match_prefix` / `insert`; eviction takes
    unlocked leaves with the oldest (last access, insertion order) first. Thread-safe (a mutex per
    tree; lock order tree -> pool); every call that walks the tree releases the GIL.
    See `docs/DESIGN.md` §1 for the full contract.
    """

    def __init__(
        self,
        block_size: int,
        gpu_pool: BlockPool,
        host_pool: BlockPool | None = None,
        record_events: bool = True,
    ) -> None:
        self.gpu_pool = gpu_pool
        self.host_pool = host_pool
        self._tree = _core.RadixTree(
            block_size,
            gpu_pool.native,
            None if host_pool is None else host_pool.native,
            record_events,
        )
        self.block_size = block_size

    @property
    def native(self) -> _core.RadixTree:
        return self._tree

    @property
    def has_host_tier(self) -> bool:
        return self.host_pool is not None

    def match_prefix(self, tokens: TokenIds) -> MatchResult:
        """Longest cached whole-block prefix of `tokens`; touches the path (LRU)."""
        return MatchResult(*self._tree.match_prefix(tokens))

    def insert(self, tokens: TokenIds, block_ids: Sequence[int]) -> InsertResult:
        """Caches the whole blocks of `tokens`; `block_ids[i]` holds tokens `[i*bs, (i+1)*bs)`.

        `len(block_ids)` is `len(tokens) // bs` (or one more for a trailing partial block, ignored).
        The caller keeps its references; adopted blocks become cached when they drop to 0,
        duplicates (positions already cached with another block) are freed when they do.
        """
        return InsertResult(*self._tree.insert(tokens, block_ids))

    def lock(self, node: NodeHandle) -> LockHandle:
        """Pins the root->node path (one pool reference per block) until `unlock`."""
        return self._tree.lock(node)

    def unlock(self, handle: LockHandle) -> None:
        self._tree.unlock(handle)

    def evict(self, num_blocks: int, tier: Tier = Tier.GPU) -> list[int]:
        """Frees at least `num_blocks` blocks of `tier` (LRU unlocked leaves); returns freed ids."""
        return self._tree.evict(num_blocks, int(tier))

    def begin_demote(self, num_blocks: int) -> Ticket:
        """Opens a GPU -> HOST ticket for LRU GPU leaves covering `num_blocks` (HOST blocks allocated)."""
        return ticket_from_tuple(self._tree.begin_demote(num_blocks))

    def begin_promote(self, node_or_tokens: NodeHandle | TokenIds) -> Ticket:
        """Opens a HOST -> GPU ticket for the HOST nodes on the path to a node (or a prompt's match)."""
        if isinstance(node_or_tokens, int):
            node = node_or_tokens
        else:
            node = self.match_prefix(node_or_tokens).node
        return ticket_from_tuple(self._tree.begin_promote(node))

    def commit(self, ticket: Ticket | int, ok: bool) -> None:
        """Finishes a ticket: ok -> nodes switch tier; not ok -> tree exactly as before."""
        ticket_id = ticket.ticket_id if isinstance(ticket, Ticket) else ticket
        self._tree.commit(ticket_id, ok)

    def drain_events(self) -> list[CacheEvent]:
        """Returns and clears the events logged since the last call."""
        return [
            CacheEvent(EVENT_KINDS[kind], Tier(tier), parent_hash, hashes, tokens)
            for kind, tier, parent_hash, hashes, tokens in self._tree.drain_events()
        ]

    @property
    def num_nodes(self) -> int:
        return self._tree.num_nodes

    def num_tree_blocks(self, tier: Tier = Tier.GPU) -> int:
        """Blocks the tree owns in `tier` (cached or in use)."""
        return self._tree.num_tree_blocks(int(tier))

    @property
    def num_pending_demote_blocks(self) -> int:
        return self._tree.num_pending_demote_blocks

    @property
    def num_locks(self) -> int:
        return self._tree.num_locks

    def check_invariants(self) -> None:
        """Checks tree structure, lock counts, candidate sets and both pools; raises RuntimeError."""
        self._tree.check_invariants()


def hash_blocks(tokens: TokenIds, block_size: int, parent_hash: int = 0) -> list[int]:
    """Chained hashes of the whole blocks of `tokens` (the identity used by cache events)."""
    return _core.hash_blocks(tokens, block_size, parent_hash)
