"""Fused elementwise kernels for the GPU decode path (Triton): residual add + RMSNorm, SiLU(gate) * up,
and RoPE applied to q/k together with the paged KV-cache write.

Why: in a CUDA-graph decode step the GEMVs already run near HBM speed; what is left is a dozen small
kernels per layer. Fusing add+norm and rope+store halves them and removes the intermediate tensors.
Conventions match Hugging Face Llama: rotate-half RoPE (first and second halves of head_dim pair up),
RMSNorm computed in float32 and cast back before the weight multiply.
"""

from __future__ import annotations

import torch

from pdserve.ops.pdl import launch_kwargs

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover
    triton = None
    tl = None


def _need_triton(name: str) -> None:
    if triton is None:
        raise RuntimeError(f"{name} needs Triton, which is not installed")


if triton is not None:

    @triton.jit
    def _add_rms_norm_kernel(
        x_ptr,  # [num_tokens, hidden]
        residual_ptr,  # [num_tokens, hidden]: read (when HAS_RESIDUAL) and overwritten with x + residual
        weight_ptr,  # [hidden]
        out_ptr,  # [num_tokens, hidden]
        hidden,
        eps,
        stride_x,
        stride_r,
        stride_o,
        stride_part,
        HAS_RESIDUAL: tl.constexpr,
        BLOCK: tl.constexpr,
        NUM_PARTS: tl.constexpr,  # x holds NUM_PARTS partial sums (split-K GEMV output), added here
        USE_PDL: tl.constexpr,
    ):
        if USE_PDL:  # see pdserve.ops.pdl: nothing below reads or writes before the wait
            tl.extra.cuda.gdc_launch_dependents()
            tl.extra.cuda.gdc_wait()
        row = tl.program_id(0)
        offs = tl.arange(0, BLOCK)
        mask = offs < hidden
        x = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0).to(tl.float32)
        for part in tl.static_range(1, NUM_PARTS):
            x += tl.load(x_ptr + part * stride_part + row * stride_x + offs, mask=mask, other=0.0)
        if HAS_RESIDUAL:
            x += tl.load(residual_ptr + row * stride_r + offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(
            residual_ptr + row * stride_r + offs, x.to(residual_ptr.dtype.element_ty), mask=mask
        )
        var = tl.sum(x * x, axis=0) / hidden
        normed = (x * tl.rsqrt(var + eps)).to(out_ptr.dtype.element_ty)
        w = tl.load(weight_ptr + offs, mask=mask, other=0.0)
        tl.store(out_ptr + row * stride_o + offs, normed * w, mask=mask)

    @triton.jit
    def _silu_mul_kernel(
        gate_up_ptr,  # [num_tokens, 2 * inter]: gate then up
        out_ptr,  # [num_tokens, inter]
        inter,
        stride_in,
        stride_out,
        BLOCK: tl.constexpr,
        USE_PDL: tl.constexpr,
    ):
        if USE_PDL:  # see pdserve.ops.pdl: nothing below reads or writes before the wait
            tl.extra.cuda.gdc_launch_dependents()
            tl.extra.cuda.gdc_wait()
        row = tl.program_id(0)
        offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < inter
        g = tl.load(gate_up_ptr + row * stride_in + offs, mask=mask, other=0.0).to(tl.float32)
        u = tl.load(gate_up_ptr + row * stride_in + inter + offs, mask=mask, other=0.0)
        act = (g * tl.sigmoid(g)).to(out_ptr.dtype.element_ty)
        tl.store(out_ptr + row * stride_out + offs, act * u, mask=mask)

    @triton.jit
    def _rope_store_kv_kernel(
        q_ptr,  # [num_tokens, num_q_heads, HEAD_DIM], rotated in place
        k_ptr,  # [num_tokens, num_kv_heads, HEAD_DIM], rotated in place
        v_ptr,  # [num_tokens, num_kv_heads, HEAD_DIM]
        positions_ptr,  # [num_tokens] int64
        cos_sin_ptr,  # [max_position, HEAD_DIM]: cos in [:HALF], sin in [HALF:]
        k_cache_ptr,  # [num_blocks, block_size, num_kv_heads, HEAD_DIM] (strided view)
        v_cache_ptr,  # same shape and strides as k_cache
        slot_mapping_ptr,  # [num_tokens] int64: block_id * block_size + offset, -1 = do not store
        num_q_heads,
        num_kv_heads,
        block_size,
        stride_q_tok,
        stride_q_head,
        stride_k_tok,
        stride_k_head,
        stride_v_tok,
        stride_v_head,
        stride_c_block,
        stride_c_tok,
        stride_c_head,
        HEAD_DIM: tl.constexpr,
        HALF: tl.constexpr,
        USE_PDL: tl.constexpr,
    ):
        if USE_PDL:  # see pdserve.ops.pdl: nothing below reads or writes before the wait
            tl.extra.cuda.gdc_launch_dependents()
            tl.extra.cuda.gdc_wait()
        tok = tl.program_id(0)
        head = tl.program_id(1)  # 0 .. num_q_heads + num_kv_heads - 1
        pos = tl.load(positions_ptr + tok)
        offs = tl.arange(0, HALF)
        cos = tl.load(cos_sin_ptr + pos * HEAD_DIM + offs)
        sin = tl.load(cos_sin_ptr + pos * HEAD_DIM + HALF + offs)
        if head < num_q_heads:
            base = q_ptr + tok * stride_q_tok + head * stride_q_head
        else:
            base = k_ptr + tok * stride_k_tok + (head - num_q_heads) * stride_k_head
        x1 = tl.load(base + offs).to(tl.float32)
        x2 = tl.load(base + HALF + offs).to(tl.float32)
        y1 = (x1 * cos - x2 * sin).to(q_ptr.dtype.element_ty)
        y2 = (x2 * cos + x1 * sin).to(q_ptr.dtype.element_ty)
        tl.store(base + offs, y1)
        tl.store(base + HALF + offs, y2)
        if head >= num_q_heads:
            kv_head = head - num_q_heads
            slot = tl.load(slot_mapping_ptr + tok)
            if slot >= 0:
                dst = (slot // block_size) * stride_c_block + (slot % block_size) * stride_c_tok
                dst += kv_head * stride_c_head
                tl.store(k_cache_ptr + dst + offs, y1)
                tl.store(k_cache_ptr + dst + HALF + offs, y2)
                v_src = v_ptr + tok * stride_v_tok + kv_head * stride_v_head
                tl.store(v_cache_ptr + dst + offs, tl.load(v_src + offs))
                tl.store(v_cache_ptr + dst + HALF + offs, tl.load(v_src + HALF + offs))


def add_rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """out = RMSNorm(x + residual) * weight. Returns (out, new_residual) where new_residual = x + residual
    (or x itself, rounded, when residual is None). `residual` is overwritten in place when given.
    x: [num_tokens, hidden], or fp32 partial sums [num_parts, num_tokens, hidden] (a split-K GEMV's
    `reduce=False` output) whose sum is x; residual: [num_tokens, hidden]; weight: [hidden]; out and
    residual take weight's dtype; one device."""
    _need_triton("add_rms_norm")
    num_parts = x.shape[0] if x.dim() == 3 else 1
    if x.dim() not in (2, 3) or weight.shape != (x.shape[-1],) or x.stride(-1) != 1:
        raise ValueError(
            f"expected x [tokens, hidden] or [parts, tokens, hidden] (last dim contiguous) and weight "
            f"[hidden]; got {tuple(x.shape)}, {tuple(weight.shape)}"
        )
    num_tokens, hidden = x.shape[-2], x.shape[-1]
    out = torch.empty((num_tokens, hidden), dtype=weight.dtype, device=x.device)
    has_residual = residual is not None
    if residual is None:
        residual = torch.empty_like(out)
    if num_tokens:
        _add_rms_norm_kernel[(num_tokens,)](
            x,
            residual,
            weight,
            out,
            hidden,
            eps,
            x.stride(-2),
            residual.stride(0),
            out.stride(0),
            x.stride(0) if num_parts > 1 else 0,
            HAS_RESIDUAL=has_residual,
            BLOCK=triton.next_power_of_2(hidden),
            NUM_PARTS=num_parts,
            num_warps=8 if hidden >= 4096 else 4,
            **launch_kwargs(x),
        )
    return out, residual


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """SiLU(gate) * up for gate_up = [gate | up] of shape [num_tokens, 2 * inter]; returns [num_tokens, inter]."""
    _need_triton("silu_and_mul")
    if gate_up.dim() != 2 or gate_up.shape[1] % 2:
        raise ValueError(f"expected gate_up [tokens, 2*inter], got {tuple(gate_up.shape)}")
    num_tokens, inter = gate_up.shape[0], gate_up.shape[1] // 2
    out = torch.empty((num_tokens, inter), dtype=gate_up.dtype, device=gate_up.device)
    block = 1024
    if num_tokens:
        _silu_mul_kernel[(num_tokens, triton.cdiv(inter, block))](
            gate_up,
            out,
            inter,
            gate_up.stride(0),
            out.stride(0),
            BLOCK=block,
            num_warps=4,
            **launch_kwargs(gate_up),
        )
    return out


def rope_and_store_kv(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    positions: torch.Tensor,
    cos_sin: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Rotate q and k in place (HF rotate-half RoPE) and write k, v into the paged cache.

    q: [tokens, num_q_heads, head_dim]; k, v: [tokens, num_kv_heads, head_dim] (last dim contiguous);
    positions, slot_mapping: [tokens] int64 (slot = block_id * block_size + offset; -1 skips the store);
    cos_sin: [max_position, head_dim] float32 (cos of the head_dim/2 frequencies, then their sin) — the
    caller precomputes it with its rope scaling; k_cache/v_cache: [num_blocks, block_size, kv_heads,
    head_dim] views of one layer. Nothing is returned; all tensors on one CUDA device."""
    _need_triton("rope_and_store_kv")
    num_tokens, num_q_heads, head_dim = q.shape
    num_kv_heads = k.shape[1]
    if k.shape != v.shape or k.shape[0] != num_tokens or k.shape[2] != head_dim:
        raise ValueError(f"q/k/v shapes disagree: {q.shape}, {k.shape}, {v.shape}")
    if cos_sin.shape[1] != head_dim or cos_sin.dtype != torch.float32:
        raise ValueError(f"cos_sin must be float32 [max_position, {head_dim}], got {cos_sin.shape}")
    if positions.dtype != torch.int64 or slot_mapping.dtype != torch.int64:
        raise ValueError("positions and slot_mapping must be int64")
    if k_cache.stride() != v_cache.stride() or k_cache.shape[-1] != head_dim:
        raise ValueError("k_cache/v_cache must share strides and end in head_dim")
    if head_dim % 2 or (head_dim // 2) & (head_dim // 2 - 1):
        raise ValueError(f"head_dim={head_dim} must be twice a power of two")
    if num_tokens == 0:
        return
    _rope_store_kv_kernel[(num_tokens, num_q_heads + num_kv_heads)](
        q,
        k,
        v,
        positions,
        cos_sin,
        k_cache,
        v_cache,
        slot_mapping,
        num_q_heads,
        num_kv_heads,
        k_cache.shape[1],
        q.stride(0),
        q.stride(1),
        k.stride(0),
        k.stride(1),
        v.stride(0),
        v.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        HEAD_DIM=head_dim,
        HALF=head_dim // 2,
        num_warps=1,
        **launch_kwargs(q),
    )
