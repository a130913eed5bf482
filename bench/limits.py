"""The GPU's own ceilings, measured in the benchmark's run: device-to-device copy bandwidth and the bf16
matmul rate. The benchmarks report their results as fractions of these (SPEC §5, docs/PERFORMANCE.md)."""

from __future__ import annotations

import torch


def copy_bandwidth(nbytes: int = 1 << 30) -> float:
    """Device-to-device copy of `nbytes` (bf16 random data), bytes read + written per second (median)."""
    from triton.testing import do_bench

    src = torch.randn(nbytes // 2, dtype=torch.bfloat16, device="cuda")
    dst = torch.empty_like(src)
    for _ in range(100):  # clocks up before timing
        dst.copy_(src)
    ms = do_bench(lambda: dst.copy_(src), warmup=100, rep=1000, return_mode="median")
    return 2 * nbytes / (ms * 1e-3)


def matmul_rate(n: int = 8192) -> float:
    """bf16 n x n x n matmul (random data) in FLOP/s (median)."""
    from triton.testing import do_bench

    a = torch.randn(n, n, dtype=torch.bfloat16, device="cuda")
    b = torch.randn(n, n, dtype=torch.bfloat16, device="cuda")
    c = torch.empty(n, n, dtype=torch.bfloat16, device="cuda")
    ms = do_bench(lambda: torch.mm(a, b, out=c), warmup=200, rep=1000, return_mode="median")
    return 2 * n**3 / (ms * 1e-3)
