"""The batch scheduler and block manager on plain ints (no model): budgets, chunking, admission order,
preemption victims, exact block ids from the C++ pool, and the pool invariant after every step."""

from __future__ import annotations

from pdserve.engine.block_manager import BlockManager
from pdserve.engine.sampling_params import SamplingParams
from pdserve.engine.scheduler import Scheduler
from pdserve.engine.sequence import Sequence, SequenceStatus


def _sched(num_blocks=8, block_size=4, max_num_seqs=4, max_tokens=16, chunked=True, caching=False):
    bm = BlockManager(num_blocks, block_size, caching)
    return Scheduler(bm, [999], max_num_seqs, max_tokens, 1000, chunked), bm


def _seq(rid: str, n: int, max_tokens: int = 4) -> Sequence:
    return Sequence(
        rid, list(range(1, n + 1)), n, SamplingParams(max_tokens=max_tokens, ignore_eos=True)
    )


def _step(s: Scheduler, bm: BlockManager):
    batch, dropped = s.schedule()
    plan = [(q.request_id, n) for q, n in zip(batch.seqs, batch.num_new_tokens, strict=True)]
    tokens = [7 if batch.samples(i) else None for i in range(len(batch.seqs))]
    finished = s.postprocess(batch, tokens)
    bm.check_invariants()
    return plan, [q.request_id for q in finished]


def test_budget_chunking_and_decode_first():
    s, bm = _sched(num_blocks=16, max_tokens=10)
    a, b = _seq("a", 6), _seq("b", 12)
    s.add(a), s.add(b)
    assert _step(s, bm) == ([("a", 6), ("b", 4)], [])  # b chunked to the budget
    assert a.block_ids == [0, 1] and b.block_ids == [2]  # the pool hands out 0, 1, 2, ...
    assert _step(s, bm) == ([("a", 1), ("b", 8)], [])  # running decodes first, then b's rest
    assert _step(s, bm)[0] == [("a", 1), ("b", 1)]


def test_without_chunking_a_prompt_waits_for_a_whole_budget():
    s, bm = _sched(num_blocks=16, max_tokens=10, chunked=False)
    s.add(_seq("a", 6)), s.add(_seq("b", 6))
    assert _step(s, bm)[0] == [("a", 6)]
    assert _step(s, bm)[0] == [("a", 1), ("b", 6)]


def test_max_num_seqs_limits_admission():
    s, bm = _sched(num_blocks=16, max_num_seqs=2)
    for r in "abc":
        s.add(_seq(r, 2))
    assert [r for r, _ in _step(s, bm)[0]] == ["a", "b"]
    assert [q.request_id for q in s.waiting] == ["c"]


def test_preemption_takes_the_newest_and_recomputes():
    s, bm = _sched(num_blocks=4, block_size=4, max_tokens=64)
    a, b = _seq("a", 4, max_tokens=8), _seq("b", 8, max_tokens=8)
    s.add(a), s.add(b)
    assert _step(s, bm)[0] == [("a", 4), ("b", 8)]  # 1 + 2 blocks of 4
    _step(s, bm)  # a and b need a 2nd / 3rd... block: a grows (4th block), b cannot
    assert b.status is SequenceStatus.WAITING and b.num_preemptions == 1 and b.block_ids == []
    assert s.num_preemptions == 1 and bm.pool.num_in_use == len(a.block_ids)
    while s.has_unfinished():
        _step(s, bm)
    assert a.finish_reason == b.finish_reason == "length"
    assert b.num_output_tokens == 8 and bm.pool.num_in_use == 0


def test_finished_blocks_are_cached_and_evicted_on_demand():
    s, bm = _sched(num_blocks=4, block_size=4, caching=True)
    s.add(_seq("a", 9, max_tokens=1))
    _step(s, bm)
    assert bm.pool.num_cached == 2 and bm.pool.num_in_use == 0  # 9 computed tokens: 2 whole blocks
    s.add(_seq("b", 5, max_tokens=1))  # shares tokens 1..4 with a: one block hit
    _step(s, bm)
    assert bm.num_hit_tokens == 4
    s.add(Sequence("c", [50] * 14, 14, SamplingParams(max_tokens=1)))  # needs all 4 blocks: evicts
    assert _step(s, bm)[0] == [("c", 14)]
    bm.check_invariants()


def test_watermark_evictor_frees_cached_prefixes():
    bm = BlockManager(10, 4, True, evictor_watermarks=(0.5, 0.2))
    s = Scheduler(bm, [999], 4, 64, 1000, True)
    s.add(_seq("a", 25, max_tokens=1))  # 25 computed tokens: 6 whole blocks cached at finish
    _step(s, bm)
    assert bm.pool.num_cached == 6
    assert bm.run_evictor() >= 4 and bm.pool.num_cached <= 2  # 60% used > 50%: down to <= 20%
    assert bm.run_evictor() == 0
    bm.check_invariants()


