"""Paged prefill (extend) attention against the torch reference: ragged prefixes and new-token counts,
GQA, both block sizes; GPU (marker gpu) and Triton's interpreter on the CPU in a subprocess."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from pdserve.ops.paged_prefill import paged_prefill_reference


def _make_case(
    q_lens, prefix_lens, num_q_heads, num_kv_heads, head_dim, block_size, dtype, device, seed
):
    g = torch.Generator().manual_seed(seed)
    seq_lens = torch.tensor(
        [p + q for p, q in zip(prefix_lens, q_lens, strict=True)], dtype=torch.int32
    )
    cu_q_lens = torch.zeros(len(q_lens) + 1, dtype=torch.int32)
    cu_q_lens[1:] = torch.cumsum(torch.tensor(q_lens), 0)
    max_blocks = (int(seq_lens.max()) + block_size - 1) // block_size
    num_blocks = len(q_lens) * max_blocks + 2
    perm = torch.randperm(num_blocks, generator=g)[: len(q_lens) * max_blocks]
    block_tables = perm.view(len(q_lens), max_blocks).to(torch.int32)
    kv = torch.randn(num_blocks, 2, block_size, num_kv_heads, head_dim, generator=g).to(dtype)
    q = torch.randn(int(cu_q_lens[-1]), num_q_heads, head_dim, generator=g).to(dtype)
    return (
        q.to(device),
        kv[:, 0].to(device),
        kv[:, 1].to(device),
        block_tables.to(device),
        cu_q_lens.to(device),
        seq_lens.to(device),
    )


CASES = [
    # q_lens, prefix_lens, q_heads, kv_heads, head_dim, block_size
    ([5], [0], 4, 4, 32, 16),
    ([17, 3, 70], [32, 0, 16], 8, 2, 64, 16),
    ([40, 1], [7, 90], 4, 1, 64, 32),
]


def _rel_err(out, ref):
    return float((out.double() - ref.double()).norm() / ref.double().norm())


@pytest.mark.gpu
@pytest.mark.parametrize(
    "case", CASES + [([2048], [0], 40, 40, 128, 16), ([300, 1000], [1500, 64], 32, 8, 128, 16)]
)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_paged_prefill_matches_reference_gpu(case, dtype):
    from pdserve.ops.paged_prefill import paged_prefill_attention

    q, k, v, bt, cu, lens = _make_case(*case, dtype, "cuda", seed=len(case[0]))
    scale = case[4] ** -0.5
    out = torch.full_like(q, float("nan"))
    paged_prefill_attention(q, k, v, bt, cu, lens, scale, max_q_len=max(case[0]), out=out)
    ref = paged_prefill_reference(q.float(), k.float(), v.float(), bt, cu, lens, scale)
    assert not torch.isnan(out).any()
    assert _rel_err(out, ref) < 2e-2  # bf16/fp16 matmul operands


_SCRIPT = textwrap.dedent(
    """
    import torch, sys
    sys.path.insert(0, {tests_dir!r})
    from test_paged_prefill import CASES, _make_case, _rel_err
    from pdserve.ops.paged_prefill import paged_prefill_attention, paged_prefill_reference
    for i, case in enumerate(CASES):
        q, k, v, bt, cu, lens = _make_case(*case, torch.float32, "cpu", seed=i)
        out = torch.full_like(q, float("nan"))
        paged_prefill_attention(q, k, v, bt, cu, lens, 0.3, max_q_len=max(case[0]), out=out)
        err = _rel_err(out, paged_prefill_reference(q, k, v, bt, cu, lens, 0.3))
        assert err < 1e-4, (case, err)
    print("OK")
    """
)


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="Triton is not installed")
def test_paged_prefill_triton_interpreter_cpu():
    env = dict(os.environ, TRITON_INTERPRET="1")
    script = _SCRIPT.format(tests_dir=os.path.dirname(__file__))
    proc = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0 and "OK" in proc.stdout, proc.stdout + proc.stderr


def test_reference_is_causal_over_prefix():
    """Token j of a sequence must not see later tokens: perturbing the last token's K/V leaves earlier
    outputs unchanged."""
    q, k, v, bt, cu, lens = _make_case([6], [10], 2, 2, 16, 4, torch.float64, "cpu", seed=3)
    out1 = paged_prefill_reference(q, k, v, bt, cu, lens, 0.25)
    last = 15
    blk = int(bt[0, last // 4])
    k2, v2 = k.clone(), v.clone()
    k2[blk, last % 4] += 1.0
    v2[blk, last % 4] += 1.0
    out2 = paged_prefill_reference(q, k2, v2, bt, cu, lens, 0.25)
    assert torch.equal(out1[:5], out2[:5]) and not torch.equal(out1[5], out2[5])
