"""RadixTree through its Python wrapper: match/insert, duplicates, locks, LRU eviction order,
demote/promote tickets, events and input types."""

from __future__ import annotations

import numpy as np
import pytest
from pdserve.cache import BlockPool, RadixTree, Tier, hash_blocks

BS = 4


def make(num_gpu: int = 32, num_host: int | None = None) -> RadixTree:
    host = None if num_host is None else BlockPool(num_host, Tier.HOST)
    return RadixTree(BS, BlockPool(num_gpu), host)


def put(tree: RadixTree, tokens: list[int]) -> list[int]:
    """Allocates blocks for tokens, inserts them, drops the caller's references (like a finished
    sequence) and returns the block ids the tree holds for the prompt."""
    n = len(tokens) // BS
    ids = tree.gpu_pool.allocate(n)
    tree.insert(tokens, ids)
    tree.gpu_pool.decref(ids)
    return tree.match_prefix(tokens).block_ids


def test_match_on_empty_tree_and_partial_blocks() -> None:
    tree = make()
    r = tree.match_prefix(list(range(10)))
    assert (r.num_tokens, r.block_ids, r.tiers, r.node) == (0, [], [], 0)
    put(tree, list(range(10)))  # 2 whole blocks, the tail is not cached
    r = tree.match_prefix(list(range(10)))
    assert r.num_tokens == 8 and r.block_ids == [0, 1] and r.tiers == [Tier.GPU, Tier.GPU]
    assert tree.gpu_pool.num_cached == 2
    tree.check_invariants()


def test_insert_reports_adopted_and_duplicates() -> None:
    tree = make()
    put(tree, list(range(8)))
    ids = tree.gpu_pool.allocate(3)
    res = tree.insert(list(range(12)), ids)
    assert res.num_adopted == 1 and res.adopted_block_ids == [ids[2]]
    assert res.duplicate_block_ids == ids[:2]
    tree.gpu_pool.decref(ids)
    # Same ids as the tree's: neither adopted nor duplicate.
    ids2 = tree.match_prefix(list(range(12))).block_ids
    tree.gpu_pool.incref(ids2)
    res = tree.insert(list(range(12)), ids2)
    assert (res.num_adopted, res.duplicate_block_ids) == (0, [])
    tree.gpu_pool.decref(ids2)
    assert tree.gpu_pool.num_cached == 3 and tree.gpu_pool.num_free == 29
    tree.check_invariants()


def test_insert_errors_change_nothing() -> None:
    tree = make()
    with pytest.raises(
        ValueError, match="got 1 block ids for 12 tokens at block_size 4; expected 3"
    ):
        tree.insert(list(range(12)), [0])
    with pytest.raises(ValueError, match="block 0 of the GPU pool is free"):
        tree.insert(list(range(4)), [0])
    ids = tree.gpu_pool.allocate(2)
    with pytest.raises(ValueError, match="appears twice"):
        tree.insert(list(range(8)), [ids[0], ids[0]])
    with pytest.raises(ValueError, match="unknown block id 40"):
        tree.insert(list(range(8)), [ids[0], 40])
    assert tree.num_nodes == 0
    tree.check_invariants()


def test_split_on_partial_match_gives_exact_node() -> None:
    tree = make()
    put(tree, list(range(16)))
    r = tree.match_prefix(list(range(8)) + [99] * 8)
    assert r.num_tokens == 8 and tree.num_nodes == 2
    h = tree.lock(r.node)
    assert [tree.gpu_pool.ref_count(b) for b in r.block_ids] == [1, 1]
    assert tree.evict(100) == [2, 3]  # the unlocked lower half only
    tree.unlock(h)
    assert tree.evict(100) == [0, 1]
    tree.check_invariants()


def test_lru_eviction_order_and_ties_by_insertion() -> None:
    tree = make()
    a = put(tree, [1] * 8)
    b = put(tree, [2] * 8)
    c = put(tree, [3] * 8)
    tree.match_prefix([1] * 8)  # a is now the most recent
    assert tree.evict(2) == b
    assert tree.evict(1) == c  # whole nodes: may free more than asked
    assert tree.evict(5) == a
    assert tree.evict(5) == []
    tree.check_invariants()


