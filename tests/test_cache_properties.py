"""Property tests: random operation sequences run through the C++ cache core and the plain-Python
reference model (`pdserve.cache.reference`), comparing every result — block ids, match results,
exact eviction order, tickets, events, pool counts — and checking the invariants after each step."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pdserve.cache import BlockPool, Evictor, RadixTree, Tier, hash_blocks
from pdserve.cache.reference import RefBlockPool, RefEvictor, RefRadixTree
from pdserve.cache.reference import hash_blocks as ref_hash_blocks

BS = 2
PREFIXES = [[], [1, 1, 1, 1], [1, 1, 2, 2], [3, 0, 3, 0, 3, 0]]


@dataclass
class Side:
    """One implementation plus the caller-side state the operations need."""

    tree: object
    evictor: object
    held: list[int] = field(default_factory=list)  # GPU block ids the "caller" holds a ref on
    locks: list[int] = field(default_factory=list)
    tickets: list[int] = field(default_factory=list)


def build(num_gpu: int, num_host: int | None, cpp: bool) -> Side:
    if cpp:
        gpu = BlockPool(num_gpu)
        host = None if num_host is None else BlockPool(num_host, Tier.HOST)
        tree = RadixTree(BS, gpu, host)
        return Side(tree, Evictor(tree, 0.75, 0.5, 0.8, 0.4))
    gpu = RefBlockPool(num_gpu)
    host = None if num_host is None else RefBlockPool(num_host, Tier.HOST)
    tree = RefRadixTree(BS, gpu, host)
    tree.compare_whole_runs = num_host is None  # both key comparisons of the model, one each
    return Side(tree, RefEvictor(tree, 0.75, 0.5, 0.8, 0.4))


def outcome(fn):
    try:
        return ("ok", fn())
    except ValueError:
        return ("ValueError", None)


def pool_counts(pool) -> tuple[int, ...]:
    return (pool.num_free, pool.num_cached, pool.num_in_use, pool.num_reserved)


tokens_st = st.builds(
    lambda prefix, tail: prefix + tail,
    st.sampled_from(PREFIXES),
    st.lists(st.integers(0, 3), max_size=8),
)

op_st = st.one_of(
    st.tuples(st.just("insert"), tokens_st, st.booleans()),
    st.tuples(st.just("match"), tokens_st),
    st.tuples(st.just("alloc"), st.integers(0, 4)),
    st.tuples(st.just("drop"), st.integers(0, 100)),
    st.tuples(st.just("lock"), tokens_st),
    st.tuples(st.just("unlock"), st.integers(0, 100)),
    st.tuples(st.just("evict"), st.integers(0, 6), st.sampled_from([Tier.GPU, Tier.HOST])),
    st.tuples(st.just("demote"), st.integers(0, 6)),
    st.tuples(st.just("promote"), tokens_st),
    st.tuples(st.just("commit"), st.integers(0, 100), st.booleans()),
    st.tuples(st.just("reserve"), st.sampled_from(["a", "b"]), st.integers(0, 3)),
    st.tuples(st.just("release"), st.sampled_from(["a", "b"]), st.booleans()),
    st.tuples(st.just("plan")),
    st.tuples(st.just("bad_decref"), st.integers(-1, 40)),
    st.tuples(st.just("bad_insert"), tokens_st),
)


def apply(side: Side, op: tuple):  # noqa: C901 - one branch per operation, kept flat on purpose
    tree = side.tree
    gpu = tree.gpu_pool
    kind = op[0]
    if kind == "insert":
        _, tokens, fresh = op
        n = len(tokens) // BS
        if fresh or not tree.match_prefix(tokens).block_ids:
            if not gpu.can_allocate(n):
                return ("skip", None)
            ids = gpu.allocate(n)
        else:  # re-insert the matched prefix's own blocks plus new ones
            ids = list(tree.match_prefix(tokens).block_ids)
            extra = n - len(ids)
            if not gpu.can_allocate(extra) or any(
                t != Tier.GPU for t in tree.match_prefix(tokens).tiers
            ):
                return ("skip", None)
            gpu.incref(ids)
            ids += gpu.allocate(extra)
        res = outcome(lambda: tree.insert(tokens, ids))
        gpu.decref(ids)  # the finished sequence drops its references
        return res
    if kind == "match":
        return outcome(lambda: tree.match_prefix(op[1]))
    if kind == "alloc":
        res = outcome(lambda: gpu.allocate(op[1]))
        if res[0] == "ok":
            side.held += res[1]
        return res
    if kind == "drop":
        if not side.held:
            return ("skip", None)
        block = side.held.pop(op[1] % len(side.held))
        return outcome(lambda: gpu.decref([block]))
    if kind == "lock":
        node = tree.match_prefix(op[1]).node
        res = outcome(lambda: tree.lock(node))
        if res[0] == "ok":
            side.locks.append(res[1])
        return res
    if kind == "unlock":
        if not side.locks:
            return outcome(lambda: tree.unlock(12345))
        handle = side.locks.pop(op[1] % len(side.locks))
        return outcome(lambda: tree.unlock(handle))
    if kind == "evict":
        return outcome(lambda: tree.evict(op[1], op[2]))
    if kind == "demote":
        res = outcome(lambda: tree.begin_demote(op[1]))
        if res[0] == "ok":
            side.tickets.append(res[1].ticket_id)
        return res
    if kind == "promote":
        res = outcome(lambda: tree.begin_promote(op[1]))
        if res[0] == "ok":
            side.tickets.append(res[1].ticket_id)
        return res
    if kind == "commit":
        if not side.tickets:
            return outcome(lambda: tree.commit(999, True))
        ticket_id = side.tickets.pop(op[1] % len(side.tickets))
        return outcome(lambda: tree.commit(ticket_id, op[2]))
    if kind == "reserve":
        return outcome(lambda: gpu.reserve(op[1], op[2]))
    if kind == "release":
        if op[2]:
            return outcome(lambda: gpu.release_reservation(op[1]))
        res = outcome(lambda: gpu.transfer_reservation(op[1]))
        if res[0] == "ok":
            side.held += res[1]
        return res
    if kind == "plan":
        res = outcome(side.evictor.plan)
        if res[0] == "ok" and res[1].demote_ticket is not None:
            side.tickets.append(res[1].demote_ticket.ticket_id)
        return res
    if kind == "bad_decref":
        if 0 <= op[1] < gpu.num_total and gpu.ref_count(op[1]) > 0:
            return ("skip", None)  # only decref what no one holds: must fail as a double free
        return outcome(lambda: gpu.decref([op[1]]))
    if kind == "bad_insert":  # a repeated block id: must fail and change nothing
        n = len(op[1]) // BS
        if n < 2 or not gpu.can_allocate(n - 1):
            return ("skip", None)
        ids = gpu.allocate(n - 1)
        res = outcome(lambda: tree.insert(op[1], ids + ids[:1]))
        gpu.decref(ids)
        return res
    raise AssertionError(kind)


def run_and_compare(ops: list[tuple], num_gpu: int, num_host: int | None) -> None:
    cpp, ref = build(num_gpu, num_host, True), build(num_gpu, num_host, False)
    for step, op in enumerate(ops):
        got, want = apply(cpp, op), apply(ref, op)
        assert got == want, f"step {step} {op}: C++ {got} != reference {want}"
        cpp.tree.check_invariants()
        ref.tree.check_invariants()
        assert pool_counts(cpp.tree.gpu_pool) == pool_counts(ref.tree.gpu_pool), f"step {step}"
        if num_host is not None:
            assert pool_counts(cpp.tree.host_pool) == pool_counts(ref.tree.host_pool)
        assert cpp.tree.num_nodes == ref.tree.num_nodes
        assert cpp.tree.num_pending_demote_blocks == ref.tree.num_pending_demote_blocks
    assert cpp.tree.drain_events() == ref.tree.drain_events()


SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@SETTINGS
@given(st.lists(op_st, max_size=60))
def test_gpu_only_matches_reference(ops: list[tuple]) -> None:
    run_and_compare(ops, num_gpu=12, num_host=None)


@SETTINGS
@given(st.lists(op_st, max_size=60))
def test_two_tiers_match_reference(ops: list[tuple]) -> None:
    run_and_compare(ops, num_gpu=10, num_host=8)


@settings(max_examples=50, deadline=None)
@given(st.lists(st.integers(-(2**31), 2**31 - 1), max_size=40), st.integers(1, 8))
def test_hash_blocks_matches_reference(tokens: list[int], block_size: int) -> None:
    expected = ref_hash_blocks(tokens, block_size)
    assert hash_blocks(tokens, block_size) == expected
    assert hash_blocks(np.array(tokens, dtype=np.int64), block_size) == expected
