"""pdserve._core.BlockIds, the immutable int32 sequence the cache core returns block ids as:
sequence semantics, equality with lists, errors, zero-copy buffer, pickling, no leaks."""

from __future__ import annotations

import copy
import gc
import pickle
import sys
import tracemalloc
import warnings
from collections.abc import Sequence

import numpy as np
import pytest
import torch
from pdserve._core import BlockIds
from pdserve.cache import BlockPool, RadixTree, Tier


def test_sequence_protocol_like_a_tuple_of_ints() -> None:
    ids = BlockIds([3, 7, 9, 7])
    assert len(ids) == 4 and bool(ids) and not BlockIds() and len(BlockIds()) == 0
    assert ids[0] == 3 and ids[-1] == 7 and ids[-4] == 3
    assert [type(i) for i in ids] == [int] * 4 and list(ids) == [3, 7, 9, 7]
    assert list(reversed(ids)) == [7, 9, 7, 3]
    assert 9 in ids and 8 not in ids and 2**40 not in ids and "x" not in ids and 9.0 in ids
    assert ids.count(7) == 2 and ids.index(7) == 1 and ids.index(7, 2) == 3
    assert isinstance(ids, Sequence)
    slices = (slice(1, 3), slice(None, None, -1), slice(None, None, 2), slice(5, 9), slice(-2, 9))
    for sl in slices:
        part = ids[sl]
        assert type(part) is BlockIds and part == [3, 7, 9, 7][sl]
    assert ids[:] is ids  # immutable: the whole slice is the object itself


def test_index_errors_name_the_index() -> None:
    ids = BlockIds([1, 2, 3])
    with pytest.raises(IndexError, match="BlockIds index 3 out of range for 3 ids"):
        ids[3]
    with pytest.raises(IndexError, match="index -1 out of range for 3 ids"):
        ids[-4]  # -4 + 3
    with pytest.raises(TypeError, match="indices must be integers or slices, not str"):
        ids["a"]
    with pytest.raises(ValueError, match=r"BlockIds.index\(5\): not in the ids"):
        ids.index(5)
    with pytest.raises(TypeError):
        ids[0] = 5  # type: ignore[index]


def test_concatenation_returns_block_ids_and_lists_still_extend() -> None:
    ids = BlockIds([1, 2])
    for other in (BlockIds([3]), [3], (3,), range(3, 4), np.array([3], dtype=np.int64)):
        out = ids + other if not isinstance(other, np.ndarray) else ids.__add__(other)
        assert type(out) is BlockIds and out == [1, 2, 3]
    assert ids + [] is ids
    with pytest.raises(TypeError, match=r"other\[0\] must be an int, got str"):
        ids + ["x"]
    with pytest.raises(TypeError, match="can only concatenate list"):
        [0] + ids  # type: ignore[operator]
    acc = [0]
    alias = acc
    acc += ids  # list += BlockIds extends the list in place, as with any iterable
    assert acc is alias and acc == [0, 1, 2]


def test_equality_with_lists_and_tuples_both_ways_and_hash_of_the_equal_tuple() -> None:
    ids = BlockIds([0, 5, -1, 2**31 - 1])
    as_list = [0, 5, -1, 2**31 - 1]
    assert ids == as_list and as_list == ids and ids == tuple(as_list) and tuple(as_list) == ids
    assert ids == BlockIds(as_list) and not ids != as_list
    assert ids != as_list[:-1] and ids != [*as_list, 1] and ids != [0, 5, -1, 0]
    assert BlockIds([0, 1]) == [Tier.GPU, Tier.HOST] and BlockIds([1]) == [1.0]
    assert ids != "abc" and ids != {0, 5} and ids != 0
    assert hash(ids) == hash(tuple(as_list)) and hash(BlockIds()) == hash(())
    assert {tuple(as_list): "x"}[ids] == "x"
    assert (BlockIds([2]), 1) == ([2], 1)  # inside containers too (e.g. test digests)


def test_repr_and_tolist() -> None:
    assert repr(BlockIds([3, 7, 9])) == "BlockIds([3, 7, 9])" and repr(BlockIds()) == "BlockIds([])"
    out = BlockIds([3, 7]).tolist()
    assert type(out) is list and out == [3, 7] and all(type(i) is int for i in out)


def test_constructor_inputs_and_errors_naming_the_bad_value() -> None:
    ids = BlockIds([1, 2])
    assert BlockIds(ids) is ids
    assert BlockIds((4, 5)) == [4, 5] and BlockIds(range(3)) == [0, 1, 2]
    assert BlockIds(i * 2 for i in range(3)) == [0, 2, 4]
    assert BlockIds(np.arange(3, dtype=np.int32)) == [0, 1, 2]
    assert BlockIds(np.arange(3, dtype=np.int64)[::2]) == [0, 2]
    assert BlockIds(ids=[-(2**31), 2**31 - 1]) == [-(2**31), 2**31 - 1]
    with pytest.raises(ValueError, match=r"ids\[1\] = 2147483648 does not fit in int32"):
        BlockIds([0, 2**31])
    with pytest.raises(ValueError, match=r"ids\[0\] = -2147483649 does not fit in int32"):
        BlockIds(np.array([-(2**31) - 1], dtype=np.int64))
    with pytest.raises(TypeError, match=r"ids\[2\] must be an int, got float"):
        BlockIds([0, 1, 2.5])
    with pytest.raises(TypeError, match="must be an iterable of ints, got int"):
        BlockIds(5)
    with pytest.raises(TypeError, match="got buffer format 'd'"):
        BlockIds(np.zeros(2))


