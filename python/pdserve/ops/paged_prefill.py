"""Paged prefill ("extend") attention in Triton: the new tokens of each sequence attend causally to the
cached prefix and to themselves, reading every K/V straight from the paged cache through the block table.

Why a kernel of our own: with radix caching a prompt's prefix already sits in scattered cache blocks;
gathering it into a dense tensor for SDPA costs a copy of the whole prefix per layer. Here the engine
writes the new tokens' K/V into their blocks first, then this kernel reads prefix and new tokens alike.

Layout (docs/DESIGN.md §2): K and V of one layer are strided views `[num_blocks, block_size, num_kv_heads,
head_dim]`; queries are packed varlen `[num_new_tokens_total, num_q_heads, head_dim]`.
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover
    triton = None
    tl = None


def paged_prefill_reference(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    cu_q_lens: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Plain torch reference. q: [total_new_tokens, num_q_heads, head_dim]; cu_q_lens: [num_seqs+1] int32
    (prefix sums of new-token counts); seq_lens: [num_seqs] int32 total tokens (prefix + new) per sequence.
    New token j of sequence i sits at position seq_lens[i] - q_len_i + j. Returns a tensor shaped like q."""
    out = torch.empty_like(q)
    num_q_heads, head_dim = q.shape[1], q.shape[2]
    block_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    group = num_q_heads // num_kv_heads
    for i in range(seq_lens.shape[0]):
        start, end = int(cu_q_lens[i]), int(cu_q_lens[i + 1])
        seq_len, q_len = int(seq_lens[i]), end - start
        if q_len == 0:
            continue
        num_blocks = (seq_len + block_size - 1) // block_size
        ids = block_tables[i, :num_blocks].long()
        k = k_cache[ids].reshape(-1, num_kv_heads, head_dim)[:seq_len].float()
        v = v_cache[ids].reshape(-1, num_kv_heads, head_dim)[:seq_len].float()
        k = k.repeat_interleave(group, dim=1)
        v = v.repeat_interleave(group, dim=1)
        scores = torch.einsum("qhd,thd->hqt", q[start:end].float(), k) * scale
        q_pos = torch.arange(seq_len - q_len, seq_len, device=q.device)
        mask = torch.arange(seq_len, device=q.device)[None, :] > q_pos[:, None]
        scores.masked_fill_(mask[None], float("-inf"))
        out[start:end] = torch.einsum("hqt,thd->qhd", torch.softmax(scores, -1), v).to(q.dtype)
    return out


if triton is not None:

    @triton.jit
    def _paged_prefill_kernel(
        q_ptr,  # [total_new_tokens, num_q_heads, HEAD_DIM]
        k_ptr,  # [num_blocks, BLOCK_SIZE, num_kv_heads, HEAD_DIM] (strided)
        v_ptr,  # same shape and strides as k
        out_ptr,  # [total_new_tokens, num_q_heads, HEAD_DIM]
        block_tables_ptr,  # [num_seqs, max_blocks] int32
        cu_q_lens_ptr,  # [num_seqs + 1] int32
        seq_lens_ptr,  # [num_seqs] int32
        scale,
        stride_q_tok,
        stride_q_head,
        stride_o_tok,
        stride_o_head,
        stride_kv_block,
        stride_kv_token,
        stride_kv_head,
        stride_bt_seq,
        GROUP: tl.constexpr,
        HEAD_DIM: tl.constexpr,
        BLOCK_SIZE: tl.constexpr,
        BLOCK_M: tl.constexpr,  # query tokens per program
        BLOCK_N: tl.constexpr,  # key tokens per iteration
    ):
        seq_idx = tl.program_id(0)
        m_block = tl.program_id(1)
        head = tl.program_id(2)
        kv_head = head // GROUP

        q_start = tl.load(cu_q_lens_ptr + seq_idx)
        q_len = tl.load(cu_q_lens_ptr + seq_idx + 1) - q_start
        if m_block * BLOCK_M >= q_len:
            return
        seq_len = tl.load(seq_lens_ptr + seq_idx)
        prefix_len = seq_len - q_len

        offs_m = m_block * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, HEAD_DIM)
        offs_n = tl.arange(0, BLOCK_N)
        mask_m = offs_m < q_len
        q = tl.load(
            q_ptr
            + (q_start + offs_m)[:, None] * stride_q_tok
            + head * stride_q_head
            + offs_d[None, :],
            mask=mask_m[:, None],
            other=0.0,
        )
        q = (q.to(tl.float32) * scale).to(q_ptr.dtype.element_ty)
        q_pos = prefix_len + offs_m  # absolute positions of these queries

        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
        # Keys up to the last query's position (causal); the rest of the sequence is never read.
        kv_end = tl.minimum(prefix_len + (m_block + 1) * BLOCK_M, seq_len)
        for n_start in range(0, kv_end, BLOCK_N):
            tok = n_start + offs_n
            mask_n = tok < kv_end
            block_ids = tl.load(
                block_tables_ptr + seq_idx * stride_bt_seq + tok // BLOCK_SIZE, mask=mask_n, other=0
            )
            kv_offs = (
                block_ids.to(tl.int64)[:, None] * stride_kv_block
                + (tok % BLOCK_SIZE)[:, None] * stride_kv_token
                + kv_head * stride_kv_head
                + offs_d[None, :]
            )
            k = tl.load(k_ptr + kv_offs, mask=mask_n[:, None], other=0.0)
            scores = tl.dot(q, tl.trans(k))
            causal = (tok[None, :] <= q_pos[:, None]) & mask_n[None, :]
            scores = tl.where(causal, scores, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(scores, axis=1))
            alpha = tl.exp(m_i - m_new)
            p = tl.exp(scores - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, axis=1)
            v = tl.load(v_ptr + kv_offs, mask=mask_n[:, None], other=0.0)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
            m_i = m_new

        out = acc / l_i[:, None]
        tl.store(
            out_ptr
            + (q_start + offs_m)[:, None] * stride_o_tok
            + head * stride_o_head
            + offs_d[None, :],
            out.to(out_ptr.dtype.element_ty),
            mask=mask_m[:, None],
        )


