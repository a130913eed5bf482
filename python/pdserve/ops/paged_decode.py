"""Paged decode attention (flash-decoding) in Triton: one query token per sequence reads K/V straight
from the paged KV cache through its block table, split over the context so long sequences fill the GPU.

Work-list mode (`work=`, `DecodeWork`): a program takes one split of a tile of up to
`decode_rows_per_tile(group)` consecutive query rows of one sequence (a prompt chunk replayed through
the step CUDA graphs, each row attending causally to its own length), so the chunk's context is read
once per tile instead of once per row, and each tile is split as finely as the step's tile count
allows (`plan_decode_work`: the grid is fixed when a graph is captured, the plan is not). The tile's
rows fill the matmul rows a lone decode query pads to 16 anyway.

Why split-K: at batch 1 a single program per (sequence, KV head) would leave most SMs idle; splitting the
context into partitions and reducing the partial softmax states in a second kernel keeps the read rate
near HBM bandwidth from 1 to 128 sequences and from 1k to 32k tokens.

Layout (docs/DESIGN.md §2): the K cache of one layer is a strided view `[num_blocks, block_size,
num_kv_heads, head_dim]` (V the same shape); only the last dimension must be contiguous.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from pdserve.ops.paged_prefill import paged_prefill_reference
from pdserve.ops.pdl import launch_kwargs

try:  # Triton is optional: CPU installs run the torch reference path instead.
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised on machines without Triton
    triton = None
    tl = None


def paged_decode_reference(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Plain torch paged decode attention (the correctness reference; any device).

    q: [num_seqs, num_q_heads, head_dim]; k_cache/v_cache: [num_blocks, block_size, num_kv_heads, head_dim];
    block_tables: [num_seqs, max_blocks_per_seq] int32; seq_lens: [num_seqs] int32.
    Returns a new tensor shaped like q, computed in float32 and cast to q's dtype.
    """
    # decode is prefill with one new token per sequence: one reference serves both kernels
    cu_q_lens = torch.arange(q.shape[0] + 1, dtype=torch.int32, device=q.device)
    return paged_prefill_reference(q, k_cache, v_cache, block_tables, cu_q_lens, seq_lens, scale)


