"""Fused decode-path kernels (add+RMSNorm, SiLU*mul, RoPE + paged KV store) against plain torch
references: on the GPU (marker gpu) and through Triton's interpreter on the CPU in a subprocess."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import textwrap

import pytest
import torch


def ref_add_rms_norm(x, weight, eps, residual):
    h = x.float() if residual is None else x.float() + residual.float()
    normed = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return normed.to(x.dtype) * weight, h.to(x.dtype)


def ref_rope(x, positions, cos_sin):
    half = x.shape[-1] // 2
    cos = cos_sin[positions, :half][:, None, :]
    sin = cos_sin[positions, half:][:, None, :]
    x1, x2 = x[..., :half].float(), x[..., half:].float()
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1).to(x.dtype)


def make_cos_sin(max_pos, head_dim, theta=10000.0):
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    freqs = torch.outer(torch.arange(max_pos, dtype=torch.float32), inv_freq)
    return torch.cat([freqs.cos(), freqs.sin()], -1)


def check_all(device: str, dtype: torch.dtype, tol: float) -> None:
    from pdserve.ops.fused import add_rms_norm, rope_and_store_kv, silu_and_mul

    g = torch.Generator().manual_seed(0)
    for num_tokens, hidden in [(1, 64), (5, 320), (3, 5120)]:
        x = torch.randn(num_tokens, hidden, generator=g).to(dtype).to(device)
        w = torch.randn(hidden, generator=g).to(dtype).to(device)
        r = torch.randn(num_tokens, hidden, generator=g).to(dtype).to(device)
        exp_out, exp_res = ref_add_rms_norm(x, w, 1e-5, r)
        out, res = add_rms_norm(x, w, 1e-5, r.clone())
        assert torch.allclose(out.float(), exp_out.float(), atol=tol, rtol=tol), "add_rms_norm"
        assert torch.allclose(res.float(), exp_res.float(), atol=tol, rtol=tol), "residual"
        out0, res0 = add_rms_norm(x, w, 1e-5, None)
        assert torch.equal(res0, x)
        assert torch.allclose(out0.float(), ref_add_rms_norm(x, w, 1e-5, None)[0].float(), atol=tol)

        # fp32 split-K partial sums [3, tokens, hidden] added up inside the kernel
        parts = torch.randn(3, num_tokens, hidden, generator=g).to(device)
        exp_out, exp_res = ref_add_rms_norm(parts.sum(0).to(dtype), w, 1e-5, r)
        out, res = add_rms_norm(parts, w, 1e-5, r.clone())
        assert out.dtype == dtype and res.dtype == dtype
        assert torch.allclose(out.float(), exp_out.float(), atol=2 * tol, rtol=2 * tol), "partials"
        assert torch.allclose(res.float(), exp_res.float(), atol=2 * tol, rtol=2 * tol), "partials"

        gu = torch.randn(num_tokens, 2 * hidden, generator=g).to(dtype).to(device)
        exp = (torch.nn.functional.silu(gu[:, :hidden].float()).to(dtype) * gu[:, hidden:]).float()
        assert torch.allclose(silu_and_mul(gu).float(), exp, atol=tol, rtol=tol), "silu_and_mul"

    num_tokens, hq, hkv, d, bs, nb = 7, 8, 2, 64, 16, 6
    q = torch.randn(num_tokens, hq, d, generator=g).to(dtype).to(device)
    qkv = torch.randn(num_tokens, hq + 2 * hkv, d, generator=g).to(dtype).to(device)
    k, v = (
        qkv[:, hq : hq + hkv],
        qkv[:, hq + hkv :],
    )  # strided views, as from a fused qkv projection
    positions = torch.tensor([0, 1, 2, 40, 41, 99, 7], device=device)
    slots = torch.tensor([3, 4, 5, 17, -1, 90, 33], device=device)
    cos_sin = make_cos_sin(128, d).to(device)
    kv = torch.full((nb, 2, bs, hkv, d), 7.0, dtype=dtype, device=device)
    exp_q, exp_k = ref_rope(q, positions, cos_sin), ref_rope(k, positions, cos_sin)
    v_before = v.clone()
    rope_and_store_kv(q, k, v, positions, cos_sin, kv[:, 0], kv[:, 1], slots)
    assert torch.allclose(q.float(), exp_q.float(), atol=tol, rtol=tol), "rope q"
    assert torch.allclose(k.float(), exp_k.float(), atol=tol, rtol=tol), "rope k"
    flat_k = kv[:, 0].reshape(nb * bs, hkv, d)
    flat_v = kv[:, 1].reshape(nb * bs, hkv, d)
    for t, s in enumerate(slots.tolist()):
        if s >= 0:
            assert torch.equal(flat_k[s], k[t]) and torch.equal(flat_v[s], v_before[t]), "kv store"
    untouched = torch.ones(nb * bs, dtype=torch.bool)
    untouched[[s for s in slots.tolist() if s >= 0]] = False
    assert (flat_k[untouched.to(device)] == 7.0).all(), "store wrote outside its slots"


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fused_ops_gpu(dtype):
    check_all("cuda", dtype, tol=2e-2)


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="Triton is not installed")
def test_fused_ops_triton_interpreter_cpu():
    script = textwrap.dedent(
        f"""
        import sys, torch
        sys.path.insert(0, {os.path.dirname(__file__)!r})
        from test_fused_ops import check_all
        check_all("cpu", torch.float32, tol=1e-5)
        print("OK")
        """
    )
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0 and "OK" in proc.stdout, proc.stdout + proc.stderr
