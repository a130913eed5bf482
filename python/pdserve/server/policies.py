"""Routing policies of the global scheduler: which prefill (P) and which decode (D) instance serves a request.

Policy stays apart from mechanism: a policy is a pure function of an `InstanceSnapshot` list and a
`RouteContext`; it never talks to the network, so every case tests on plain ints (tests/test_policies.py).
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field

POLICY_NAMES = ("random", "rr", "prefix", "least", "cost")
PHASES = ("prefill", "decode")


@dataclass(frozen=True)
class InstanceSnapshot:
    """What the scheduler knows about one instance at routing time (from heartbeats + its own in-flight count)."""

    instance_id: str
    role: str  # "prefill" | "decode" | "both"
    num_queued_prefill_tokens: int = (
        0  # tokens waiting for (or in) prefill, incl. dispatched-not-yet-reported
    )
    num_running: int = 0
    num_used_blocks: int = 0  # primary tier, in_use (includes reserved)
    num_reserved_blocks: int = 0  # blocks held for requests whose KV is still arriving
    num_total_blocks: int = 0
    block_size: int = 16


@dataclass
class RouteContext:
    """The request being routed. `cached_tokens(instance_id)` comes from the scheduler's prefix index."""

    prompt_token_ids: list[int]
    cached_tokens: Callable[[str], int] = field(default=lambda _instance_id: 0)
    # set when routing D after P was chosen (cost: blocks D lacks must cross the wire)
    prefill_instance_id: str | None = None

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)


class Policy:
    """Base: `choose(candidates, ctx) -> InstanceSnapshot`. `candidates` is never empty."""

    name = "base"

    def __init__(self, phase: str):
        if phase not in PHASES:
            raise ValueError(f"phase must be one of {PHASES}, got {phase!r}")
        self.phase = phase

    def choose(self, candidates: list[InstanceSnapshot], ctx: RouteContext) -> InstanceSnapshot:
        raise NotImplementedError

    def load(self, inst: InstanceSnapshot) -> int:
        """The load `least` minimises: queued prefill tokens for P; used+reserved blocks for D (SPEC §4)."""
        if self.phase == "prefill":
            return inst.num_queued_prefill_tokens
        # reserved blocks are a subset of used ones in the pool (DESIGN §1); the snapshot carries both
        # separately so a scheduler that reserves ahead of a heartbeat can add its own count.
        return inst.num_used_blocks + inst.num_reserved_blocks


def _ordered(candidates: list[InstanceSnapshot]) -> list[InstanceSnapshot]:
    # Deterministic order regardless of registration order, so every tie breaks the same way.
    return sorted(candidates, key=lambda c: c.instance_id)


class RandomPolicy(Policy):
    name = "random"

    def __init__(self, phase: str, seed: int = 0):
        super().__init__(phase)
        self._rng = random.Random(seed)

    def choose(self, candidates, ctx):
        return self._rng.choice(_ordered(candidates))


class RoundRobinPolicy(Policy):
    name = "rr"

    def __init__(self, phase: str, seed: int = 0):
        super().__init__(phase)
        self._next_index = 0

    def choose(self, candidates, ctx):
        ordered = _ordered(candidates)
        chosen = ordered[self._next_index % len(ordered)]
        self._next_index += 1
        return chosen


class LeastLoadPolicy(Policy):
    name = "least"

    def __init__(self, phase: str, seed: int = 0):
        super().__init__(phase)

    def choose(self, candidates, ctx):
        return min(_ordered(candidates), key=self.load)


class PrefixPolicy(Policy):
    """Longest cached prefix (from the exact per-instance mirrors); ties go to the least loaded, then by id."""

    name = "prefix"

    def __init__(self, phase: str, seed: int = 0):
        super().__init__(phase)

    def choose(self, candidates, ctx):
        return min(
            _ordered(candidates), key=lambda c: (-ctx.cached_tokens(c.instance_id), self.load(c))
        )


@dataclass(frozen=True)
class CostModel:
    """Rough per-token costs for `cost`; defaults fit the CPU `tiny` preset well enough to rank instances."""

    prefill_seconds_per_token: float = 1e-4
    transfer_seconds_per_token: float = 2e-5
    decode_seconds_per_block_used: float = 1e-5


class CostPolicy(Policy):
    """Predicted TTFT = queue wait + uncached prefill compute + transfer time, one score for affinity and load.

    For P: (queued tokens + prompt tokens P lacks) * prefill cost. For D: tokens D lacks cross the wire,
    plus a pressure term from used+reserved blocks (a nearly full D preempts, which costs far more).
    """

    name = "cost"

    def __init__(self, phase: str, seed: int = 0, model: CostModel | None = None):
        super().__init__(phase)
        self.model = model or CostModel()

    def predicted_seconds(self, inst: InstanceSnapshot, ctx: RouteContext) -> float:
        num_uncached = max(0, ctx.num_prompt_tokens - ctx.cached_tokens(inst.instance_id))
        m = self.model
        if self.phase == "prefill":
            return (inst.num_queued_prefill_tokens + num_uncached) * m.prefill_seconds_per_token
        pressure = 0.0
        if inst.num_total_blocks > 0:
            used_fraction = self.load(inst) / inst.num_total_blocks
            pressure = (
                used_fraction / max(1e-3, 1.0 - used_fraction) * m.prefill_seconds_per_token * 64
            )
        return (
            num_uncached * m.transfer_seconds_per_token
            + self.load(inst) * m.decode_seconds_per_block_used
            + pressure
        )

    def choose(self, candidates, ctx):
        return min(_ordered(candidates), key=lambda c: self.predicted_seconds(c, ctx))


_POLICIES: dict[str, type[Policy]] = {
    "random": RandomPolicy,
    "rr": RoundRobinPolicy,
    "prefix": PrefixPolicy,
    "least": LeastLoadPolicy,
    "cost": CostPolicy,
}


def make_policy(name: str, phase: str, seed: int = 0) -> Policy:
    """Build a policy by its CLI name (`--ep-policy` / `--ed-policy`)."""
    try:
        cls = _POLICIES[name]
    except KeyError:
        raise ValueError(
            f"unknown policy {name!r}; choose one of {', '.join(POLICY_NAMES)}"
        ) from None
    return cls(phase, seed=seed)
