"""The engine's linear-layer entry point: `F.linear`, or the Triton small-batch GEMV for decode-sized
inputs on the GPU when the engine turned it on (`set_small_batch_gemv`).

Why a switch and not a module: the linears in `engine/layers.py` stay plain (tensor-parallel slicing and
collectives live there); which matmul runs is a per-process performance choice made once at start-up.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

_state = {"gemv": False}


def set_small_batch_gemv(enabled: bool) -> None:
    """Route CUDA bf16/fp16 linears with 1..16 input rows to `pdserve.ops.gemv` (True) or cuBLAS (False)."""
    if enabled:
        from pdserve.ops import gemv as _gemv_module  # noqa: F401  (fails early without Triton)
    _state["gemv"] = bool(enabled)


def small_batch_gemv_enabled() -> bool:
    return _state["gemv"]


def _use_gemv(x: torch.Tensor) -> bool:
    return (
        _state["gemv"]
        and x.is_cuda
        and x.dim() == 2
        and 1 <= x.shape[0] <= 16
        and x.dtype in (torch.bfloat16, torch.float16)
        and x.stride(1) == 1
    )


def linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """y = x @ weight.T; x [..., K], weight [N, K] -> [..., N]."""
    if _use_gemv(x):
        from pdserve.ops.gemv import gemv

        return gemv(x, weight)
    return F.linear(x, weight)


def linear_partials(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Like `linear`, but when the GEMV splits its reduction, returns the fp32 partial sums
    [SPLIT_K, rows, N] unreduced (for `ops.fused.add_rms_norm`, which adds them while reading)."""
    if _use_gemv(x):
        from pdserve.ops.gemv import gemv

        return gemv(x, weight, reduce=False)
    return F.linear(x, weight)
