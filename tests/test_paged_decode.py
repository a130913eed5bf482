"""Paged decode attention (Triton) against the torch reference: on the GPU (marker gpu) and, where
Triton is installed, on the CPU through Triton's interpreter in a subprocess."""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from pdserve.ops.paged_decode import paged_decode_reference


def _make_case(
    num_seqs, num_q_heads, num_kv_heads, head_dim, block_size, max_len, dtype, device, seed
):
    """Random paged cache with shuffled, non-contiguous block tables and ragged lengths."""
    g = torch.Generator().manual_seed(seed)
    seq_lens = torch.randint(1, max_len + 1, (num_seqs,), generator=g, dtype=torch.int32)
    seq_lens[0] = max_len
    max_blocks = (max_len + block_size - 1) // block_size
    num_blocks = num_seqs * max_blocks + 3
    perm = torch.randperm(num_blocks, generator=g)[: num_seqs * max_blocks]
    block_tables = perm.view(num_seqs, max_blocks).to(torch.int32)
    # Layer-major cache slice [num_blocks, 2, block_size, kv_heads, head_dim]: K and V interleaved per
    # block, as in docs/DESIGN.md §2, so the kernel sees the real strides.
    kv = torch.randn(num_blocks, 2, block_size, num_kv_heads, head_dim, generator=g).to(dtype)
    q = torch.randn(num_seqs, num_q_heads, head_dim, generator=g).to(dtype)
    kv, q = kv.to(device), q.to(device)
    return q, kv[:, 0], kv[:, 1], block_tables.to(device), seq_lens.to(device)


CASES = [
    # num_seqs, q_heads, kv_heads, head_dim, block_size, max_len
    (1, 4, 4, 64, 16, 37),
    (3, 8, 2, 64, 16, 100),
    (2, 8, 1, 128, 32, 70),
    (5, 16, 2, 128, 16, 300),
]


def _rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.double() - ref.double()).norm() / ref.double().norm())


@pytest.mark.gpu
# (64, 32, 8, ...): enough programs for one split per sequence (the kernel writes out directly)
@pytest.mark.parametrize(
    "case",
    CASES + [(4, 40, 40, 128, 16, 4096), (2, 32, 8, 128, 32, 9000), (64, 32, 8, 128, 16, 200)],
)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_paged_decode_matches_reference_gpu(case, dtype):
    from pdserve.ops.paged_decode import paged_decode_attention

    q, k, v, bt, lens = _make_case(*case, dtype, "cuda", seed=hash(case) & 0xFFFF)
    scale = case[3] ** -0.5
    ref = paged_decode_reference(q.float(), k.float(), v.float(), bt, lens, scale)
    # max_seq_len 8x the longest context: a CUDA graph captured for long contexts replaying short ones
    for max_seq_len in (case[5], 8 * case[5]):
        out = torch.full_like(q, float("nan"))
        paged_decode_attention(q, k, v, bt, lens, scale, max_seq_len=max_seq_len, out=out)
        assert not torch.isnan(out).any()
        # bf16/fp16 operands in the two matmuls: relative error in the 1e-3..1e-2 band.
        assert _rel_err(out, ref) < 2e-2


