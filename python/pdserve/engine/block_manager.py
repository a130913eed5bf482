"""Gives sequences KV block ids from the C++ block pool and reuses cached prefixes through the C++ radix tree.

Policy lives in the scheduler; this is mechanism only, on plain ints (no torch). Every method is
check-then-act: `can_grow` before `grow`, and `reserve` raises NoCapacity having taken nothing.
Ownership rule: a sequence holds exactly one pool reference on each id in `seq.block_ids`
(cached prefix blocks included, through incref), so releasing a sequence is one decref of its list.
The cache core returns block ids as immutable `BlockIds`; block tables and reservations here are
plain lists (`tolist()`), since sequences grow them and the servers send them as JSON.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from pdserve.cache import BlockPool, Evictor, RadixTree, Ticket, Tier
from pdserve.engine.sequence import Sequence


class NoCapacity(RuntimeError):
    """Not enough free or evictable KV blocks; nothing was taken."""


@dataclass
class Reservation:
    """Decode-side blocks for a request that will arrive from a prefill instance.

    cached_block_ids hold tokens [0, num_cached_tokens) already (radix hit); new_block_ids receive
    the rest, block i covering prompt tokens [num_cached_tokens + i*block_size, ...).
    """

    request_id: str
    num_cached_tokens: int
    cached_block_ids: list[int]
    new_block_ids: list[int]
    prompt_token_ids: list[int] = field(default_factory=list, repr=False)

    @property
    def block_ids(self) -> list[int]:
        return self.cached_block_ids + self.new_block_ids


class BlockManager:
    def __init__(
        self,
        num_blocks: int,
        block_size: int,
        enable_radix_caching: bool,
        evictor_watermarks: tuple[float, float] | None = None,
        num_host_blocks: int = 0,
        copy_blocks: Callable[[Ticket], bool] | None = None,
    ):
        """evictor_watermarks (high, low): run the C++ watermark evictor after each step (caching only).
        num_host_blocks > 0 adds the HOST tier (caching only): cached prefixes are demoted there
        instead of dropped, and promoted back on a match; copy_blocks(ticket) copies a ticket's
        blocks between the tiers' memories and returns whether it succeeded."""
        self.block_size = block_size
        self.pool = BlockPool(num_blocks, Tier.GPU)
        self.host_pool = (
            BlockPool(num_host_blocks, Tier.HOST)
            if enable_radix_caching and num_host_blocks > 0
            else None
        )
        if self.host_pool is not None and copy_blocks is None:
            raise ValueError("a host tier needs copy_blocks to move blocks between the tiers")
        self._copy_blocks = copy_blocks
        self.tree = (
            RadixTree(block_size, self.pool, self.host_pool) if enable_radix_caching else None
        )
        self.evictor = (
            Evictor(self.tree, *evictor_watermarks)
            if self.tree is not None and evictor_watermarks is not None
            else None
        )
        self.num_evicted_blocks = 0  # by the watermark evictor (stats)
        self.num_demoted_blocks = 0
        self.num_promoted_blocks = 0
        self._reservations: dict[str, Reservation] = {}
        self.num_hit_tokens = 0  # cumulative radix-hit tokens (stats)

    # ---- sizing -------------------------------------------------------------------------------
    @property
    def num_total_blocks(self) -> int:
        return self.pool.num_total

    def num_blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def num_available_blocks(self) -> int:
        """Free blocks plus cached ones (evictable on demand)."""
        return self.pool.num_free + (self.pool.num_cached if self.tree is not None else 0)

    def _run_ticket(self, ticket: Ticket) -> bool:
        """Copies a demote/promote ticket's blocks and commits it; False (tree as before) on failure."""
        if not ticket.src_block_ids:
            self.tree.commit(ticket.ticket_id, True)
            return True
        ok = bool(self._copy_blocks(ticket))
        self.tree.commit(ticket.ticket_id, ok)
        if ok and ticket.kind == "demote":
            self.num_demoted_blocks += len(ticket.src_block_ids)
        elif ok:
            self.num_promoted_blocks += len(ticket.src_block_ids)
        return ok

    def _make_room(self, num_blocks: int) -> None:
        """Frees GPU blocks until num_blocks are free (or nothing more can go): demotes cached prefixes
        to the host tier when there is one (making host room by dropping its LRU prefixes), then drops
        what remains."""
        if self.tree is None:
            return
        while (short := num_blocks - self.pool.num_free) > 0:
            if self.host_pool is not None and self._demote_round(short):
                continue
            if len(self.tree.evict(short, Tier.GPU)):
                continue
            if self.host_pool is None or self.pool.num_cached == 0:
                return  # the GPU holds no cached block that more work could free
            # what is left is GPU prefixes with children in the host tier, too big for the host's
            # free room: dropping host leaves makes them leaves (evictable) or makes room to demote
            if not len(self.tree.evict(short, Tier.HOST)):
                return

    def _demote_round(self, num_blocks: int) -> bool:
        """Demotes up to num_blocks of the LRU GPU leaves to the host tier; True if any moved. One ticket
        takes the current leaves only (a parent keeps its GPU child until the commit), so a chain of
        nodes (a prefix cached step by step while its request ran) takes a round per node."""
        if self.host_pool.num_free < num_blocks:
            self.tree.evict(num_blocks - self.host_pool.num_free, Tier.HOST)
        ticket = self.tree.begin_demote(num_blocks)
        return self._run_ticket(ticket) and len(ticket.src_block_ids) > 0

    def _take(self, num_blocks: int) -> list[int]:
        """Allocates num_blocks, demoting/evicting cached prefixes first if needed. Caller checked capacity."""
        if num_blocks <= 0:
            return []
        self._make_room(num_blocks)
        if not self.pool.can_allocate(num_blocks):
            raise NoCapacity(
                f"need {num_blocks} KV blocks, {self.pool.num_free} free after eviction"
            )
        return self.pool.allocate(num_blocks).tolist()

    # ---- sequences ----------------------------------------------------------------------------
    def match_prefix(self, token_ids: list[int], max_num_tokens: int) -> tuple[int, list[int]]:
        """Longest cached prefix of at most max_num_tokens tokens (whole blocks), host-tier blocks
        promoted to the GPU first when there is room. Returns (num_tokens, gpu_block_ids); the
        caller owns one new reference on each id."""
        if self.tree is None or max_num_tokens < self.block_size:
            return 0, []
        max_blocks = max_num_tokens // self.block_size
        # matched no further than max_blocks, so the tree splits a node there: a tail of a node we
        # hold would count as cached (ref count 0) yet could not be evicted while we hold the rest
        tokens = list(token_ids[: max_blocks * self.block_size])
        match = self.tree.match_prefix(tokens)
        block_ids = self._leading_gpu_blocks(match, max_blocks, 0)
        if block_ids:
            self.pool.incref(block_ids)  # also keeps them from being demoted while we promote
        num_host = sum(1 for t in match.tiers if int(t) == int(Tier.HOST))
        if (
            self.host_pool is not None
            and num_host
            and len(block_ids) < max_blocks
            and self.num_available_blocks() >= num_host
        ):
            self._make_room(num_host)
            ticket = None
            if self.pool.num_free >= num_host:
                try:
                    ticket = self.tree.begin_promote(match.node)
                except ValueError:  # the host part was dropped while making room: use what we have
                    ticket = None
            if ticket is not None:
                if self._run_ticket(ticket):
                    more = self._leading_gpu_blocks(
                        self.tree.match_prefix(tokens), max_blocks, len(block_ids)
                    )
                    if more:
                        self.pool.incref(more)
                    block_ids += more
        return len(block_ids) * self.block_size, block_ids

    @staticmethod
    def _leading_gpu_blocks(match, max_blocks: int, start: int) -> list[int]:
        """GPU-tier block ids of the match from index start, up to the first non-GPU one or max_blocks."""
        ids = []
        for block_id, tier in list(zip(match.block_ids, match.tiers, strict=True))[
            start:max_blocks
        ]:
            if int(tier) != int(Tier.GPU):
                break
            ids.append(int(block_id))
        return ids

    def admit(self, seq: Sequence) -> None:
        """Attach the cached prefix to a sequence that holds no blocks. At least one token stays
        uncomputed so the step that completes the prompt produces logits."""
        assert not seq.block_ids and seq.num_computed_tokens == 0
        if seq.wants_prompt_logprobs:  # cached KV has no logits: compute the whole prompt
            return
        num_tokens, block_ids = self.match_prefix(seq.token_ids, seq.num_tokens - 1)
        seq.block_ids = block_ids
        seq.num_computed_tokens = num_tokens
        seq.num_cached_tokens = num_tokens
        seq.num_tree_blocks = len(block_ids)
        self.num_hit_tokens += num_tokens

    def num_missing_blocks(self, seq: Sequence, num_tokens: int) -> int:
        return max(0, self.num_blocks_for(num_tokens) - len(seq.block_ids))

    def can_grow(self, seq: Sequence, num_tokens: int) -> bool:
        """True when grow(seq, num_tokens) would succeed."""
        return self.num_missing_blocks(seq, num_tokens) <= self.num_available_blocks()

    def grow(self, seq: Sequence, num_tokens: int) -> None:
        """Make seq.block_ids cover num_tokens tokens. Raises NoCapacity (nothing taken) if it can't."""
        seq.block_ids.extend(self._take(self.num_missing_blocks(seq, num_tokens)))

    def cache_computed(self, seq: Sequence) -> None:
        """Offers the tree the whole prompt blocks seq has computed since the last call, while seq still
        runs, so a request sharing the prefix (a system prompt, another choice of the same prompt)
        hits it now rather than when seq ends (which offers the generated blocks too). seq keeps its
        references, so none of them can be evicted while it runs; a whole computed block is never
        written again (block tables are append-only). Prompt blocks only: a prefix is shared while
        its request runs, an answer rarely; and each offer walks the path from the root.

        Only a path made of seq's own blocks grows: where the tree caches seq's leading tokens in
        other blocks (a twin computed in the same step), blocks adopted below them would keep their
        ancestors, which seq does not hold, from ever being evicted. Such a sequence waits for its
        release, when nothing holds the new leaf any more."""
        if self.tree is None:
            return
        num_computed = min(seq.num_computed_tokens, seq.num_prompt_tokens)
        num_whole = min(num_computed // self.block_size, len(seq.block_ids))
        if num_whole <= seq.num_tree_blocks:
            return
        seq.num_tree_blocks = num_whole
        tokens = seq.token_ids[: num_whole * self.block_size]
        match = self.tree.match_prefix(tokens)
        num_matched = len(match.block_ids)
        if [int(b) for b in match.block_ids] != seq.block_ids[:num_matched] or any(
            int(t) != int(Tier.GPU) for t in match.tiers
        ):
            return
        if num_matched < num_whole:
            self.tree.insert(tokens, seq.block_ids[:num_whole])

    def release(self, seq: Sequence, cache: bool = True) -> None:
        """Drop the sequence's blocks; with radix caching its computed whole blocks go to the tree first."""
        if self.tree is not None and cache and seq.block_ids:
            self.insert_cached(seq.token_ids[: seq.num_computed_tokens], seq.block_ids)
        if seq.block_ids:
            self.pool.decref(seq.block_ids)
        seq.block_ids = []
        seq.num_computed_tokens = 0
        seq.num_tree_blocks = 0

    def insert_cached(self, token_ids: list[int], block_ids: list[int]) -> int:
        """Puts the whole blocks of token_ids (block i = block_ids[i]) into the tree. The caller keeps
        its references (drop them as usual); returns how many blocks the tree adopted (0 without caching)."""
        if self.tree is None:
            return 0
        num_blocks = min(len(token_ids) // self.block_size, len(block_ids))
        if num_blocks == 0:
            return 0
        result = self.tree.insert(
            list(token_ids[: num_blocks * self.block_size]), list(block_ids[:num_blocks])
        )
        return int(result.num_adopted)

    # ---- decode-side reservations -------------------------------------------------------------
    def reserve(
        self, request_id: str, prompt_token_ids: list[int], count_hits: bool = True
    ) -> Reservation:
        """Locks the cached prefix and reserves blocks for the rest of the prompt. Raises NoCapacity
        (nothing taken) when it cannot, ValueError for a request id already reserved. count_hits:
        add the cached prefix to `num_hit_tokens` (False for locks that only move KV back)."""
        if request_id in self._reservations:
            raise ValueError(f"request {request_id!r} already holds a reservation")
        num_cached, cached_ids = self.match_prefix(prompt_token_ids, len(prompt_token_ids))
        num_new = self.num_blocks_for(len(prompt_token_ids)) - len(cached_ids)
        if num_new > self.num_available_blocks():
            if cached_ids:
                self.pool.decref(cached_ids)
            raise NoCapacity(
                f"request {request_id!r} needs {num_new} KV blocks, "
                f"{self.num_available_blocks()} free or evictable of {self.pool.num_total}"
            )
        try:
            self._make_room(num_new)
            new_ids = self.pool.reserve(request_id, num_new).tolist() if num_new > 0 else []
        except BaseException:
            if cached_ids:
                self.pool.decref(cached_ids)
            raise
        reservation = Reservation(
            request_id, num_cached, cached_ids, new_ids, list(prompt_token_ids)
        )
        self._reservations[request_id] = reservation
        if count_hits:
            self.num_hit_tokens += num_cached
        return reservation

    def has_reservation(self, request_id: str) -> bool:
        return request_id in self._reservations

    def get_reservation(self, request_id: str) -> Reservation | None:
        """The open reservation of request_id (still held by the pool), or None."""
        return self._reservations.get(request_id)

    @property
    def num_reservations(self) -> int:
        return len(self._reservations)

    def take_reservation(self, request_id: str) -> Reservation:
        """Ends the reservation; the caller now owns one reference on every id in .block_ids."""
        reservation = self._reservations.pop(request_id)
        if reservation.new_block_ids:
            self.pool.transfer_reservation(request_id)
        return reservation

    def release_reservation(self, request_id: str) -> int:
        """Drops every block the reservation holds; returns how many (0 for an unknown id)."""
        reservation = self._reservations.pop(request_id, None)
        if reservation is None:
            return 0
        if reservation.cached_block_ids:
            self.pool.decref(reservation.cached_block_ids)
        released = (
            int(self.pool.release_reservation(request_id)) if reservation.new_block_ids else 0
        )
        return released + len(reservation.cached_block_ids)

    def run_evictor(self) -> int:
        """Brings pool use under the low watermark when above the high one; returns blocks freed."""
        if self.evictor is None:
            return 0
        plan = self.evictor.plan()
        freed = len(plan.freed_gpu_block_ids)
        if plan.demote_ticket is not None and self._run_ticket(plan.demote_ticket):
            freed += len(plan.demote_ticket.src_block_ids)
        self.num_evicted_blocks += freed
        return freed

    def check_invariants(self) -> None:
        """Raises if the pools' accounting or the tree's structure is broken."""
        if self.tree is not None:
            self.tree.check_invariants()  # checks both pools too
        else:
            self.pool.check_invariants()
