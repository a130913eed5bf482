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