def test_buffer_is_a_read_only_int32_view_without_a_copy() -> None:
    ids = BlockIds([3, 7, 9])
    view = memoryview(ids)
    assert (view.format, view.itemsize, view.ndim, view.shape, view.readonly) == (
        "i",
        4,
        1,
        (3,),
        True,
    )
    with pytest.raises(TypeError):
        view[0] = 1
    a, b = np.asarray(ids), np.asarray(ids)
    assert a.dtype == np.int32 and a.tolist() == [3, 7, 9] and not a.flags.writeable
    assert a.ctypes.data == b.ctypes.data  # both view the object's own storage
    assert np.asarray(BlockIds()).shape == (0,)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # torch warns about read-only memory
        t = torch.as_tensor(a)
        f = torch.frombuffer(ids, dtype=torch.int32)
    assert t.data_ptr() == a.ctypes.data == f.data_ptr() and t.tolist() == [3, 7, 9]
    del view, a, b, t, f
    assert sys.getrefcount(ids) == 2  # the views released the object


def test_pickle_and_copy() -> None:
    ids = BlockIds([5, 0, 2**31 - 1])
    for protocol in range(pickle.HIGHEST_PROTOCOL + 1):
        back = pickle.loads(pickle.dumps(ids, protocol))
        assert type(back) is BlockIds and back == ids
    assert copy.copy(ids) is ids and copy.deepcopy(ids) is ids


def test_cache_results_are_block_ids_and_inputs_accept_them() -> None:
    gpu, host = BlockPool(16), BlockPool(16, Tier.HOST)
    tree = RadixTree(2, gpu, host)
    new_ids = gpu.allocate(4)
    assert type(new_ids) is BlockIds
    gpu.incref(new_ids)
    assert [gpu.ref_count(i) for i in new_ids] == [2] * 4
    gpu.decref(new_ids)
    result = tree.insert(list(range(8)), new_ids)
    assert type(result.adopted_block_ids) is BlockIds and result.adopted_block_ids == new_ids
    assert type(result.duplicate_block_ids) is BlockIds and result.duplicate_block_ids == []
    gpu.decref(new_ids)
    match = tree.match_prefix(np.arange(8, dtype=np.int32))
    assert type(match.block_ids) is BlockIds and type(match.tiers) is BlockIds
    assert match.tiers == [Tier.GPU] * 4
    ticket = tree.begin_demote(2)
    assert type(ticket.src_block_ids) is BlockIds and type(ticket.dst_block_ids) is BlockIds
    tree.commit(ticket, True)
    assert tree.match_prefix(list(range(8))).tiers == [Tier.HOST] * 4  # the whole node moved
    assert type(tree.evict(1, Tier.HOST)) is BlockIds
    assert type(gpu.reserve("r", 2)) is BlockIds and type(gpu.reserved_blocks("r")) is BlockIds
    assert type(gpu.transfer_reservation("r")) is BlockIds
    tree.check_invariants()


def _exercise(gpu: BlockPool, tree: RadixTree, tokens: np.ndarray) -> int:
    """One engine-like request through every result kind; returns the number of hit blocks."""
    m = tree.match_prefix(tokens)
    need = len(tokens) // 4 - len(m.block_ids)
    if need > gpu.num_free:
        tree.evict(need - gpu.num_free)
    new_ids = gpu.allocate(need)
    ids = m.block_ids + new_ids
    tree.insert(tokens, ids)
    gpu.decref(new_ids)
    sum(ids[1:])
    ids.tolist()
    np.asarray(ids).sum()
    pickle.loads(pickle.dumps(ids))
    assert ids == list(ids) and ids[len(m.block_ids) :] == new_ids
    return len(m.block_ids)


def test_results_and_their_ints_are_freed() -> None:
    gpu = BlockPool(512)
    tree = RadixTree(4, gpu)
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, 50, size=int(n), dtype=np.int32) for n in rng.integers(8, 200, 24)]
    order = rng.integers(0, len(prompts), 40 * len(prompts))  # hits, misses and evictions
    held = gpu.allocate(512)
    probes = list(held[300:])  # shared ints the bindings hand out for ids (not small ints)
    gpu.decref(held)
    del held
    for i in order[:200]:  # warm up caches and free lists
        _exercise(gpu, tree, prompts[i])
    gc.collect()
    refs_before = [sys.getrefcount(p) for p in probes]
    tracemalloc.start()
    try:
        before, _ = tracemalloc.get_traced_memory()
        for i in order[200:]:
            _exercise(gpu, tree, prompts[i])
        gc.collect()
        after, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert after - before < 64 * 1024, f"{after - before} bytes still allocated"
    assert [sys.getrefcount(p) for p in probes] == refs_before
    tree.check_invariants()
