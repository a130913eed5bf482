"""BlockPool through its Python wrapper: allocation order, ref counts, reservations, errors."""

from __future__ import annotations

import numpy as np
import pytest
from pdserve.cache import BlockPool, Tier


def test_fresh_pool_hands_out_ascending_ids_and_reuses_freed_first() -> None:
    pool = BlockPool(8)
    assert pool.allocate(3) == [0, 1, 2]
    pool.decref([1])
    assert pool.allocate(2) == [1, 3]
    assert (pool.num_free, pool.num_cached, pool.num_in_use) == (4, 0, 4)
    pool.check_invariants()


def test_can_allocate_then_allocate_takes_nothing_on_failure() -> None:
    pool = BlockPool(4, Tier.HOST)
    assert pool.tier is Tier.HOST
    assert pool.can_allocate(4) and not pool.can_allocate(5) and not pool.can_allocate(-1)
    with pytest.raises(ValueError, match="cannot allocate 5 blocks: only 4 free in the HOST pool"):
        pool.allocate(5)
    assert pool.num_free == 4
    pool.check_invariants()


def test_refcounts_incref_decref_and_numpy_ids() -> None:
    pool = BlockPool(4)
    ids = pool.allocate(2)
    pool.incref(np.array(ids, dtype=np.int64))
    assert [pool.ref_count(i) for i in ids] == [2, 2]
    pool.decref(np.array(ids, dtype=np.int32))
    pool.decref(ids)
    assert pool.num_free == 4
    pool.check_invariants()


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda p: p.decref([7]), "unknown block id 7"),
        (lambda p: p.decref([1]), "double free of block 1"),
        (lambda p: p.incref([2]), "block 2 of the GPU pool is free"),
        (lambda p: p.allocate(-1), "negative number of blocks: -1"),
        (lambda p: p.ref_count(99), "unknown block id 99"),
    ],
)
def test_errors_name_the_bad_value(call, message) -> None:
    pool = BlockPool(4)
    pool.allocate(1)
    with pytest.raises(ValueError, match=message):
        call(pool)
    pool.check_invariants()


def test_decref_is_all_or_nothing() -> None:
    pool = BlockPool(4)
    ids = pool.allocate(2)
    with pytest.raises(ValueError, match="double free of block 0"):
        pool.decref([ids[0], ids[1], ids[0]])
    assert [pool.ref_count(i) for i in ids] == [1, 1]
    assert pool.num_free == 2
    pool.check_invariants()


def test_reservations() -> None:
    pool = BlockPool(6)
    assert pool.reserve("req-1", 2) == [0, 1]
    assert pool.reserve("req-1", 1) == [2]
    assert pool.reserved_blocks("req-1") == [0, 1, 2]
    assert pool.num_reserved == 3 and pool.num_in_use == 3
    with pytest.raises(ValueError, match="held by a reservation"):
        pool.decref([1])
    assert pool.release_reservation("req-1") == 3
    assert pool.release_reservation("req-1") == 0  # idempotent on abort paths
    assert pool.num_free == 6 and pool.num_reserved == 0
    pool.reserve("req-2", 2)
    taken = pool.transfer_reservation("req-2")
    assert taken == [2, 1] or sorted(taken) == [1, 2]
    assert pool.num_reserved == 0 and pool.num_in_use == 2
    pool.decref(taken)
    with pytest.raises(ValueError, match="no reservation for request id 'nope'"):
        pool.transfer_reservation("nope")
    with pytest.raises(ValueError, match="cannot allocate 7 blocks"):
        pool.reserve("req-3", 7)
    assert pool.reserved_blocks("req-3") == []
    pool.check_invariants()


def test_bad_construction() -> None:
    with pytest.raises(ValueError, match="num_blocks must be >= 0, got -3"):
        BlockPool(-3)
    with pytest.raises(ValueError, match="tier must be 0 .GPU. or 1 .HOST., got 5"):
        BlockPool(3, 5)  # type: ignore[arg-type]


def test_block_id_inputs_of_every_int_kind() -> None:
    """The list fast path reads plain ints in place; other int kinds take the checked path."""

    class MyInt(int):
        pass

    pool = BlockPool(8)
    ids = pool.allocate(3)
    pool.incref([MyInt(ids[0]), np.int64(ids[1]), True])  # True is block 1
    assert [pool.ref_count(i) for i in ids] == [2, 3, 1]
    pool.decref(np.array([ids[0], ids[1], ids[1]], dtype=np.int64))
    pool.decref(np.array(ids[::-1], dtype=">i8").astype(np.int32))
    assert pool.num_free == 8
    for bad in (-1, 8):
        with pytest.raises(ValueError, match=f"unknown block id {bad}"):
            pool.decref([bad])
    with pytest.raises(ValueError, match=r"block_ids\[1\] = 1099511627776 does not fit in int32"):
        pool.decref([0, 2**40])
    with pytest.raises(TypeError, match="native byte order"):
        pool.decref(np.zeros(2, dtype=">i4"))
    with pytest.raises(TypeError, match=r"block_ids\[0\] must be an int, got float"):
        pool.decref([1.0])
    pool.check_invariants()


def test_fast_methods_take_keywords_and_index_ints() -> None:
    pool = BlockPool(4)
    assert pool.can_allocate(num_blocks=np.int64(4))
    ids = pool.allocate(num_blocks=2)
    pool.incref(block_ids=ids)
    pool.decref(block_ids=ids)
    pool.decref(ids)
    with pytest.raises(TypeError, match="unexpected or repeated argument 'n'"):
        pool.allocate(n=1)
    with pytest.raises(TypeError, match="missing required argument 'num_blocks'"):
        pool.allocate()
    with pytest.raises(TypeError, match="num_blocks must be an int, got str"):
        pool.allocate("1")
    with pytest.raises(ValueError, match="num_blocks = 1099511627776 does not fit in int32"):
        pool.can_allocate(2**40)
    assert pool.num_free == 4


def test_ids_beyond_the_shared_int_cache() -> None:
    """Ids past the cache of shared ints (2**20) come back as fresh ints with the same values."""
    n = (1 << 20) + 3
    pool = BlockPool(n)
    ids = pool.allocate(n)
    assert ids[-3:] == [n - 3, n - 2, n - 1] and len(ids) == n
    pool.decref(ids[-3:])
    assert pool.allocate(3) == [n - 1, n - 2, n - 3]
    pool.decref(ids[:-3] + [n - 1, n - 2, n - 3])
    assert pool.num_free == n