def _make_tiled_case(chunks, num_q_heads, num_kv_heads, head_dim, block_size, dtype, device, seed):
    """Rows of prompt chunks as the step CUDA graphs lay them out: chunk (prefix, n) is n rows of one
    sequence, row j reading prefix + j + 1 tokens through the sequence's table; tiles of at most
    decode_rows_per_tile rows per chunk, then two padding rows (length 1, block 0) as one-row tiles.
    Returns q, k, v, row tables, row lengths, tiles (numpy [2, num_tiles])."""
    from pdserve.ops.paged_decode import decode_rows_per_tile

    g = torch.Generator().manual_seed(seed)
    per_tile = decode_rows_per_tile(num_q_heads // num_kv_heads)
    max_blocks = max(-(-(p + n) // block_size) for p, n in chunks)
    num_blocks = len(chunks) * max_blocks + 3
    perm = torch.randperm(num_blocks, generator=g)
    tables, lens, tiles = [], [], []
    for i, (prefix, n) in enumerate(chunks):
        table = perm[i * max_blocks : (i + 1) * max_blocks].tolist()
        for start in range(0, n, per_tile):
            tiles.append((len(lens), min(per_tile, n - start)))
            for j in range(start, min(start + per_tile, n)):
                tables.append(table)
                lens.append(prefix + j + 1)
    for _ in range(2):  # padding rows
        tiles.append((len(lens), 1))
        tables.append([0] * max_blocks)
        lens.append(1)
    kv = torch.randn(num_blocks, 2, block_size, num_kv_heads, head_dim, generator=g).to(dtype)
    q = torch.randn(len(lens), num_q_heads, head_dim, generator=g).to(dtype)
    kv = kv.to(device)
    tables_t = torch.tensor(tables, dtype=torch.int32).to(device)
    lens_t = torch.tensor(lens, dtype=torch.int32).to(device)
    return q.to(device), kv[:, 0], kv[:, 1], tables_t, lens_t, np.array(tiles, dtype=np.int64).T


def _work(tiles, lens, num_slots, max_splits, programs_per_kv_head, tile_n, device):
    """DecodeWork of the tiles (plan_decode_work) in num_slots slots, unused ones after the plan."""
    from pdserve.ops.paged_decode import DecodeWork, plan_decode_work

    items = np.full((4, num_slots), 7, dtype=np.int32)  # stale values: the plan overwrites
    row_splits = np.zeros(len(lens), dtype=np.int32)
    tile_lens = np.asarray(lens.cpu())[tiles[0] + tiles[1] - 1]
    plan_decode_work(items, row_splits, tiles, tile_lens, max_splits, programs_per_kv_head, tile_n)
    return DecodeWork(
        torch.from_numpy(items).to(device), torch.from_numpy(row_splits).to(device), max_splits
    )


TILED_CASES = [
    # chunks (prefix, new rows), q_heads, kv_heads, head_dim, block_size
    ([(0, 5), (37, 21), (49, 1)], 4, 4, 64, 16),
    ([(0, 40), (3, 1), (100, 9)], 8, 2, 64, 16),
    ([(64, 17), (0, 1)], 8, 1, 128, 32),
    ([(300, 33), (5, 2), (0, 16)], 16, 2, 128, 16),
]


def _check_tiled(case, dtype, device, max_err):
    """Work lists of one split per tile (the output written directly), of several, and of more
    splits than the tiles' contexts fill, against one reference row per query."""
    from pdserve.ops.paged_decode import paged_decode_attention, tile_n_for

    chunks, hq, hkv, d, bs = case
    q, k, v, bt, lens, tiles = _make_tiled_case(chunks, hq, hkv, d, bs, dtype, device, len(chunks))
    ref = paged_decode_reference(q.float(), k.float(), v.float(), bt, lens, d**-0.5)
    num_rows, num_tiles = q.shape[0], tiles.shape[1]
    tile_n = tile_n_for(d, bs)
    for max_splits, per_head in ((1, 1), (4, 4 * num_tiles), (64, 64 * num_tiles)):
        slots = max(num_rows, per_head) + 3  # unused slots after the plan
        work = _work(tiles, lens, slots, max_splits, per_head, tile_n, device)
        out = torch.full_like(q, float("nan"))
        paged_decode_attention(q, k, v, bt, lens, d**-0.5, 0, out=out, work=work)
        assert not torch.isnan(out).any(), (case, max_splits)
        err = _rel_err(out, ref)
        assert err < max_err, (case, max_splits, err)


@pytest.mark.gpu
@pytest.mark.parametrize(
    "case", TILED_CASES + [([(4000, 64), (1000, 1), (0, 200)], 40, 40, 128, 16)]
)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_tiled_rows_match_reference_gpu(case, dtype):
    """Tiles of prompt-chunk rows (each row causal) against one reference row per query."""
    _check_tiled(case, dtype, "cuda", 2e-2)


def test_work_plan_splits_tiles_evenly_within_its_bounds():
    from pdserve.ops.paged_decode import plan_decode_work

    tiles = np.array([[0, 16, 20], [16, 4, 1]])  # 16 rows, 4 rows, 1 row
    lens = np.array([400, 40, 1000])
    items = np.full((4, 12), 9, dtype=np.int32)
    row_splits = np.zeros(21, dtype=np.int32)
    # 8 programs per kv head over 3 tiles: 2 splits each (the 40-token tile fills 2 x 32 tokens)
    assert plan_decode_work(items, row_splits, tiles, lens, 8, 8, 32) == 6
    assert items[:, :6].tolist() == [
        [0, 0, 16, 16, 20, 20],
        [16, 16, 4, 4, 1, 1],
        [0, 1, 0, 1, 0, 1],
        [2, 2, 2, 2, 2, 2],
    ]
    assert np.all(items[1, 6:] == 0)  # unused slots
    assert row_splits.tolist() == [2] * 21
    # max_splits caps; a tile never splits finer than one tile_n of its context
    assert plan_decode_work(items, row_splits, tiles, lens, 3, 100, 32) == 3 + 2 + 3
    assert items[3, :8].tolist() == [3, 3, 3, 2, 2, 3, 3, 3]
    assert row_splits.tolist() == [3] * 16 + [2] * 4 + [3]
    with pytest.raises(ValueError, match="do not fit"):
        plan_decode_work(items[:, :5], row_splits, tiles, lens, 3, 100, 32)


def test_work_list_is_checked():
    from pdserve.ops.paged_decode import paged_decode_attention

    q, k, v, bt, lens, tiles = _make_tiled_case([(3, 4)], 4, 4, 16, 4, torch.float32, "cpu", 0)
    work = _work(tiles, lens, 8, 2, 2, 32, "cpu")
    with pytest.raises(ValueError, match="work items must be int32"):
        bad = dataclasses.replace(work, items=work.items.long())
        paged_decode_attention(q, k, v, bt, lens, 0.25, 8, work=bad)
    with pytest.raises(ValueError, match="row_splits must be int32"):
        bad = dataclasses.replace(work, row_splits=work.row_splits[:-1])
        paged_decode_attention(q, k, v, bt, lens, 0.25, 8, work=bad)


_INTERPRETER_SCRIPT = textwrap.dedent(
    """
    import torch, sys
    sys.path.insert(0, {tests_dir!r})
    from test_paged_decode import CASES, TILED_CASES, _check_tiled, _make_case, _rel_err
    from pdserve.ops.paged_decode import paged_decode_attention, paged_decode_reference
    for i, case in enumerate(CASES):
        q, k, v, bt, lens = _make_case(*case, torch.float32, "cpu", seed=i)
        ref = paged_decode_reference(q, k, v, bt, lens, case[3] ** -0.5)
        for max_seq_len in (case[5], 8 * case[5]):  # 8x: a graph sized for longer contexts
            out = torch.full_like(q, float("nan"))
            paged_decode_attention(
                q, k, v, bt, lens, case[3] ** -0.5, max_seq_len=max_seq_len, out=out, num_sms=4
            )
            err = _rel_err(out, ref)
            assert err < 1e-4, (case, max_seq_len, err)
    for case in TILED_CASES:
        _check_tiled(case, torch.float32, "cpu", 1e-4)
    print("OK")
    """
)


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="Triton is not installed")
def test_paged_decode_triton_interpreter_cpu():
    script = _INTERPRETER_SCRIPT.format(tests_dir=os.path.dirname(__file__))
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0 and "OK" in proc.stdout, proc.stdout + proc.stderr


def test_reference_matches_dense_attention():
    """The reference itself against dense softmax attention on an unpaged copy."""
    q, k, v, bt, lens = _make_case(2, 4, 2, 16, 4, 9, torch.float64, "cpu", seed=7)
    out = paged_decode_reference(q, k, v, bt, lens, 0.25)
    for i in range(2):
        n = int(lens[i])
        kk = k[bt[i].long()].reshape(-1, 2, 16)[:n].repeat_interleave(2, dim=1)
        vv = v[bt[i].long()].reshape(-1, 2, 16)[:n].repeat_interleave(2, dim=1)
        p = torch.softmax(torch.einsum("hd,thd->ht", q[i], kk) * 0.25, -1)
        assert torch.allclose(out[i], torch.einsum("ht,thd->hd", p, vv))