def test_a_running_requests_computed_blocks_are_hits_for_the_next():
    s, bm = _sched(num_blocks=16, block_size=4, caching=True)
    a = _seq("a", 10, max_tokens=8)
    s.add(a)
    _step(s, bm)  # a's prompt computed: 2 whole blocks, offered to the tree while a decodes
    assert bm.pool.num_in_use == 3 and bm.tree.num_tree_blocks() == 2
    s.add(_seq("b", 9, max_tokens=1))  # shares a's first 8 tokens
    assert _step(s, bm)[0] == [("a", 1), ("b", 1)]  # b computes only its 9th token
    assert bm.num_hit_tokens == 8 and a.status is SequenceStatus.RUNNING
    _step(
        s, bm
    )  # a's 12th token computed: its 3rd block is whole, but generated: offered at the end
    assert a.num_computed_tokens == 12 and bm.tree.num_tree_blocks() == 2
    while s.has_unfinished():
        _step(s, bm)
    assert bm.tree.num_tree_blocks() == 4  # 17 computed tokens at the end
    assert bm.pool.num_in_use == 0 and bm.pool.num_cached == bm.tree.num_tree_blocks()


def test_twins_computed_in_one_step_keep_the_tree_evictable():
    # a and b compute the same prompt in one step; a's blocks go to the tree first, b's copies stay
    # b's (a block adopted under a's would pin a's blocks, which b does not hold, once a ends)
    s, bm = _sched(num_blocks=10, block_size=4, caching=True)
    a, b = _seq("a", 8, max_tokens=1), _seq("b", 8, max_tokens=12)
    s.add(a), s.add(b)
    _step(s, bm)
    assert a.status is SequenceStatus.FINISHED and set(a.block_ids).isdisjoint(b.block_ids)
    for _ in range(6):
        _step(s, bm)  # b: 8 + 5 computed tokens, 3 whole blocks, its path not the tree's
    assert bm.tree.num_tree_blocks() == 2 and bm.pool.num_cached == 2
    # everything the pool calls available can be taken while b runs
    c = Sequence("c", [50] * 12, 12, SamplingParams(max_tokens=1))
    assert bm.can_grow(c, 12) and bm.num_available_blocks() == 10 - len(b.block_ids)
    bm.grow(c, 12)
    bm.check_invariants()


def test_a_hit_that_stops_inside_a_cached_node_leaves_its_tail_evictable():
    # a's 3 blocks are cached as one node; b's prompt is those 12 tokens, so b takes 2 blocks (one
    # token must stay to compute) and the third, not held by anyone, must still be evictable
    s, bm = _sched(num_blocks=6, block_size=4, caching=True)
    s.add(_seq("a", 13, max_tokens=1))
    _step(s, bm)
    assert bm.pool.num_cached == 3
    b = _seq("b", 12, max_tokens=4)
    s.add(b)
    _step(s, bm)
    assert b.num_cached_tokens == 8 and bm.pool.num_cached == 1
    c = Sequence("c", [50] * 12, 12, SamplingParams(max_tokens=1))
    assert bm.num_available_blocks() == 3
    bm.grow(c, 12)  # 2 free + the evicted tail
    bm.check_invariants()


def test_a_prefix_cached_step_by_step_demotes_whole_to_the_host_tier():
    # a's prompt blocks (while it runs) and its decode block (when it ends) enter the tree as a parent
    # and a child node; making
    # room for all 6 GPU blocks must demote both (one demote ticket takes the current leaves only)
    copies = []
    bm = BlockManager(6, 4, True, num_host_blocks=6, copy_blocks=lambda t: copies.append(t) or True)
    s = Scheduler(bm, [999], 4, 64, 1000, True)
    s.add(_seq("a", 8, max_tokens=6))
    while s.has_unfinished():
        _step(s, bm)
    assert bm.pool.num_cached == 3 and bm.tree.num_nodes == 2
    c = Sequence("c", [50] * 24, 24, SamplingParams(max_tokens=1))
    bm.grow(c, 24)
    assert len(copies) == 2 and bm.host_pool.num_cached == 3
    bm.check_invariants()


def test_a_host_hit_with_no_gpu_room_leaves_the_host_tier_alone():
    # the GPU is all held by a running request: a waiting prompt whose prefix sits in the host tier
    # cannot be promoted now, and looking for room must not drop the host's cached prefixes
    bm = BlockManager(4, 4, True, num_host_blocks=8, copy_blocks=lambda t: True)
    s = Scheduler(bm, [999], 4, 64, 1000, True)
    s.add(_seq("a", 9, max_tokens=1))
    _step(s, bm)  # a's 2 whole blocks cached on the GPU
    b = Sequence("b", [50] * 13, 13, SamplingParams(max_tokens=3, ignore_eos=True))
    s.add(b)
    _step(s, bm)  # b takes all 4 GPU blocks: a's prefix moves to the host tier
    assert bm.host_pool.num_cached == 2 and bm.pool.num_free == 0 and bm.pool.num_cached == 0
    s.add(_seq("c", 9, max_tokens=1))  # a's prompt: its prefix is on the host
    _step(s, bm)
    assert bm.host_pool.num_cached == 2 and [q.request_id for q in s.waiting] == ["c"]
    while s.has_unfinished():
        _step(s, bm)
    assert bm.num_hit_tokens == 8  # c, once b ended, took a's prefix back from the host