def test_locked_and_referenced_blocks_are_never_evicted() -> None:
    tree = make()
    a = put(tree, [1] * 8)
    put(tree, [2] * 8)
    handle = tree.lock(tree.match_prefix([1] * 8).node)
    ids = tree.gpu_pool.allocate(2)
    tree.insert([3] * 8, ids)  # still referenced by the caller
    assert tree.evict(100) == [2, 3]
    assert tree.num_locks == 1
    tree.unlock(handle)
    with pytest.raises(ValueError, match="unknown or already released lock handle"):
        tree.unlock(handle)
    tree.gpu_pool.decref(ids)
    assert sorted(tree.evict(100)) == sorted(a + ids)
    tree.check_invariants()


def test_parent_becomes_leaf_during_one_evict_call() -> None:
    tree = make()
    put(tree, [1] * 8)
    put(tree, [1] * 8 + [2] * 4)
    assert tree.evict(3) == [4, 0, 1]  # the child, then its parent (same access time, older)
    tree.check_invariants()


def test_stale_node_handle_is_rejected() -> None:
    tree = make()
    put(tree, [5] * 4)
    node = tree.match_prefix([5] * 4).node
    tree.evict(1)
    with pytest.raises(ValueError, match=f"unknown or evicted node handle {node}"):
        tree.lock(node)


def test_demote_promote_roundtrip() -> None:
    tree = make(num_gpu=8, num_host=8)
    put(tree, [1] * 8)
    ticket = tree.begin_demote(2)
    assert ticket.kind == "demote" and ticket.copies == [(0, 0), (1, 1)]
    # pinned and still matchable on the GPU meanwhile
    assert tree.match_prefix([1] * 8).tiers == [Tier.GPU, Tier.GPU]
    assert tree.evict(8) == []
    tree.commit(ticket, True)
    r = tree.match_prefix([1] * 8)
    assert r.block_ids == [0, 1] and r.tiers == [Tier.HOST, Tier.HOST]
    assert tree.gpu_pool.num_free == 8 and tree.host_pool.num_cached == 2
    promote = tree.begin_promote([1] * 8)
    assert promote.kind == "promote" and promote.src_block_ids == [0, 1]
    tree.commit(promote.ticket_id, False)  # failed copy: exactly as before
    assert tree.match_prefix([1] * 8).tiers == [Tier.HOST, Tier.HOST]
    assert tree.gpu_pool.num_free == 8
    promote = tree.begin_promote(tree.match_prefix([1] * 8).node)
    tree.commit(promote, True)
    assert tree.match_prefix([1] * 8).tiers == [Tier.GPU, Tier.GPU]
    assert tree.host_pool.num_free == 8
    with pytest.raises(ValueError, match="unknown or already committed ticket"):
        tree.commit(promote, True)
    kinds = [e.kind for e in tree.drain_events()]
    assert kinds == ["inserted", "demoted", "promoted"]
    tree.check_invariants()


def test_demote_without_host_tier_raises() -> None:
    with pytest.raises(ValueError, match="no host pool"):
        make().begin_demote(1)


def test_events_carry_chained_hashes() -> None:
    tree = make()
    put(tree, list(range(8)))
    put(tree, list(range(12)))
    tree.evict(1)
    events = tree.drain_events()
    assert [e.kind for e in events] == ["inserted", "inserted", "evicted"]
    full = hash_blocks(list(range(12)), BS)
    assert events[0].parent_hash == 0 and events[0].block_hashes == full[:2]
    assert events[0].token_ids == list(range(8))
    assert events[1].parent_hash == full[1] and events[1].block_hashes == full[2:]
    assert events[2].block_hashes == full[2:] and events[2].token_ids == []
    assert tree.drain_events() == []


@pytest.mark.parametrize("dtype", [np.int32, np.int64])
def test_numpy_tokens_match_lists(dtype) -> None:
    tree = make()
    tokens = list(range(100, 116))
    put(tree, tokens)
    arr = np.array(tokens, dtype=dtype)
    assert tree.match_prefix(arr) == tree.match_prefix(tokens)
    assert tree.match_prefix(arr[::2]).num_tokens == 0  # strided view converts, no crash
    assert hash_blocks(arr, BS) == hash_blocks(tokens, BS)


