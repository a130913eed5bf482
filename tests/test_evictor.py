"""Evictor: watermark arithmetic, demote-versus-free choice, host-first eviction, pending tickets."""

from __future__ import annotations

import pytest
from pdserve.cache import BlockPool, Evictor, RadixTree, Tier

BS = 4


def fill(tree: RadixTree, num_prompts: int, blocks_each: int = 1) -> None:
    for i in range(num_prompts):
        ids = tree.gpu_pool.allocate(blocks_each)
        tree.insert([i + 1] * (BS * blocks_each), ids)
        tree.gpu_pool.decref(ids)


def test_under_high_watermark_does_nothing() -> None:
    tree = RadixTree(BS, BlockPool(10))
    fill(tree, 8)
    plan = Evictor(tree, gpu_high=0.8, gpu_low=0.5).plan()
    assert plan.demote_ticket is None and plan.freed_gpu_block_ids == []
    assert plan.freed_host_block_ids == []


def test_gpu_only_frees_lru_down_to_low_watermark() -> None:
    tree = RadixTree(BS, BlockPool(10))
    fill(tree, 9)
    tree.match_prefix([1] * BS)  # prompt 1 becomes the most recent
    plan = Evictor(tree, gpu_high=0.8, gpu_low=0.5).plan()
    assert plan.demote_ticket is None
    assert plan.freed_gpu_block_ids == [1, 2, 3, 4]  # 9 used -> 5 = floor(0.5 * 10)
    assert tree.gpu_pool.num_free == 5
    tree.check_invariants()


def test_with_host_tier_demotes_and_counts_pending_blocks() -> None:
    tree = RadixTree(BS, BlockPool(10), BlockPool(10, Tier.HOST))
    fill(tree, 9)
    evictor = Evictor(tree, gpu_high=0.8, gpu_low=0.5)
    plan = evictor.plan()
    ticket = plan.demote_ticket
    assert ticket is not None and ticket.src_block_ids == [0, 1, 2, 3]
    assert plan.freed_gpu_block_ids == []
    assert evictor.plan().demote_ticket is None  # pending demotions already count as leaving
    tree.commit(ticket, True)
    assert tree.gpu_pool.num_free == 5 and tree.host_pool.num_cached == 4
    assert [e.kind for e in tree.drain_events()][-4:] == ["demoted"] * 4
    tree.check_invariants()


def test_host_is_freed_first_and_full_host_falls_back_to_freeing_gpu() -> None:
    tree = RadixTree(BS, BlockPool(10), BlockPool(2, Tier.HOST))
    fill(tree, 9)
    evictor = Evictor(tree, gpu_high=0.8, gpu_low=0.5, host_high=1.0, host_low=0.0)
    plan = evictor.plan()
    assert plan.demote_ticket is not None and plan.demote_ticket.src_block_ids == [0, 1]
    assert plan.freed_gpu_block_ids == [2, 3]  # the host could take only two
    tree.commit(plan.demote_ticket, True)
    tree.check_invariants()
    host_full = Evictor(tree, gpu_high=0.1, gpu_low=0.0, host_high=0.5, host_low=0.0)
    plan = host_full.plan()
    assert plan.freed_host_block_ids == [0, 1]  # HOST above its high watermark: freed first
    assert plan.demote_ticket is not None
    tree.commit(plan.demote_ticket, False)
    tree.check_invariants()


def test_locked_blocks_stay() -> None:
    tree = RadixTree(BS, BlockPool(4))
    fill(tree, 4)
    handles = [tree.lock(tree.match_prefix([i + 1] * BS).node) for i in range(4)]
    assert Evictor(tree, 0.5, 0.0).plan().freed_gpu_block_ids == []
    for h in handles:
        tree.unlock(h)
    assert len(Evictor(tree, 0.5, 0.0).plan().freed_gpu_block_ids) == 4


@pytest.mark.parametrize(("high", "low"), [(0.5, 0.6), (1.5, 0.1), (0.5, -0.1)])
def test_bad_watermarks(high: float, low: float) -> None:
    with pytest.raises(ValueError, match="watermarks must satisfy 0 <= low <= high <= 1"):
        Evictor(RadixTree(BS, BlockPool(4)), high, low)
