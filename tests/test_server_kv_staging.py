"""Host staging slots: gather/scatter move exactly the listed blocks, per layer or all, in both layouts."""

from __future__ import annotations

import pytest
import torch
from pdserve.server.kv_staging import NoStagingRoom, StagingArena

L, B, PIECE = 3, 8, (2, 4, 2, 5)


@pytest.mark.parametrize("block_major", [False, True])
def test_round_trip_through_slots(block_major):
    shape = (B, L, *PIECE) if block_major else (L, B, *PIECE)
    src = torch.randn(shape)
    dst = torch.zeros(shape)
    a, b = StagingArena(src, block_major, 4), StagingArena(dst, block_major, 4)
    assert a.layout.num_layers == L and a.layout.piece_nbytes == torch.zeros(PIECE).numel() * 4
    slots = a.alloc(2)
    # layer by layer on one side...
    for layer in range(L):
        a.gather([5, 1], slots, layer)
    # ...the bytes cross (as the transfer engine would copy them), then all layers land at once
    b_slots = b.alloc(2)
    b.host[torch.tensor(b_slots)] = a.host[torch.tensor(slots)]
    b.scatter([2, 7], b_slots)
    get = (lambda t, blk: t[blk]) if block_major else (lambda t, blk: t[:, blk])
    assert torch.equal(get(dst, 2), get(src, 5)) and torch.equal(get(dst, 7), get(src, 1))
    assert get(dst, 0).abs().sum() == 0  # nothing else was written
    # whole-request gather equals the per-layer one
    other = a.alloc(2)
    a.gather([5, 1], other)
    assert torch.equal(a.host[torch.tensor(other)], a.host[torch.tensor(slots)])


def test_slots_are_check_then_take():
    arena = StagingArena(torch.zeros((L, B, *PIECE)), False, 3)
    taken = arena.alloc(2)
    with pytest.raises(NoStagingRoom, match="--staging-gb"):
        arena.alloc(2)
    assert arena.num_free_slots == 1
    arena.free(taken)
    assert arena.num_free_slots == 3
