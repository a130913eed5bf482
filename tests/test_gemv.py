"""Small-batch GEMV (Triton) against torch matmul: GPU (marker gpu) and the Triton interpreter on CPU."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import textwrap

import pytest
import torch

SHAPES = [(1, 100, 300), (3, 64, 2048), (16, 50, 5000), (8, 1000, 8192), (2, 33, 17)]


@pytest.mark.gpu
@pytest.mark.parametrize("m,n,k", SHAPES + [(1, 15360, 5120), (4, 5120, 13824), (16, 27648, 5120)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gemv_matches_matmul_gpu(m, n, k, dtype):
    from pdserve.ops.gemv import gemv

    g = torch.Generator(device="cuda").manual_seed(m * n + k)
    x = torch.randn(m, k, device="cuda", generator=g).to(dtype)
    w = (torch.randn(n, k, device="cuda", generator=g) * 0.05).to(dtype)
    out = torch.full((m, n), float("nan"), dtype=dtype, device="cuda")
    gemv(x, w, out=out)
    ref = x.double() @ w.double().T
    assert not torch.isnan(out).any()
    # bf16 operands, fp32 accumulation: ~1e-3 relative; bound 1e-2.
    assert float((out.double() - ref).norm() / ref.norm()) < 1e-2
    parts = gemv(x, w, reduce=False)  # [SPLIT_K, m, n] fp32 when split, else [m, n]
    total = parts.double().sum(0) if parts.dim() == 3 else parts.double()
    assert total.shape == (m, n)
    assert float((total - ref).norm() / ref.norm()) < 1e-2


@pytest.mark.gpu
def test_pdl_probe_on_hopper_gpu():
    """On sm90+ with a Triton that has launch_pdl, the one-time probe launches and says yes; below
    sm90 it says no without launching."""
    from pdserve.ops import pdl

    dev = torch.device("cuda")
    expected = torch.cuda.get_device_capability()[0] >= 9
    try:
        from triton.backends.nvidia.compiler import CUDAOptions

        expected &= "launch_pdl" in CUDAOptions.__dataclass_fields__
    except ImportError:
        expected = False
    assert pdl.pdl_supported(dev) == expected
    assert not pdl.pdl_supported(torch.device("cpu"))


@pytest.mark.gpu
def test_pdl_chain_in_cuda_graph_equals_plain_gpu():
    """The decode kernels launched with programmatic dependent launch, chained in a CUDA graph as in
    a decode step, give exactly the results of plain launches."""
    from pdserve.ops import pdl
    from pdserve.ops.fused import add_rms_norm, silu_and_mul
    from pdserve.ops.gemv import gemv

    if not pdl.pdl_supported(torch.device("cuda")):
        pytest.skip("PDL needs compute capability >= 9 and a Triton that supports it")
    g = torch.Generator(device="cuda").manual_seed(0)
    hidden, inter = 1024, 2816
    ws = [
        (torch.randn(n, k, device="cuda", generator=g) * 0.03).to(torch.bfloat16)
        for n, k in ((3 * hidden, hidden), (hidden, hidden), (2 * inter, hidden), (hidden, inter))
    ]
    norm_w = torch.rand(hidden, device="cuda", generator=g).to(torch.bfloat16) + 0.5
    x0 = torch.randn(2, hidden, device="cuda", generator=g).to(torch.bfloat16)

    def step():
        h, res = add_rms_norm(x0, norm_w, 1e-5, None)
        for _ in range(4):
            qkv = gemv(h, ws[0])
            h, res = add_rms_norm(gemv(qkv[:, :hidden], ws[1], reduce=False), norm_w, 1e-5, res)
            gate_up = gemv(h, ws[2])
            h, res = add_rms_norm(
                gemv(silu_and_mul(gate_up), ws[3], reduce=False), norm_w, 1e-5, res
            )
        return h

    results = []
    try:
        for enabled in (False, True):
            pdl.set_pdl(enabled)
            step()  # compile outside the capture
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                out = step()
            for _ in range(3):
                graph.replay()
            torch.cuda.synchronize()
            results.append(out.clone())
    finally:
        pdl.set_pdl(False)
    assert torch.equal(results[0], results[1])


def test_gemv_rejects_bad_shapes():
    from pdserve.ops import gemv as mod

    if mod.triton is None:
        pytest.skip("Triton is not installed")
    with pytest.raises(ValueError, match="1..16 rows"):
        mod.gemv(torch.zeros(17, 8), torch.zeros(4, 8))
    with pytest.raises(ValueError, match="expected x"):
        mod.gemv(torch.zeros(2, 8), torch.zeros(4, 9))


_SCRIPT = textwrap.dedent(
    """
    import torch
    from pdserve.ops.gemv import gemv
    for m, n, k in {shapes!r}:
        g = torch.Generator().manual_seed(k)
        x, w = torch.randn(m, k, generator=g), torch.randn(n, k, generator=g)
        ref = x.double() @ w.double().T
        err = float((gemv(x, w).double() - ref).norm() / ref.norm())
        assert err < 1e-5, (m, n, k, err)
    print("OK")
    """
)


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="Triton is not installed")
def test_gemv_triton_interpreter_cpu():
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run(
        [sys.executable, "-c", _SCRIPT.format(shapes=SHAPES)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0 and "OK" in proc.stdout, proc.stdout + proc.stderr
