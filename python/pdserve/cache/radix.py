"""Typed wrapper of the C++ radix tree (`pdserve._core.RadixTree`): the prefix cache of one instance.

The wrapper subclasses the extension class: match_prefix / insert / lock / evict run without a
Python frame and return the dataclasses of `pdserve.cache.types`, block ids as `BlockIds` (immutable
int32 sequences, no Python int per id). Token ids may be Python lists or 1-D numpy int32/int64
arrays (contiguous int32 arrays are read in place, the fastest input); block ids also a BlockIds.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from pdserve import _core
from pdserve.cache.pool import BlockPool
from pdserve.cache.types import NodeHandle, Ticket

TokenIds = Sequence[int] | Any  # list / tuple of ints or a 1-D numpy integer array


class RadixTree(_core.RadixTree):
    """Radix tree over token ids at block granularity (only whole blocks are cached).

    - `match_prefix(tokens) -> MatchResult(num_tokens, block_ids, tiers, node)`: touches the path.
    - `insert(tokens, block_ids) -> InsertResult(num_adopted, adopted_block_ids,
      duplicate_block_ids)`: `block_ids[i]` holds tokens `[i*bs, (i+1)*bs)` (one extra id for a
      trailing partial block is allowed and ignored). The caller keeps its references.
    - `lock(node) -> LockHandle`, `unlock(handle)`: pin the root->node path.
    - `evict(num_blocks, tier=Tier.GPU) -> BlockIds`: LRU unlocked, unreferenced leaves first.
    - Block ids in results (`block_ids`, `tiers`, adopted / duplicate ids, ticket ids) are
      `BlockIds`: immutable, equal to the list of the same ids; `.tolist()` where a list is needed.
    - `begin_demote(num_blocks) -> Ticket`, `begin_promote(node | tokens) -> Ticket`,
      `commit(ticket | ticket_id, ok)`: two-step tier moves; a failed commit changes nothing.
    - `drain_events() -> list[CacheEvent]`; `num_nodes`, `num_tree_blocks(tier)`,
      `num_pending_demote_blocks`, `num_locks`, `check_invariants()`.

    LRU order comes from a logical clock advanced by every match_prefix / insert; ties go to the
    older insertion. Thread-safe (a mutex per tree; lock order tree -> pool); every call that walks
    the tree releases the GIL. See docs/DESIGN.md §1 and cpp/include/pdserve/radix_tree.h.
    """

    def __init__(
        self,
        block_size: int,
        gpu_pool: BlockPool,
        host_pool: BlockPool | None = None,
        record_events: bool = True,
    ) -> None:
        super().__init__(block_size, gpu_pool, host_pool, record_events)
        self.gpu_pool = gpu_pool
        self.host_pool = host_pool

    def begin_promote(self, node_or_tokens: NodeHandle | TokenIds) -> Ticket:
        """Opens a HOST -> GPU ticket for the HOST nodes on the path to a node, or to the longest
        cached prefix of a prompt (which is matched, touching it). Raises ValueError, taking
        nothing, when the GPU pool lacks the blocks."""
        if isinstance(node_or_tokens, int):
            node = node_or_tokens
        else:
            node = self.match_prefix(node_or_tokens).node
        return super().begin_promote(node)

    def commit(self, ticket: Ticket | int, ok: bool) -> None:
        """Finishes a ticket: ok -> the nodes switch tier and their source blocks are freed;
        not ok -> the destination blocks are freed and the tree is exactly as before."""
        super().commit(ticket.ticket_id if isinstance(ticket, Ticket) else ticket, ok)


def hash_blocks(tokens: TokenIds, block_size: int, parent_hash: int = 0) -> list[int]:
    """Chained hashes of the whole blocks of `tokens` (the identity used by cache events)."""
    return _core.hash_blocks(tokens, block_size, parent_hash)
