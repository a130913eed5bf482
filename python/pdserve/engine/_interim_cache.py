"""TEMPORARY stand-in for the C++ cache core (DESIGN §1) until branch `core` lands; deleted on merge.

Only the subset the engine calls, same names and semantics, no performance.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field


class Tier(enum.IntEnum):
    GPU = 0
    HOST = 1


class BlockPool:
    def __init__(self, num_blocks: int, tier: Tier = Tier.GPU):
        self.num_total = num_blocks
        self.tier = tier
        self._free = list(range(num_blocks - 1, -1, -1))
        self._ref = [0] * num_blocks
        self._owned = [False] * num_blocks
        self._reservations: dict[str, list[int]] = {}

    num_free = property(lambda self: len(self._free))
    num_in_use = property(lambda self: sum(1 for r in self._ref if r > 0))
    num_cached = property(
        lambda self: sum(1 for r, o in zip(self._ref, self._owned, strict=False) if r == 0 and o)
    )
    num_reserved = property(lambda self: sum(len(v) for v in self._reservations.values()))

    def can_allocate(self, n: int) -> bool:
        return 0 <= n <= len(self._free)

    def allocate(self, n: int) -> list[int]:
        if not self.can_allocate(n):
            raise ValueError(f"cannot allocate {n} blocks, {len(self._free)} free")
        ids = [self._free.pop() for _ in range(n)]
        for b in ids:
            self._ref[b] = 1
        return ids

    def incref(self, ids: list[int]) -> None:
        for b in ids:
            if self._ref[b] == 0 and not self._owned[b]:
                raise ValueError(f"incref of free block {b}")
        for b in ids:
            self._ref[b] += 1

    def decref(self, ids: list[int]) -> None:
        for b in ids:
            if self._ref[b] <= 0:
                raise ValueError(f"double free of block {b}")
        for b in ids:
            self._ref[b] -= 1
            if self._ref[b] == 0 and not self._owned[b]:
                self._free.append(b)

    def reserve(self, request_id: str, n: int) -> list[int]:
        ids = self.allocate(n)
        self._reservations.setdefault(request_id, []).extend(ids)
        return ids

    def reserved_blocks(self, request_id: str) -> list[int]:
        return list(self._reservations.get(request_id, []))

    def release_reservation(self, request_id: str) -> int:
        ids = self._reservations.pop(request_id, [])
        self.decref(ids)
        return len(ids)

    def transfer_reservation(self, request_id: str) -> list[int]:
        return self._reservations.pop(request_id, [])

    def check_invariants(self) -> None:
        if self.num_free + self.num_cached + self.num_in_use != self.num_total:
            raise RuntimeError(
                f"free {self.num_free} + cached {self.num_cached} + in_use {self.num_in_use} != {self.num_total}"
            )


@dataclass
class _Node:
    key: tuple[int, ...]
    block_id: int
    parent: _Node | None
    children: dict[tuple[int, ...], _Node] = field(default_factory=dict)
    last_use: int = 0


@dataclass
class MatchResult:
    num_tokens: int
    block_ids: list[int]
    tiers: list[int]
    node: object


@dataclass
class InsertResult:
    num_adopted: int
    adopted_block_ids: list[int]
    duplicate_block_ids: list[int]


class RadixTree:
    def __init__(self, block_size: int, gpu_pool: BlockPool, host_pool: BlockPool | None = None):
        self.block_size = block_size
        self.pool = gpu_pool
        self.root = _Node((), -1, None)
        self._clock = 0
        self._events: list[tuple] = []

    def _blocks(self, tokens: list[int]):
        bs = self.block_size
        return [tuple(tokens[i * bs : (i + 1) * bs]) for i in range(len(tokens) // bs)]

    def match_prefix(self, tokens: list[int]) -> MatchResult:
        self._clock += 1
        node, ids = self.root, []
        for key in self._blocks(tokens):
            child = node.children.get(key)
            if child is None:
                break
            child.last_use = self._clock
            ids.append(child.block_id)
            node = child
        return MatchResult(len(ids) * self.block_size, ids, [Tier.GPU] * len(ids), node)

    def insert(self, tokens: list[int], block_ids: list[int]) -> InsertResult:
        self._clock += 1
        node, adopted, dup = self.root, [], []
        for key, block_id in zip(self._blocks(tokens), block_ids, strict=False):
            child = node.children.get(key)
            if child is None:
                child = _Node(key, block_id, node, last_use=self._clock)
                node.children[key] = child
                self.pool._owned[block_id] = True
                adopted.append(block_id)
            elif child.block_id != block_id:
                dup.append(block_id)
            child.last_use = self._clock
            node = child
        if adopted:
            self._events.append(("inserted", adopted))
        return InsertResult(len(adopted), adopted, dup)

    def evict(self, num_blocks: int, tier: Tier = Tier.GPU) -> list[int]:
        freed: list[int] = []
        while len(freed) < num_blocks:
            leaves = []
            stack = list(self.root.children.values())
            while stack:
                n = stack.pop()
                if n.children:
                    stack.extend(n.children.values())
                elif self.pool._ref[n.block_id] == 0:
                    leaves.append(n)
            if not leaves:
                break
            victim = min(leaves, key=lambda n: n.last_use)
            del victim.parent.children[victim.key]
            self.pool._owned[victim.block_id] = False
            self.pool._free.append(victim.block_id)
            freed.append(victim.block_id)
        if freed:
            self._events.append(("evicted", freed))
        return freed

    def drain_events(self) -> list[tuple]:
        events, self._events = self._events, []
        return events