def paged_prefill_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    cu_q_lens: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    max_q_len: int,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Causal attention of new tokens over the paged cache (Triton; CUDA, or CPU under TRITON_INTERPRET=1).

    The new tokens' K/V must already be written into their cache blocks. q: [total_new_tokens, num_q_heads,
    head_dim]; cu_q_lens: [num_seqs+1] int32; seq_lens: [num_seqs] int32 (prefix + new tokens);
    block_tables: [num_seqs, max_blocks] int32; `max_q_len` bounds q_len on the host (grid size).
    Writes into `out` (shaped like q) when given; returns it.
    """
    if triton is None:
        raise RuntimeError("paged_prefill_attention needs Triton, which is not installed")
    if q.dim() != 3 or k_cache.dim() != 4 or k_cache.shape != v_cache.shape:
        raise ValueError(
            f"expected q [tokens, heads, dim] and k/v [blocks, block_size, kv_heads, dim]; got "
            f"{tuple(q.shape)}, {tuple(k_cache.shape)}, {tuple(v_cache.shape)}"
        )
    num_q_heads, head_dim = q.shape[1], q.shape[2]
    _, block_size, num_kv_heads, kv_dim = k_cache.shape
    if kv_dim != head_dim or num_q_heads % num_kv_heads:
        raise ValueError(
            f"head layout mismatch: q heads {num_q_heads} x {head_dim}, kv heads {num_kv_heads} x {kv_dim}"
        )
    if head_dim not in (16, 32, 64, 128, 256):
        raise ValueError(f"head_dim={head_dim} not supported; allowed: 16, 32, 64, 128, 256")
    if k_cache.stride() != v_cache.stride() or k_cache.stride(3) != 1 or q.stride(2) != 1:
        raise ValueError(
            "k/v must share strides and the last dimension of q, k, v must be contiguous"
        )
    if cu_q_lens.dtype != torch.int32 or seq_lens.dtype != torch.int32:
        raise ValueError("cu_q_lens and seq_lens must be int32")
    if block_tables.dtype != torch.int32:
        raise ValueError(f"block_tables must be int32, got {block_tables.dtype}")
    if out is None:
        out = torch.empty_like(q)
    num_seqs = seq_lens.shape[0]
    if num_seqs == 0 or max_q_len == 0:
        return out
    block_m = 64 if head_dim <= 128 else 32
    block_n = 64 if head_dim <= 128 else 32
    grid = (num_seqs, triton.cdiv(max_q_len, block_m), num_q_heads)
    _paged_prefill_kernel[grid](
        q,
        k_cache,
        v_cache,
        out,
        block_tables,
        cu_q_lens,
        seq_lens,
        scale,
        q.stride(0),
        q.stride(1),
        out.stride(0),
        out.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        block_tables.stride(0),
        GROUP=num_q_heads // num_kv_heads,
        HEAD_DIM=head_dim,
        BLOCK_SIZE=block_size,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        num_warps=4,
        num_stages=2,
    )
    return out
