"""KV piece addressing: layer-major and block-major layouts, merging of contiguous runs."""

from __future__ import annotations

import pytest
from pdserve.server.kv_pieces import LayoutInfo, build_pieces

L, NB, P = 3, 10, 64


def layer_major(base):
    return LayoutInfo(base, L * NB * P, L, NB, P, NB * P, P)


def block_major(base):
    return LayoutInfo(base, L * NB * P, L, NB, P, P, L * P)


def test_layer_major_one_layer_merges_consecutive_blocks():
    src, dst = layer_major(1000), layer_major(100_000)
    pieces = build_pieces(src, dst, [1], [2, 3, 4, 8], [5, 6, 7, 0])
    assert pieces == [
        (1000 + NB * P + 2 * P, 100_000 + NB * P + 5 * P, 3 * P),
        (1000 + NB * P + 8 * P, 100_000 + NB * P, P),
    ]
    assert sum(n for *_, n in pieces) == 4 * P


def test_block_major_whole_request_is_one_piece_per_block_run():
    src, dst = block_major(0), block_major(1 << 20)
    pieces = build_pieces(src, dst, list(range(L)), [4, 5], [1, 2])
    assert pieces == [(4 * L * P, (1 << 20) + 1 * L * P, 2 * L * P)]


def test_out_of_range_and_mismatch():
    src = layer_major(0)
    with pytest.raises(ValueError, match="out of range"):
        build_pieces(src, src, [L], [0], [0])
    with pytest.raises(ValueError, match="differ in length"):
        build_pieces(src, src, [0], [0, 1], [0])
    assert layer_major(0).compatible_with(LayoutInfo(0, 1, L, NB, 2 * P, 1, 1)) is not None