if triton is not None:

    @triton.jit
    def _tokens_per_split(seq_len, num_splits, TILE_N: tl.constexpr):
        """Each sequence's own context split into num_splits whole tiles: a short sequence in a batch
        (or CUDA graph) sized for long ones still spreads its few tiles over many programs."""
        return tl.cdiv(tl.cdiv(seq_len, num_splits), TILE_N) * TILE_N

    @triton.jit
    def _paged_decode_partial_kernel(
        q_ptr,  # [num_seqs, num_q_heads, HEAD_DIM]
        k_ptr,  # [num_blocks, BLOCK_SIZE, num_kv_heads, HEAD_DIM] (strided)
        v_ptr,  # same shape and strides as k
        block_tables_ptr,  # [num_seqs, max_blocks_per_seq] int32
        seq_lens_ptr,  # [num_seqs] int32
        work_ptr,  # WORK: [4, num_programs(0)] int32: first row, rows (0: none), split, splits
        part_out_ptr,  # [num_seqs, num_q_heads, num_splits, HEAD_DIM] fp32
        part_max_ptr,  # [num_seqs, num_q_heads, num_splits] fp32
        part_sum_ptr,  # [num_seqs, num_q_heads, num_splits] fp32
        out_ptr,  # [num_seqs, num_q_heads, HEAD_DIM]: written here when DIRECT
        scale,
        stride_q_seq,
        stride_q_head,
        stride_kv_block,
        stride_kv_token,
        stride_kv_head,
        stride_bt_seq,
        stride_out_seq,
        stride_out_head,
        stride_work,
        num_splits,  # the partials' split stride (WORK: the most splits of any tile)
        GROUP: tl.constexpr,  # q heads per kv head
        GROUP_PAD: tl.constexpr,  # GROUP padded to >= 16 for tl.dot; WORK: rows x GROUP, padded
        HEAD_DIM: tl.constexpr,
        BLOCK_SIZE: tl.constexpr,  # tokens per KV block
        TILE_N: tl.constexpr,  # tokens per inner iteration (a multiple of BLOCK_SIZE)
        DIRECT: tl.constexpr,  # one split: the normalized output straight to out (no reduce kernel)
        WORK: tl.constexpr,  # program 0-index = a work item (a split of a tile of rows), else a row
        USE_PDL: tl.constexpr,
    ):
        if USE_PDL:  # see pdserve.ops.pdl: nothing below reads or writes before the wait
            tl.extra.cuda.gdc_launch_dependents()
            tl.extra.cuda.gdc_wait()
        kv_head = tl.program_id(1)
        offs_g = tl.arange(0, GROUP_PAD)
        offs_d = tl.arange(0, HEAD_DIM)
        offs_n = tl.arange(0, TILE_N)

        if WORK:
            # matmul row m = (row m // GROUP of the tile, q head m % GROUP of this kv head)
            item = tl.program_id(0)
            first_row = tl.load(work_ptr + item)
            num_rows = tl.load(work_ptr + stride_work + item)
            if num_rows == 0:
                return
            split_idx = tl.load(work_ptr + 2 * stride_work + item)
            tile_splits = tl.load(work_ptr + 3 * stride_work + item)
            rows = first_row + offs_g // GROUP  # [GROUP_PAD]
            mask_g = (offs_g // GROUP < num_rows) & (offs_g < (GROUP_PAD // GROUP) * GROUP)
            q_heads = kv_head * GROUP + offs_g % GROUP
            row_lens = tl.load(seq_lens_ptr + rows, mask=mask_g, other=0)  # row r reads row_lens[r]
            seq_len = tl.max(row_lens, axis=0)  # the tile's last row: all rows share its table
            table_row = first_row
            q_offs = rows[:, None] * stride_q_seq
            out_row_offs = rows[:, None] * stride_out_seq
        else:
            seq_idx = tl.program_id(0)
            rows = seq_idx
            mask_g = offs_g < GROUP
            q_heads = kv_head * GROUP + offs_g
            seq_len = tl.load(seq_lens_ptr + seq_idx)
            table_row = seq_idx
            q_offs = seq_idx * stride_q_seq
            out_row_offs = seq_idx * stride_out_seq
            split_idx = tl.program_id(2)
            tile_splits = num_splits
        tokens_per_split = _tokens_per_split(seq_len, tile_splits, TILE_N)
        split_start = split_idx * tokens_per_split
        split_end = tl.minimum(split_start + tokens_per_split, seq_len)

        q = tl.load(
            q_ptr + q_offs + q_heads[:, None] * stride_q_head + offs_d[None, :],
            mask=mask_g[:, None],
            other=0.0,
        )
        q = (q.to(tl.float32) * scale).to(q_ptr.dtype.element_ty)

        m_i = tl.full([GROUP_PAD], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([GROUP_PAD], dtype=tl.float32)
        acc = tl.zeros([GROUP_PAD, HEAD_DIM], dtype=tl.float32)

        for tile_start in range(split_start, split_end, TILE_N):
            tok = tile_start + offs_n
            mask_n = tok < split_end
            block_idx = tok // BLOCK_SIZE
            block_ids = tl.load(
                block_tables_ptr + table_row * stride_bt_seq + block_idx, mask=mask_n, other=0
            )
            kv_offs = (
                block_ids.to(tl.int64)[:, None] * stride_kv_block
                + (tok % BLOCK_SIZE)[:, None] * stride_kv_token
                + kv_head * stride_kv_head
                + offs_d[None, :]
            )
            k = tl.load(k_ptr + kv_offs, mask=mask_n[:, None], other=0.0)
            scores = tl.dot(q, tl.trans(k))  # [GROUP_PAD, TILE_N]
            if WORK:  # causal: row r reads its first row_lens[r] tokens; a row may see none here
                seen = mask_n[None, :] & (tok[None, :] < row_lens[:, None])
                scores = tl.where(seen, scores, float("-inf"))
                m_new = tl.maximum(m_i, tl.max(scores, axis=1))
                # a row with no token yet keeps max -inf; exp() runs off 0 then, not -inf - -inf
                m_exp = tl.where(m_new == float("-inf"), 0.0, m_new)
            else:
                scores = tl.where(mask_n[None, :], scores, float("-inf"))
                m_new = tl.maximum(m_i, tl.max(scores, axis=1))
                m_exp = m_new
            alpha = tl.exp(m_i - m_exp)
            p = tl.exp(scores - m_exp[:, None])
            l_i = l_i * alpha + tl.sum(p, axis=1)
            v = tl.load(v_ptr + kv_offs, mask=mask_n[:, None], other=0.0)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
            m_i = m_new

        if DIRECT:
            out_offs = out_row_offs + q_heads[:, None] * stride_out_head + offs_d[None, :]
            result = acc / l_i[:, None]  # lengths >= 1: every row saw a token
            tl.store(out_ptr + out_offs, result.to(out_ptr.dtype.element_ty), mask=mask_g[:, None])
        else:
            # a row that saw no token in this split stores max -inf, sum 0: weight 0 in the reduce
            part_idx = (rows * (GROUP * tl.num_programs(1)) + q_heads) * num_splits + split_idx
            tl.store(part_max_ptr + part_idx, m_i, mask=mask_g)
            tl.store(part_sum_ptr + part_idx, l_i, mask=mask_g)
            part_offs = part_idx[:, None] * HEAD_DIM + offs_d[None, :]
            tl.store(part_out_ptr + part_offs, acc, mask=mask_g[:, None])

    @triton.jit
    def _paged_decode_reduce_kernel(
        part_out_ptr,  # [num_seqs, num_q_heads, num_splits, HEAD_DIM] fp32
        part_max_ptr,  # [num_seqs, num_q_heads, num_splits] fp32
        part_sum_ptr,  # [num_seqs, num_q_heads, num_splits] fp32
        out_ptr,  # [num_seqs, num_q_heads, HEAD_DIM]
        seq_lens_ptr,
        row_splits_ptr,  # WORK: [num_seqs] int32, splits of each row's tile
        stride_out_seq,
        stride_out_head,
        num_q_heads,
        num_splits,
        HEAD_DIM: tl.constexpr,
        SPLITS_PAD: tl.constexpr,
        TILE_N: tl.constexpr,
        WORK: tl.constexpr,  # the row's number of splits from row_splits_ptr
        USE_PDL: tl.constexpr,
    ):
        if USE_PDL:  # see pdserve.ops.pdl: nothing below reads or writes before the wait
            tl.extra.cuda.gdc_launch_dependents()
            tl.extra.cuda.gdc_wait()
        seq_idx = tl.program_id(0)
        head = tl.program_id(1)
        if WORK:  # every split of the row's tile was written (one may not cover this row: weight 0)
            num_used = tl.load(row_splits_ptr + seq_idx)
        else:
            seq_len = tl.load(seq_lens_ptr + seq_idx)
            num_used = tl.cdiv(seq_len, _tokens_per_split(seq_len, num_splits, TILE_N))
        offs_s = tl.arange(0, SPLITS_PAD)
        offs_d = tl.arange(0, HEAD_DIM)
        mask_s = offs_s < num_used
        base = (seq_idx * num_q_heads + head) * num_splits
        m = tl.load(part_max_ptr + base + offs_s, mask=mask_s, other=float("-inf"))
        s = tl.load(part_sum_ptr + base + offs_s, mask=mask_s, other=0.0)
        m_all = tl.max(m, axis=0)
        w = tl.where(mask_s, tl.exp(m - m_all), 0.0)
        denom = tl.sum(w * s, axis=0)
        o = tl.load(
            part_out_ptr + (base + offs_s)[:, None] * HEAD_DIM + offs_d[None, :],
            mask=mask_s[:, None],
            other=0.0,
        )
        out = tl.sum(o * w[:, None], axis=0) / denom
        tl.store(
            out_ptr + seq_idx * stride_out_seq + head * stride_out_head + offs_d,
            out.to(out_ptr.dtype.element_ty),
        )


def _group_pad(group: int) -> int:
    """Matmul rows of one program: the q heads of one kv head, padded to >= 16 for tl.dot."""
    return max(16, 1 << (group - 1).bit_length())


def decode_rows_per_tile(group: int) -> int:
    """Query rows one tiled program takes (group: q heads per kv head): as many as fill its matmul
    rows, so a tile of n rows costs what one decode row does (16 at group 1, 4 at group 4)."""
    return _group_pad(group) // group


def tile_n_for(head_dim: int, block_size: int) -> int:
    """Context tokens one inner iteration of the decode kernel reads (the unit of its splits)."""
    return max(32, block_size) if head_dim <= 128 else max(16, block_size)


def wanted_programs(num_sms: int) -> int:
    """Programs per kv head that cover the SMs about 4 times."""
    return 4 * num_sms


@dataclass
class DecodeWork:
    """The work list of the decode kernel's work-list mode: item w is split items[2, w] of the
    items[3, w] splits of the tile of items[1, w] rows from row items[0, w] (0 rows: an unused
    slot). row_splits[r] is the number of splits of row r's tile; max_splits (≥ every tile's
    splits) is the partials' stride. Built by `plan_decode_work`; in a CUDA graph the two tensors are
    static buffers refilled before each replay."""

    items: torch.Tensor  # [4, num_slots] int32, device
    row_splits: torch.Tensor  # [num_rows] int32, device
    max_splits: int


def plan_decode_work(
    items: np.ndarray,
    row_splits: np.ndarray,
    tiles: np.ndarray,
    tile_lens: np.ndarray,
    max_splits: int,
    programs_per_kv_head: int,
    tile_n: int,
) -> int:
    """Fills `items` ([4, num_slots] int32) and `row_splits` ([num_rows] int32) for tiles ([2,
    num_tiles]: first row, number of rows; tile_lens: the tokens each reads): every tile gets the same
    number of splits, as many as keep about programs_per_kv_head programs busy, at most max_splits
    and at most one per tile_n tokens it reads. Needs num_slots ≥ max(num_tiles,
    programs_per_kv_head). Slots past the plan are marked unused; returns the number of items."""
    num_tiles = tiles.shape[1]
    if num_tiles == 0:
        items[1, :] = 0
        return 0
    splits = np.clip(
        -(-tile_lens // tile_n), 1, max(1, min(max_splits, programs_per_kv_head // num_tiles))
    )
    num_items = int(splits.sum())
    if num_items > items.shape[1]:
        raise ValueError(f"{num_items} work items do not fit {items.shape[1]} slots")
    first_item = np.cumsum(splits) - splits
    items[0, :num_items] = np.repeat(tiles[0], splits)
    items[1, :num_items] = np.repeat(tiles[1], splits)
    items[2, :num_items] = np.arange(num_items) - np.repeat(first_item, splits)
    items[3, :num_items] = np.repeat(splits, splits)
    items[1, num_items:] = 0
    num_rows = int(tiles[1].sum())
    row_splits[:num_rows] = np.repeat(splits, tiles[1])
    return num_items


def _check_inputs(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
) -> None:
    if q.dim() != 3:
        raise ValueError(f"q must be [num_seqs, num_q_heads, head_dim], got shape {tuple(q.shape)}")
    if k_cache.dim() != 4 or k_cache.shape != v_cache.shape:
        raise ValueError(
            "k_cache and v_cache must both be [num_blocks, block_size, num_kv_heads, head_dim], got "
            f"{tuple(k_cache.shape)} and {tuple(v_cache.shape)}"
        )
    if k_cache.stride() != v_cache.stride():
        raise ValueError(f"k/v strides differ: {k_cache.stride()} vs {v_cache.stride()}")
    num_seqs, num_q_heads, head_dim = q.shape
    _, block_size, num_kv_heads, kv_head_dim = k_cache.shape
    if kv_head_dim != head_dim:
        raise ValueError(f"head_dim mismatch: q has {head_dim}, cache has {kv_head_dim}")
    if num_q_heads % num_kv_heads:
        raise ValueError(
            f"num_q_heads={num_q_heads} is not a multiple of num_kv_heads={num_kv_heads}"
        )
    if head_dim not in (16, 32, 64, 128, 256):
        raise ValueError(f"head_dim={head_dim} not supported; allowed: 16, 32, 64, 128, 256")
    if block_size < 1 or (block_size & (block_size - 1)):
        raise ValueError(f"block_size={block_size} must be a power of two")
    if k_cache.stride(3) != 1 or q.stride(2) != 1:
        raise ValueError("the last dimension of q and of the KV cache must be contiguous")
    if q.dtype != k_cache.dtype or k_cache.dtype != v_cache.dtype:
        raise ValueError(f"dtype mismatch: q {q.dtype}, k {k_cache.dtype}, v {v_cache.dtype}")
    if block_tables.dtype != torch.int32 or seq_lens.dtype != torch.int32:
        raise ValueError(
            f"block_tables and seq_lens must be int32, got {block_tables.dtype}, {seq_lens.dtype}"
        )
    if block_tables.dim() != 2 or block_tables.shape[0] != num_seqs:
        raise ValueError(
            f"block_tables must be [num_seqs={num_seqs}, max_blocks], got {tuple(block_tables.shape)}"
        )
    if seq_lens.shape != (num_seqs,):
        raise ValueError(f"seq_lens must be [{num_seqs}], got {tuple(seq_lens.shape)}")
    devices = {t.device for t in (q, k_cache, v_cache, block_tables, seq_lens)}
    if len(devices) != 1:
        raise ValueError(f"all inputs must be on one device, got {sorted(map(str, devices))}")


def paged_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    max_seq_len: int,
    out: torch.Tensor | None = None,
    num_sms: int | None = None,
    work: DecodeWork | None = None,
) -> torch.Tensor:
    """Decode attention over the paged KV cache (Triton; CUDA tensors, or CPU under TRITON_INTERPRET=1).

    q: [num_seqs, num_q_heads, head_dim] (bf16/fp16/fp32); k_cache, v_cache: [num_blocks, block_size,
    num_kv_heads, head_dim] strided views of one layer of the cache; block_tables: [num_seqs, max_blocks]
    int32; seq_lens: [num_seqs] int32, each ≥ 1 and ≤ max_seq_len. `max_seq_len` is a host-side bound used
    to size the context split (no device sync). Writes into `out` (shaped like q) when given; returns it.

    `work` (see DecodeWork, tensors on q's device): row r of q reads the first seq_lens[r] tokens of a
    sequence, and the rows come in tiles of at most `decode_rows_per_tile(group)` consecutive rows of
    one sequence, lengths increasing, all read through the table of the tile's first row (which
    must cover the last row's length). Every row belongs to exactly one tile, and every split of
    every tile to one work item. Without `work` each row is its own tile, split as `max_seq_len` and
    the SM count suggest.
    """
    if triton is None:
        raise RuntimeError("paged_decode_attention needs Triton, which is not installed")
    _check_inputs(q, k_cache, v_cache, block_tables, seq_lens)
    num_seqs, num_q_heads, head_dim = q.shape
    _, block_size, num_kv_heads, _ = k_cache.shape
    group = num_q_heads // num_kv_heads
    if work is not None:
        items, row_splits = work.items, work.row_splits
        if items.dtype != torch.int32 or items.dim() != 2 or items.shape[0] != 4:
            raise ValueError(
                f"work items must be int32 [4, num_slots], got {items.dtype} {tuple(items.shape)}"
            )
        if row_splits.dtype != torch.int32 or row_splits.shape != (num_seqs,):
            raise ValueError(
                f"row_splits must be int32 [{num_seqs}], got {row_splits.dtype} "
                f"{tuple(row_splits.shape)}"
            )
        if {items.device, row_splits.device} != {q.device} or items.stride(1) != 1:
            raise ValueError(f"work items must be contiguous rows on {q.device}")
        if work.max_splits < 1:
            raise ValueError(f"work.max_splits must be >= 1, got {work.max_splits}")
    if out is None:
        out = torch.empty_like(q)
    if num_seqs == 0:
        return out

    tile_n = tile_n_for(head_dim, block_size)
    if work is not None:
        num_splits = work.max_splits
    else:
        # Enough programs to cover the SMs about 4 times, at most one split per tile of the longest
        # context (a split of one tile is the quickest for short contexts: its few dependent loads
        # run in parallel).
        sms = num_sms or (
            torch.cuda.get_device_properties(q.device).multi_processor_count if q.is_cuda else 8
        )
        wanted_splits = max(1, wanted_programs(sms) // max(1, num_seqs * num_kv_heads))
        max_splits = max(1, math.ceil(max_seq_len / tile_n))
        num_splits = min(wanted_splits, max_splits, 128)
    # the kernels split each sequence's own length (_tokens_per_split); max_seq_len only bounds the
    # number of splits worth launching

    direct = num_splits == 1  # one split per sequence: no partials, no reduce kernel
    if direct:
        part_out = part_max = part_sum = out  # not touched by the kernel
    else:
        part_out = torch.empty(
            (num_seqs, num_q_heads, num_splits, head_dim), dtype=torch.float32, device=q.device
        )
        part_max = torch.empty(
            (num_seqs, num_q_heads, num_splits), dtype=torch.float32, device=q.device
        )
        part_sum = torch.empty_like(part_max)
    listed = work is not None
    grid = (
        (work.items.shape[1], num_kv_heads, 1) if listed else (num_seqs, num_kv_heads, num_splits)
    )
    _paged_decode_partial_kernel[grid](
        q,
        k_cache,
        v_cache,
        block_tables,
        seq_lens,
        work.items if listed else seq_lens,  # not read without a work list
        part_out,
        part_max,
        part_sum,
        out,
        scale,
        q.stride(0),
        q.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        block_tables.stride(0),
        out.stride(0),
        out.stride(1),
        work.items.stride(0) if listed else 0,
        num_splits,
        GROUP=group,
        GROUP_PAD=_group_pad(group),
        HEAD_DIM=head_dim,
        BLOCK_SIZE=block_size,
        TILE_N=tile_n,
        DIRECT=direct,
        WORK=listed,
        num_warps=4,
        num_stages=2,
        **launch_kwargs(q),
    )
    if direct:
        return out
    _paged_decode_reduce_kernel[(num_seqs, num_q_heads)](
        part_out,
        part_max,
        part_sum,
        out,
        seq_lens,
        work.row_splits if listed else seq_lens,  # not read without a work list
        out.stride(0),
        out.stride(1),
        num_q_heads,
        num_splits,
        HEAD_DIM=head_dim,
        SPLITS_PAD=max(2, triton.next_power_of_2(num_splits)),
        TILE_N=tile_n,
        WORK=listed,
        num_warps=4,
        **launch_kwargs(q),
    )
    return out
