"""Plain-Python model of the cache core: the same block pool, radix tree and evictor semantics as
the C++ code, written the straightforward way.

Property tests run random operation sequences through both and compare every result (ids, LRU
eviction order, events, invariants); `bench/bench_radix_tree.py` uses it as the baseline.
Not thread-safe. Errors are ValueError, like the C++ core's.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Sequence
from typing import Any

from pdserve.cache.types import (
    EVENT_KINDS,
    CacheEvent,
    EvictionPlan,
    InsertResult,
    MatchResult,
    Ticket,
    Tier,
)

MASK64 = (1 << 64) - 1


def hash_block(parent_hash: int, tokens: Sequence[int]) -> int:
    """The chained block hash of cpp/include/pdserve/block_hash.h, in Python."""
    h = parent_hash
    for t in tokens:
        h = ((h ^ (t & 0xFFFFFFFF)) * 0x9E3779B97F4A7C15) & MASK64
        h ^= h >> 29
    h ^= h >> 32
    h = (h * 0xD6E8FEB86659FD93) & MASK64
    return h ^ (h >> 32)


def hash_blocks(tokens: Sequence[int], block_size: int, parent_hash: int = 0) -> list[int]:
    out = []
    h = parent_hash
    for start in range(0, len(tokens) // block_size * block_size, block_size):
        h = hash_block(h, tokens[start : start + block_size])
        out.append(h)
    return out


def _as_list(tokens: Any) -> list[int]:
    return tokens if isinstance(tokens, list) else list(map(int, tokens))


class RefBlockPool:
    """Same states as the C++ pool: free (on a LIFO free list), cached (tree-owned, ref 0), in use."""

    def __init__(self, num_blocks: int, tier: Tier = Tier.GPU) -> None:
        if num_blocks < 0:
            raise ValueError(f"num_blocks must be >= 0, got {num_blocks}")
        self.tier = Tier(tier)
        self.num_total = num_blocks
        self.ref = [0] * num_blocks
        self.owned = [False] * num_blocks
        self.reserved = [False] * num_blocks
        self.free_stack = list(range(num_blocks - 1, -1, -1))
        self.reservations: dict[str, list[int]] = {}

    @property
    def num_free(self) -> int:
        return len(self.free_stack)

    @property
    def num_in_use(self) -> int:
        return sum(1 for r in self.ref if r > 0)

    @property
    def num_cached(self) -> int:
        return sum(1 for r, o in zip(self.ref, self.owned, strict=True) if r == 0 and o)

    @property
    def num_reserved(self) -> int:
        return sum(len(v) for v in self.reservations.values())

    def _check_id(self, block_id: int) -> None:
        if not 0 <= block_id < self.num_total:
            raise ValueError(f"unknown block id {block_id} in the {self.tier.name} pool")

    def can_allocate(self, num_blocks: int) -> bool:
        return 0 <= num_blocks <= len(self.free_stack)

    def allocate(self, num_blocks: int) -> list[int]:
        if not self.can_allocate(num_blocks):
            raise ValueError(f"cannot allocate {num_blocks} blocks: only {self.num_free} free")
        out = [self.free_stack.pop() for _ in range(num_blocks)]
        for b in out:
            self.ref[b] = 1
        return out

    def incref(self, block_ids: Sequence[int]) -> None:
        for b in block_ids:
            self._check_id(b)
            if self.ref[b] == 0 and not self.owned[b]:
                raise ValueError(f"incref: block {b} is free")
        for b in block_ids:
            self.ref[b] += 1

    def decref(self, block_ids: Sequence[int]) -> None:
        seen: dict[int, int] = {}
        for b in block_ids:
            self._check_id(b)
            left = self.ref[b] - seen.get(b, 0)
            if left <= 0:
                raise ValueError(f"decref: double free of block {b}")
            if left == 1 and self.reserved[b]:
                raise ValueError(f"decref: block {b} is held by a reservation")
            seen[b] = seen.get(b, 0) + 1
        for b in block_ids:
            self.ref[b] -= 1
            if self.ref[b] == 0 and not self.owned[b]:
                self.free_stack.append(b)

    def ref_count(self, block_id: int) -> int:
        self._check_id(block_id)
        return self.ref[block_id]

    def is_owned(self, block_id: int) -> bool:
        self._check_id(block_id)
        return self.owned[block_id]

    def reserve(self, request_id: str, num_blocks: int) -> list[int]:
        out = self.allocate(num_blocks)
        for b in out:
            self.reserved[b] = True
        self.reservations.setdefault(request_id, []).extend(out)
        return out

    def reserved_blocks(self, request_id: str) -> list[int]:
        return list(self.reservations.get(request_id, []))

    def release_reservation(self, request_id: str) -> int:
        held = self.reservations.pop(request_id, [])
        for b in held:
            self.reserved[b] = False
            self.ref[b] -= 1
            if self.ref[b] == 0 and not self.owned[b]:
                self.free_stack.append(b)
        return len(held)

    def transfer_reservation(self, request_id: str) -> list[int]:
        if request_id not in self.reservations:
            raise ValueError(f"transfer_reservation: no reservation for request id {request_id!r}")
        held = self.reservations.pop(request_id)
        for b in held:
            self.reserved[b] = False
        return held

    def adopt(self, block_ids: Sequence[int]) -> None:
        for b in block_ids:
            self._check_id(b)
            if self.owned[b]:
                raise ValueError(f"insert: block {b} is already owned by the radix tree")
            if self.ref[b] == 0:
                raise ValueError(f"insert: block {b} is free")
        if len(set(block_ids)) != len(block_ids):
            raise ValueError("insert: a block appears twice in block_ids")
        for b in block_ids:
            self.owned[b] = True

    def disown(self, block_ids: Sequence[int]) -> None:
        for b in block_ids:
            self.owned[b] = False
            if self.ref[b] == 0:
                self.free_stack.append(b)

    def check_invariants(self) -> None:
        free = set(self.free_stack)
        if len(free) != len(self.free_stack):
            raise RuntimeError("free list holds a block twice")
        for b in range(self.num_total):
            if (self.ref[b] == 0 and not self.owned[b]) != (b in free):
                raise RuntimeError(f"block {b}: ref {self.ref[b]}, owned {self.owned[b]}")
        if self.num_free + self.num_cached + self.num_in_use != self.num_total:
            raise RuntimeError("free + cached + in_use != total")


class _Node:
    __slots__ = (
        "id",
        "seq",
        "last_access",
        "parent",
        "tier",
        "lock_count",
        "ticket_id",
        "tokens",
        "block_ids",
        "pending",
        "hashes",
        "children",
    )

    def __init__(self, node_id: int) -> None:
        self.id = node_id
        self.seq = 0
        self.last_access = 0
        self.parent: _Node | None = None
        self.tier = Tier.GPU
        self.lock_count = 0
        self.ticket_id = 0
        self.tokens: list[int] = []
        self.block_ids: list[int] = []
        self.pending: list[int] = []
        self.hashes: list[int] = []
        self.children: dict[tuple[int, ...], _Node] = {}

    def key(self) -> tuple[int, int, int]:
        return (self.last_access, self.seq, self.id)


class RefRadixTree:
    """The C++ RadixTree's semantics in plain Python (see radix_tree.h for the rules)."""

    compare_whole_runs = False  # True: one slice comparison per node before the block loop

    def __init__(
        self,
        block_size: int,
        gpu_pool: RefBlockPool,
        host_pool: RefBlockPool | None = None,
        record_events: bool = True,
    ) -> None:
        if block_size <= 0:
            raise ValueError(f"block_size must be > 0, got {block_size}")
        self.block_size = block_size
        self.gpu_pool = gpu_pool
        self.host_pool = host_pool
        self.record_events = record_events
        self.root = _Node(0)
        self.nodes: dict[int, _Node] = {0: self.root}
        self.leaves: set[_Node] = set()
        self.next_node_id = 1
        self.seq = 0
        self.clock = 0
        self.locks: dict[int, _Node] = {}
        self.next_lock_id = 1
        self.tickets: dict[int, tuple[str, list[_Node]]] = {}
        self.next_ticket_id = 1
        self.events: list[CacheEvent] = []

    @property
    def has_host_tier(self) -> bool:
        return self.host_pool is not None

    def _pool(self, tier: int) -> RefBlockPool:
        return self.gpu_pool if tier == Tier.GPU else self.host_pool  # type: ignore[return-value]

    # ------------------------------------------------------------------ structure
    def _new_node(self) -> _Node:
        node = _Node(self.next_node_id)
        self.next_node_id += 1
        self.nodes[node.id] = node
        return node

    def _add_child(self, parent: _Node, child: _Node) -> None:
        child.parent = parent
        parent.children[tuple(child.tokens[: self.block_size])] = child
        self.leaves.discard(parent)

    def _split(self, node: _Node, k: int) -> _Node:
        """Cuts `node` after k blocks; the new upper node takes its place, `node` keeps the rest."""
        ntok = k * self.block_size
        upper = self._new_node()
        upper.seq, upper.last_access, upper.tier = node.seq, node.last_access, node.tier
        upper.lock_count, upper.ticket_id = node.lock_count, node.ticket_id
        upper.tokens, node.tokens = node.tokens[:ntok], node.tokens[ntok:]
        upper.block_ids, node.block_ids = node.block_ids[:k], node.block_ids[k:]
        if node.pending:
            upper.pending, node.pending = node.pending[:k], node.pending[k:]
        if node.hashes:
            upper.hashes, node.hashes = node.hashes[:k], node.hashes[k:]
        parent = node.parent
        upper.parent = parent
        parent.children[tuple(upper.tokens[: self.block_size])] = upper
        self._add_child(upper, node)
        if node.ticket_id:
            self.tickets[node.ticket_id][1].append(upper)
        return upper

    def _walk(self, tokens: list[int]) -> tuple[list[_Node], int, _Node | None, int]:
        """Fully matched path, matched token count, and a partially matched node + its blocks.

        Compares block by block (as SGLang's Python RadixCache does for pages); with
        `compare_whole_runs` it first tries one slice comparison of the whole overlap.
        """
        bs = self.block_size
        end = len(tokens) // bs * bs
        node, pos, path = self.root, 0, []
        while pos < end:
            child = node.children.get(tuple(tokens[pos : pos + bs]))
            if child is None:
                break
            ctoks = child.tokens
            avail = min(len(ctoks), end - pos)
            if self.compare_whole_runs and tokens[pos : pos + avail] == ctoks[:avail]:
                k = avail // bs
            else:
                k = 1  # the first block matched the child's key
                while k * bs < avail and (
                    tokens[pos + k * bs : pos + (k + 1) * bs] == ctoks[k * bs : (k + 1) * bs]
                ):
                    k += 1
            pos += k * bs
            if k * bs < len(ctoks):
                return path, pos, child, k
            path.append(child)
            node = child
        return path, pos, None, 0

    def _log(self, kind: str, tier: int, node: _Node, with_tokens: bool) -> None:
        if not self.record_events:
            return
        parent = node.parent
        parent_hash = 0 if parent is self.root else parent.hashes[-1]
        tokens = list(node.tokens) if with_tokens else []
        self.events.append(CacheEvent(kind, Tier(tier), parent_hash, list(node.hashes), tokens))

    # ------------------------------------------------------------------ API
    def match_prefix(self, tokens: Any) -> MatchResult:
        tokens = _as_list(tokens)
        self.clock += 1
        path, pos, partial, k = self._walk(tokens)
        if partial is not None:
            path.append(self._split(partial, k))
        block_ids: list[int] = []
        tiers: list[int] = []
        for node in path:
            node.last_access = self.clock
            block_ids += node.block_ids
            tiers += [node.tier] * len(node.block_ids)
        return MatchResult(pos, block_ids, tiers, path[-1].id if path else 0)

    def insert(self, tokens: Any, block_ids: Sequence[int]) -> InsertResult:
        tokens = _as_list(tokens)
        block_ids = _as_list(block_ids)
        bs = self.block_size
        nblocks = len(tokens) // bs
        if len(block_ids) not in (nblocks, -(-len(tokens) // bs)):
            raise ValueError(f"insert: got {len(block_ids)} block ids for {len(tokens)} tokens")
        for b in block_ids[:nblocks]:
            if not 0 <= b < self.gpu_pool.num_total:
                raise ValueError(f"insert: unknown block id {b}")
        path, pos, partial, k = self._walk(tokens)
        matched = pos // bs
        if matched < nblocks:
            self.gpu_pool.adopt(block_ids[matched:nblocks])
        self.clock += 1
        duplicates = []
        i = 0
        for node in path + ([partial] if partial is not None else []):
            for b in node.block_ids[: k if node is partial else None]:
                if node.tier != Tier.GPU or b != block_ids[i]:
                    duplicates.append(block_ids[i])
                i += 1
        if partial is not None:
            path.append(self._split(partial, k) if matched < nblocks else partial)
        for node in path:
            node.last_access = self.clock
        if matched == nblocks:
            return InsertResult(0, [], duplicates)
        parent = path[-1] if path else self.root
        node = self._new_node()
        self.seq += 1
        node.seq, node.last_access = self.seq, self.clock
        node.tokens = tokens[matched * bs : nblocks * bs]
        node.block_ids = block_ids[matched:nblocks]
        if self.record_events:
            node.hashes = hash_blocks(
                node.tokens, bs, 0 if parent is self.root else parent.hashes[-1]
            )
        self._add_child(parent, node)
        self.leaves.add(node)
        self._log("inserted", Tier.GPU, node, True)
        return InsertResult(len(node.block_ids), list(node.block_ids), duplicates)

    def _node(self, handle: int, what: str) -> _Node:
        node = self.nodes.get(handle)
        if node is None:
            raise ValueError(f"{what}: unknown or evicted node handle {handle}")
        return node

    def _path_up(self, node: _Node):
        while node is not self.root:
            yield node
            node = node.parent

    def lock(self, node_handle: int) -> int:
        target = self._node(node_handle, "lock")
        for node in self._path_up(target):
            self._pool(node.tier).incref(node.block_ids)
            node.lock_count += 1
        handle = self.next_lock_id
        self.next_lock_id += 1
        self.locks[handle] = target
        return handle

    def unlock(self, handle: int) -> None:
        target = self.locks.pop(handle, None)
        if target is None:
            raise ValueError(f"unlock: unknown or already released lock handle {handle}")
        for node in self._path_up(target):
            self._pool(node.tier).decref(node.block_ids)
            node.lock_count -= 1

    def _evictable(self, node: _Node, tier: int) -> bool:
        return (
            node is not self.root
            and node.tier == tier
            and not node.children
            and node.lock_count == 0
            and node.ticket_id == 0
        )

    def _remove(self, node: _Node) -> None:
        parent = node.parent
        del parent.children[tuple(node.tokens[: self.block_size])]
        del self.nodes[node.id]
        self.leaves.discard(node)
        if not parent.children and parent is not self.root:
            self.leaves.add(parent)

    def evict(self, num_blocks: int, tier: int = Tier.GPU) -> list[int]:
        if tier == Tier.HOST and self.host_pool is None:
            raise ValueError("evict: tier HOST requested but the tree has no host pool")
        if num_blocks < 0:
            raise ValueError(f"evict: num_blocks must be >= 0, got {num_blocks}")
        pool = self._pool(tier)
        heap = [(n.key(), n) for n in self.leaves if self._evictable(n, tier)]
        heapq.heapify(heap)
        freed: list[int] = []
        while len(freed) < num_blocks and heap:
            _, node = heapq.heappop(heap)
            if any(pool.ref[b] for b in node.block_ids):
                continue  # referenced outside the tree
            self._log("evicted", tier, node, False)
            pool.disown(node.block_ids)
            freed += node.block_ids
            self._remove(node)
            parent = node.parent
            if self._evictable(parent, tier):
                heapq.heappush(heap, (parent.key(), parent))
        return freed

    def _open_ticket(self, kind: str) -> tuple[int, list[_Node]]:
        ticket_id = self.next_ticket_id
        self.next_ticket_id += 1
        nodes: list[_Node] = []
        self.tickets[ticket_id] = (kind, nodes)
        return ticket_id, nodes

    def begin_demote(self, num_blocks: int) -> Ticket:
        if self.host_pool is None:
            raise ValueError("begin_demote: the tree has no host pool to demote into")
        if num_blocks < 0:
            raise ValueError(f"begin_demote: num_blocks must be >= 0, got {num_blocks}")
        candidates = sorted(
            (n.key(), n)
            for n in self.nodes.values()
            if n is not self.root
            and n.tier == Tier.GPU
            and n.lock_count == 0
            and n.ticket_id == 0
            and not any(c.tier == Tier.GPU for c in n.children.values())
        )
        ticket_id, nodes = self._open_ticket("demote")
        src: list[int] = []
        dst: list[int] = []
        for _, node in candidates:
            if len(src) >= num_blocks:
                break
            if any(self.gpu_pool.ref[b] for b in node.block_ids):
                continue
            if not self.host_pool.can_allocate(len(node.block_ids)):
                break
            node.pending = self.host_pool.allocate(len(node.block_ids))
            node.ticket_id = ticket_id
            nodes.append(node)
            src += node.block_ids
            dst += node.pending
        return Ticket(ticket_id, "demote", Tier.GPU, Tier.HOST, src, dst)

    def begin_promote(self, node_or_tokens: Any) -> Ticket:
        if isinstance(node_or_tokens, int):
            target = self._node(node_or_tokens, "begin_promote")
        else:
            target = self._node(self.match_prefix(node_or_tokens).node, "begin_promote")
        todo = [n for n in self._path_up(target) if n.tier == Tier.HOST and n.ticket_id == 0]
        todo.reverse()
        need = sum(len(n.block_ids) for n in todo)
        if not self.gpu_pool.can_allocate(need):
            raise ValueError(f"begin_promote: need {need} free GPU blocks")
        ticket_id, nodes = self._open_ticket("promote")
        src: list[int] = []
        dst: list[int] = []
        for node in todo:
            node.pending = self.gpu_pool.allocate(len(node.block_ids))
            node.ticket_id = ticket_id
            nodes.append(node)
            src += node.block_ids
            dst += node.pending
        return Ticket(ticket_id, "promote", Tier.HOST, Tier.GPU, src, dst)

    def commit(self, ticket: Ticket | int, ok: bool) -> None:
        ticket_id = ticket.ticket_id if isinstance(ticket, Ticket) else ticket
        if ticket_id not in self.tickets:
            raise ValueError(f"commit: unknown or already committed ticket id {ticket_id}")
        kind, nodes = self.tickets.pop(ticket_id)
        demote = kind == "demote"
        src_pool = self._pool(Tier.GPU if demote else Tier.HOST)
        dst_tier = Tier.HOST if demote else Tier.GPU
        dst_pool = self._pool(dst_tier)
        for node in nodes:
            node.ticket_id = 0
            if ok and not (demote and node.lock_count > 0):
                for _ in range(node.lock_count):
                    dst_pool.incref(node.pending)
                    src_pool.decref(node.block_ids)
                dst_pool.adopt(node.pending)
                dst_pool.decref(node.pending)
                src_pool.disown(node.block_ids)
                node.block_ids = node.pending
                node.tier = dst_tier
                self._log("demoted" if demote else "promoted", dst_tier, node, False)
            else:
                dst_pool.decref(node.pending)
            node.pending = []

    def drain_events(self) -> list[CacheEvent]:
        events, self.events = self.events, []
        return events

    @property
    def num_nodes(self) -> int:
        return len(self.nodes) - 1

    def num_tree_blocks(self, tier: int = Tier.GPU) -> int:
        return sum(len(n.block_ids) for n in self.nodes.values() if n.tier == tier)

    @property
    def num_pending_demote_blocks(self) -> int:
        return sum(
            len(n.block_ids)
            for kind, nodes in self.tickets.values()
            if kind == "demote"
            for n in nodes
        )

    @property
    def num_locks(self) -> int:
        return len(self.locks)

    def check_invariants(self) -> None:
        for node in self.nodes.values():
            if node is self.root:
                continue
            for b in node.block_ids:
                if not self._pool(node.tier).owned[b]:
                    raise RuntimeError(f"block {b} of node {node.id} is not owned")
        self.gpu_pool.check_invariants()
        if self.host_pool is not None:
            self.host_pool.check_invariants()


class RefEvictor:
    """The C++ Evictor's watermark arithmetic over a RefRadixTree."""

    def __init__(
        self,
        tree: RefRadixTree,
        gpu_high: float,
        gpu_low: float,
        host_high: float | None = None,
        host_low: float | None = None,
    ) -> None:
        self.tree = tree
        self.gpu_high, self.gpu_low = gpu_high, gpu_low
        self.host_high = gpu_high if host_high is None else host_high
        self.host_low = gpu_low if host_low is None else host_low
        for name, high, low in (
            ("GPU", gpu_high, gpu_low),
            ("HOST", self.host_high, self.host_low),
        ):
            if not 0.0 <= low <= high <= 1.0:
                raise ValueError(f"Evictor: {name} watermarks must satisfy 0 <= low <= high <= 1")

    @staticmethod
    def _over(used: int, total: int, high: float, low: float) -> int:
        if total == 0 or used <= high * total:
            return 0
        return max(used - math.floor(low * total), 0)

    def plan(self) -> EvictionPlan:
        tree = self.tree
        freed_host: list[int] = []
        host = tree.host_pool
        if host is not None:
            need = self._over(
                host.num_total - host.num_free, host.num_total, self.host_high, self.host_low
            )
            if need > 0:
                freed_host = tree.evict(need, Tier.HOST)
        gpu = tree.gpu_pool
        used = gpu.num_total - gpu.num_free - tree.num_pending_demote_blocks
        need = self._over(used, gpu.num_total, self.gpu_high, self.gpu_low)
        ticket = None
        freed_gpu: list[int] = []
        if need <= 0:
            return EvictionPlan(None, [], freed_host)
        if host is not None:
            opened = tree.begin_demote(need)
            if opened.src_block_ids:
                ticket = opened
            else:
                tree.commit(opened.ticket_id, False)
            need -= len(opened.src_block_ids)
        if need > 0:
            freed_gpu = tree.evict(need, Tier.GPU)
        return EvictionPlan(ticket, freed_gpu, freed_host)


__all__ = ["EVENT_KINDS", "RefBlockPool", "RefEvictor", "RefRadixTree", "hash_block", "hash_blocks"]
