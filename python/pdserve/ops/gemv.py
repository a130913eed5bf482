"""Small-batch linear layer (y = x @ W^T) in Triton for decode: reading W once at HBM speed.

Why: at batch 1–16 a decode step is a stream over the weights; cuBLAS picks GEMM tilings that leave a
sizeable share of the bandwidth unused at these shapes. Each program here owns BLOCK_N output features
and streams their rows of W with wide coalesced loads, multiplying by the (padded) batch on the tensor
cores, which are otherwise idle; SPLIT_K programs share a long reduction when N alone gives too few
programs to fill the GPU.
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

MAX_ROWS = 16  # largest batch served here; bigger batches go to cuBLAS


if triton is not None:

    @triton.jit
    def _prefetch_l2(ptrs, mask):
        """prefetch.global.L2 of each (masked-in) address; returns nothing useful."""
        tl.inline_asm_elementwise(
            "{ .reg .pred p; setp.ne.b32 p, $2, 0; @p prefetch.global.L2 [$1]; mov.u32 $0, 0; }",
            "=r,l,r",
            [ptrs, mask.to(tl.int32)],
            dtype=tl.int32,
            is_pure=False,
            pack=1,
        )

    @triton.jit
    def _gemv_kernel(
        x_ptr,  # [M, K]
        w_ptr,  # [N, K] row-major (nn.Linear weight)
        y_ptr,  # [M, N] (or fp32 [SPLIT_K, M, N] partials when SPLIT_K > 1)
        M,
        N,
        K,
        stride_xm,
        stride_wn,
        stride_ym,
        k_per_split,
        BLOCK_M: tl.constexpr,  # 16: the batch padded for tl.dot
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
        SPLIT_K: tl.constexpr,
        USE_PDL: tl.constexpr,  # see pdserve.ops.pdl
        PREFETCH_TILES: tl.constexpr = 2,  # with PDL: weight tiles pulled into L2 before the wait
    ):
        pid_n = tl.program_id(0)
        pid_k = tl.program_id(1)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_m = tl.arange(0, BLOCK_M)
        offs_k = tl.arange(0, BLOCK_K)
        mask_n = offs_n < N
        mask_m = offs_m < M
        k_begin = pid_k * k_per_split
        k_end = tl.minimum(k_begin + k_per_split, K)
        w_rows = w_ptr + offs_n[:, None].to(tl.int64) * stride_wn
        if USE_PDL:
            tl.extra.cuda.gdc_launch_dependents()
            # the weights need nothing from earlier kernels: pull this program's first tiles into L2
            # while the kernel that writes x finishes, then wait for x (see pdserve.ops.pdl)
            offs_line = tl.arange(0, PREFETCH_TILES * BLOCK_K // 64) * 64  # 128-byte lines (bf16)
            lines = w_rows + (k_begin + offs_line)[None, :]
            _prefetch_l2(lines, mask_n[:, None] & ((k_begin + offs_line) < k_end)[None, :])
            tl.extra.cuda.gdc_wait()
        acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
        for k0 in range(k_begin, k_end, BLOCK_K):
            kk = k0 + offs_k
            mask_k = kk < k_end
            w = tl.load(
                w_rows + kk[None, :],
                mask=mask_n[:, None] & mask_k[None, :],
                other=0.0,
                eviction_policy="evict_first",
            )
            xt = tl.load(
                x_ptr + offs_m[None, :] * stride_xm + kk[:, None],
                mask=mask_m[None, :] & mask_k[:, None],
                other=0.0,
            )
            acc += tl.dot(w, xt)
        if SPLIT_K == 1:
            tl.store(
                y_ptr + offs_m[None, :] * stride_ym + offs_n[:, None],
                acc.to(y_ptr.dtype.element_ty),
                mask=mask_m[None, :] & mask_n[:, None],
            )
        else:
            part = y_ptr + pid_k * M * N
            tl.store(
                part + offs_m[None, :] * N + offs_n[:, None],
                acc,
                mask=mask_m[None, :] & mask_n[:, None],
            )


def _pick_config(num_rows_out: int, k: int, num_sms: int) -> tuple[int, int, int, int, int]:
    """(BLOCK_N, BLOCK_K, SPLIT_K, num_warps, num_stages), from sweeps on an H100 over the 13B layer
    shapes (`bench/bench_gemv.py --sweep`, docs/PERFORMANCE.md). When N gives at least one 64-row
    program per SM: 64x256 tiles, no split. Otherwise the reduction is split into 128-wide tiles until
    the programs cover the SMs about 1.5 times (o_proj / down_proj of 13B: 80 row tiles x 3 splits),
    each split at least 4 tiles long."""
    block_n = 64
    num_programs = triton.cdiv(num_rows_out, block_n)
    if num_programs >= num_sms:
        return block_n, 256, 1, 4, 4
    block_k, split_k = 128, 1
    while 2 * num_programs * split_k < 3 * num_sms and k // (split_k + 1) >= 4 * block_k:
        split_k += 1
    return block_n, block_k, split_k, 4, 3


def gemv(
    x: torch.Tensor,
    weight: torch.Tensor,
    out: torch.Tensor | None = None,
    config: tuple[int, int, int, int, int] | None = None,
    reduce: bool = True,
) -> torch.Tensor:
    """y = x @ weight.T for a small batch. x: [M, K] with M ≤ 16; weight: [N, K], last dim contiguous,
    same dtype (bf16/fp16) and CUDA device. Returns y [M, N] (written into `out` when given).
    `config` = (BLOCK_N, BLOCK_K, SPLIT_K, num_warps, num_stages) overrides the heuristic (benchmarks).
    reduce=False: when the reduction is split, return the fp32 partial sums [SPLIT_K, M, N] instead, for
    a consumer that adds them up while reading (`ops.fused.add_rms_norm`): two launches fewer."""
    if triton is None:
        raise RuntimeError("gemv needs Triton, which is not installed")
    if x.dim() != 2 or weight.dim() != 2 or x.shape[1] != weight.shape[1]:
        raise ValueError(
            f"expected x [M, K] and weight [N, K]; got {tuple(x.shape)}, {tuple(weight.shape)}"
        )
    m, k = x.shape
    n = weight.shape[0]
    if not 1 <= m <= MAX_ROWS:
        raise ValueError(f"gemv serves 1..{MAX_ROWS} rows, got {m}")
    if x.dtype != weight.dtype or x.stride(1) != 1 or weight.stride(1) != 1:
        raise ValueError("x and weight must share a dtype and have a contiguous last dimension")
    if out is None:
        out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    num_sms = torch.cuda.get_device_properties(x.device).multi_processor_count if x.is_cuda else 8
    if config is None:
        block_n, block_k, split_k, num_warps, num_stages = _pick_config(n, k, num_sms)
    else:
        block_n, block_k, split_k, num_warps, num_stages = config
    k_per_split = triton.cdiv(triton.cdiv(k, split_k), block_k) * block_k
    target = (
        out if split_k == 1 else torch.empty((split_k, m, n), dtype=torch.float32, device=x.device)
    )
    _gemv_kernel[(triton.cdiv(n, block_n), split_k)](
        x,
        weight,
        target,
        m,
        n,
        k,
        x.stride(0),
        weight.stride(0),
        out.stride(0),
        k_per_split,
        BLOCK_M=16,
        BLOCK_N=block_n,
        BLOCK_K=block_k,
        SPLIT_K=split_k,
        num_warps=num_warps,
        num_stages=num_stages,
        **launch_kwargs(x),
    )
    if split_k > 1 and not reduce:
        return target
    if split_k > 1:
        torch.sum(target, dim=0, out=out) if out.dtype == torch.float32 else out.copy_(
            target.sum(0)
        )
    return out