def test_bad_token_inputs() -> None:
    tree = make()
    with pytest.raises(TypeError, match=r"tokens\[1\] must be an int, got str"):
        tree.match_prefix([1, "x"])
    with pytest.raises(ValueError, match="does not fit in int32"):
        tree.match_prefix([2**40])
    with pytest.raises(TypeError, match="int32 or int64"):
        tree.match_prefix(np.zeros(4, dtype=np.float32))
    with pytest.raises(ValueError, match="block_size must be > 0, got 0"):
        RadixTree(0, BlockPool(4))


def test_concurrent_threads_keep_invariants() -> None:
    """Calls release the GIL, so threads really interleave inside the tree and pools."""
    import random
    import threading

    tree = make(num_gpu=256, num_host=64)
    errors: list[BaseException] = []

    def worker(seed: int) -> None:
        rng = random.Random(seed)
        try:
            for _ in range(400):
                tokens = np.array([rng.randrange(3) for _ in range(rng.randrange(40))], np.int32)
                while True:  # match -> lock is two calls: another thread may evict in between
                    m = tree.match_prefix(tokens)
                    try:
                        handle = tree.lock(m.node)
                        break
                    except ValueError:
                        continue
                n = len(tokens) // BS - len(m.block_ids)
                try:
                    ids = tree.gpu_pool.allocate(n)
                except ValueError:  # another thread took the last blocks: evict and move on
                    tree.evict(n, Tier.GPU)
                    ids = None
                if ids is not None:
                    tree.insert(tokens, m.block_ids + ids)
                    tree.gpu_pool.decref(ids)
                tree.unlock(handle)
                if rng.random() < 0.2:
                    ticket = tree.begin_demote(rng.randrange(4))
                    tree.commit(ticket, rng.random() < 0.8)
                if rng.random() < 0.2:
                    tree.evict(rng.randrange(4), rng.choice([Tier.GPU, Tier.HOST]))
        except BaseException as exc:  # surfaced in the main thread
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(seed,)) for seed in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert tree.num_locks == 0
    tree.check_invariants()


def test_dropping_the_tree_gives_blocks_back_to_the_pools() -> None:
    import gc

    gpu, host = BlockPool(16), BlockPool(8, Tier.HOST)
    tree = RadixTree(BS, gpu, host)
    put(tree, [1] * 8)
    put(tree, [2] * 8)
    tree.lock(tree.match_prefix([1] * 8).node)
    tree.begin_demote(2)  # left open
    held = gpu.allocate(1)
    tree.insert([3] * 4, held)  # still referenced by the caller when the tree goes
    del tree
    gc.collect()
    assert gpu.num_free == 15 and host.num_free == 8
    gpu.decref(held)
    assert gpu.num_free == 16
    gpu.check_invariants()
    host.check_invariants()


def test_fast_methods_keywords_handles_and_foreign_objects() -> None:
    from pdserve import _core

    tree = make()
    ids = tree.gpu_pool.allocate(2)
    r = tree.insert(tokens=np.arange(8, dtype=np.int32), block_ids=ids)
    assert (r.num_adopted, r.adopted_block_ids, r.duplicate_block_ids) == (2, ids, [])
    tree.gpu_pool.decref(ids)
    m = tree.match_prefix(tokens=list(range(8)))
    handle = tree.lock(node=np.uint64(m.node))
    tree.unlock(handle=handle)
    assert tree.evict(num_blocks=1, tier=Tier.GPU) == ids  # the whole leaf goes
    with pytest.raises(ValueError, match="node must be >= 0, got -1"):
        tree.lock(-1)
    with pytest.raises(TypeError, match="takes at most 2 arguments"):
        tree.insert([1], [2], [3])
    with pytest.raises(TypeError, match="doesn't apply to a 'BlockPool' object"):
        _core.RadixTree.match_prefix(tree.gpu_pool, [1])
    with pytest.raises(TypeError, match="native byte order"):
        tree.match_prefix(np.arange(8, dtype=">i4"))
    tree.check_invariants()
