"""Typed Python wrappers of the C++ cache core (block pools, radix tree, evictor) and GPU copy kernels.

`reference` holds a plain-Python model of the same pool and tree semantics (tests, benchmarks).
"""

from pdserve._core import BlockIds
from pdserve.cache.evictor import Evictor
from pdserve.cache.pool import BlockPool
from pdserve.cache.radix import RadixTree, hash_blocks
from pdserve.cache.types import (
    BlockIdSeq,
    CacheEvent,
    EvictionPlan,
    InsertResult,
    LockHandle,
    MatchResult,
    NodeHandle,
    Ticket,
    Tier,
)

__all__ = [
    "BlockIdSeq",
    "BlockIds",
    "BlockPool",
    "CacheEvent",
    "EvictionPlan",
    "Evictor",
    "InsertResult",
    "LockHandle",
    "MatchResult",
    "NodeHandle",
    "RadixTree",
    "Ticket",
    "Tier",
    "hash_blocks",
]
