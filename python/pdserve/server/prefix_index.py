"""The scheduler's global prompt trees: one exact mirror of each instance's radix tree, kept from cache events.

Blocks are keyed by chained block hashes (`hash_i = H(hash_{i-1}, tokens of block i)`, DESIGN §1), so a
mirror is a set of hashes per instance and a prompt matches by walking its own chained hashes until one
is missing. The instances compute the hashes (C++ `pdserve._core.hash_blocks`); this file must use the
same function for prompts, so it never defines its own unless the extension is absent (tests only).
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

TIER_GPU = 0
TIER_HOST = 1
EVENT_KINDS = ("inserted", "evicted", "demoted", "promoted")

HashBlocks = Callable[[list[int], int], list[int]]


def python_hash_blocks(token_ids: list[int], block_size: int) -> list[int]:
    """Stand-in for `pdserve._core.hash_blocks` when the extension is not built: same chaining, other H."""
    hashes: list[int] = []
    parent = 0
    for start in range(0, len(token_ids) - block_size + 1, block_size):
        block = token_ids[start : start + block_size]
        digest = hashlib.blake2b(
            struct.pack(f"<Q{len(block)}q", parent, *block), digest_size=8
        ).digest()
        parent = int.from_bytes(digest, "little")
        hashes.append(parent)
    return hashes


def default_hash_blocks() -> HashBlocks:
    """`pdserve._core.hash_blocks` when built (it must match the instances' events), else the stand-in."""
    try:
        from pdserve._core import hash_blocks  # type: ignore[attr-defined]
    except ImportError:
        return python_hash_blocks
    return lambda token_ids, block_size: list(hash_blocks(list(token_ids), int(block_size)))


@dataclass
class CacheEvent:
    """Wire form of DESIGN §1's `CacheEvent` (instances send them as JSON dicts)."""

    kind: str
    tier: int
    parent_hash: int
    block_hashes: list[int]
    token_ids: list[int] = field(default_factory=list)

    @classmethod
    def from_any(cls, obj) -> CacheEvent:
        """From a dict (JSON) or any object with the same attributes (the C++ event); kind may be an enum."""
        get = obj.get if isinstance(obj, dict) else (lambda k, d=None: getattr(obj, k, d))
        kind = get("kind")
        kind = getattr(kind, "name", kind)
        kind = str(kind).lower().rsplit(".", 1)[-1]
        if kind not in EVENT_KINDS:
            raise ValueError(f"cache event kind must be one of {EVENT_KINDS}, got {kind!r}")
        tier = get("tier", TIER_GPU)
        tier = int(getattr(tier, "value", tier))
        return cls(
            kind=kind,
            tier=tier,
            parent_hash=int(get("parent_hash", 0) or 0),
            block_hashes=[int(h) for h in (get("block_hashes") or [])],
            token_ids=[int(t) for t in (get("token_ids") or [])],
        )

    def to_dict(self) -> dict:
        return {
            "kind": self.kind,
            "tier": self.tier,
            "parent_hash": self.parent_hash,
            "block_hashes": self.block_hashes,
            "token_ids": self.token_ids,
        }


class InstancePrefixMirror:
    """The blocks one instance caches, as `hash -> tier`. Exact as long as every event arrives in order."""

    def __init__(self, block_size: int):
        self.block_size = block_size
        self.tier_by_hash: dict[int, int] = {}

    @property
    def num_blocks(self) -> int:
        return len(self.tier_by_hash)

    def apply(self, event: CacheEvent) -> None:
        if event.kind in ("inserted", "promoted"):
            tier = event.tier if event.kind == "inserted" else TIER_GPU
            for h in event.block_hashes:
                self.tier_by_hash[h] = tier
        elif event.kind == "demoted":
            for h in event.block_hashes:
                if h in self.tier_by_hash:
                    self.tier_by_hash[h] = TIER_HOST
        else:  # evicted: the block left the tree (the tier says from where; a node lives in one tier)
            for h in event.block_hashes:
                self.tier_by_hash.pop(h, None)

    def match_num_blocks(self, prompt_hashes: Iterable[int]) -> tuple[int, int]:
        """Returns (matched blocks, of which on the host tier), walking from the root until a miss."""
        num_matched = num_host = 0
        for h in prompt_hashes:
            tier = self.tier_by_hash.get(h)
            if tier is None:
                break
            num_matched += 1
            num_host += tier == TIER_HOST
        return num_matched, num_host


class PrefixIndex:
    """All instances' mirrors. Not thread-safe: the scheduler touches it from its event loop only."""

    def __init__(self, hash_blocks: HashBlocks | None = None):
        self._hash_blocks = hash_blocks or default_hash_blocks()
        self._mirrors: dict[str, InstancePrefixMirror] = {}

    def add_instance(self, instance_id: str, block_size: int) -> None:
        """(Re)start a mirror empty: a new incarnation of an instance has an empty tree."""
        self._mirrors[instance_id] = InstancePrefixMirror(block_size)

    def remove_instance(self, instance_id: str) -> None:
        self._mirrors.pop(instance_id, None)

    def apply_events(self, instance_id: str, events: Iterable) -> int:
        """Apply events in order; returns how many. Unknown instance: ignored (it re-registers first)."""
        mirror = self._mirrors.get(instance_id)
        if mirror is None:
            return 0
        count = 0
        for raw in events:
            mirror.apply(raw if isinstance(raw, CacheEvent) else CacheEvent.from_any(raw))
            count += 1
        return count

    def num_cached_blocks(self, instance_id: str) -> int:
        mirror = self._mirrors.get(instance_id)
        return 0 if mirror is None else mirror.num_blocks

    def cached_tokens(self, instance_id: str, prompt_token_ids: list[int]) -> int:
        """Tokens of the prompt's prefix that the instance holds (whole blocks, any tier)."""
        mirror = self._mirrors.get(instance_id)
        if mirror is None:
            return 0
        num_blocks, _ = mirror.match_num_blocks(
            self._hash_blocks(prompt_token_ids, mirror.block_size)
        )
        return num_blocks * mirror.block_size

    def matcher(self, prompt_token_ids: list[int]) -> Callable[[str], int]:
        """A `cached_tokens(instance_id)` for one prompt, hashing once per block size."""
        hashes_by_block_size: dict[int, list[int]] = {}

        def cached_tokens(instance_id: str) -> int:
            mirror = self._mirrors.get(instance_id)
            if mirror is None:
                return 0
            bs = mirror.block_size
            if bs not in hashes_by_block_size:
                hashes_by_block_size[bs] = self._hash_blocks(prompt_token_ids, bs)
            num_blocks, _ = mirror.match_num_blocks(hashes_by_block_size[bs])
            return num_blocks * bs

        return cached_tokens
