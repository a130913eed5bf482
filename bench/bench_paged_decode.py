"""Paged decode attention: achieved HBM bandwidth on long contexts, as a fraction of the device-to-device
copy bandwidth measured in the same run (the physical limit for a read-bound kernel).

    python3 bench/bench_paged_decode.py [--json PATH]

Bytes counted: every K and V element of every sequence read once (q and out are negligible).
"""

from __future__ import annotations

import argparse
import json
import sys

import torch
from limits import copy_bandwidth


def bench_case(num_seqs, num_q_heads, num_kv_heads, head_dim, seq_len, block_size, dtype):
    from pdserve.ops.paged_decode import paged_decode_attention
    from triton.testing import do_bench

    torch.manual_seed(0)
    blocks_per_seq = (seq_len + block_size - 1) // block_size
    num_blocks = num_seqs * blocks_per_seq
    kv = torch.randn(num_blocks, 2, block_size, num_kv_heads, head_dim, dtype=dtype, device="cuda")
    q = torch.randn(num_seqs, num_q_heads, head_dim, dtype=dtype, device="cuda")
    block_tables = (
        torch.randperm(num_blocks, device="cuda").view(num_seqs, blocks_per_seq).to(torch.int32)
    )
    seq_lens = torch.full((num_seqs,), seq_len, dtype=torch.int32, device="cuda")
    out = torch.empty_like(q)
    k, v = kv[:, 0], kv[:, 1]
    scale = head_dim**-0.5

    def run():
        paged_decode_attention(q, k, v, block_tables, seq_lens, scale, seq_len, out=out)

    ms = do_bench(run, warmup=25, rep=200, return_mode="median")
    nbytes = 2 * num_seqs * seq_len * num_kv_heads * head_dim * kv.element_size()
    return ms, nbytes / (ms * 1e-3)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="write results to this path")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("bench_paged_decode: needs a CUDA GPU", file=sys.stderr)
        return 2
    copy_bps = copy_bandwidth(2 << 30)
    rows = []
    # (label, num_seqs, q_heads, kv_heads, head_dim, seq_len)
    cases = [
        ("13b-mha", 1, 40, 40, 128, 4096),
        ("13b-mha", 1, 40, 40, 128, 32768),
        ("13b-mha", 8, 40, 40, 128, 4096),
        ("13b-mha", 8, 40, 40, 128, 16384),
        ("13b-mha", 32, 40, 40, 128, 4096),
        ("8b-gqa", 1, 32, 8, 128, 32768),
        ("8b-gqa", 8, 32, 8, 128, 8192),
        ("8b-gqa", 64, 32, 8, 128, 4096),
    ]
    print(f"copy bandwidth (read+write): {copy_bps / 1e12:.2f} TB/s")
    print(f"{'shape':8} {'seqs':>5} {'ctx':>6} {'ms':>8} {'TB/s':>6} {'of copy':>8}")
    for label, n, hq, hkv, d, ctx in cases:
        ms, bps = bench_case(n, hq, hkv, d, ctx, 16, torch.bfloat16)
        frac = bps / copy_bps
        rows.append(
            dict(
                shape=label, num_seqs=n, context=ctx, ms=ms, bytes_per_s=bps, fraction_of_copy=frac
            )
        )
        print(f"{label:8} {n:5d} {ctx:6d} {ms:8.3f} {bps / 1e12:6.2f} {frac:8.1%}")
    long_ctx = [r["fraction_of_copy"] for r in rows]
    summary = {
        "device": torch.cuda.get_device_name(),
        "copy_bytes_per_s": copy_bps,
        "cases": rows,
        "min_fraction_of_copy": min(long_ctx),
        "median_fraction_of_copy": sorted(long_ctx)[len(long_ctx) // 2],
    }
    print(
        f"paged_decode: median {summary['median_fraction_of_copy']:.1%} of copy bandwidth "
        f"(min {summary['min_fraction_of_copy']:.1%}), copy {copy_bps / 1e12:.2f} TB/s"
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(summary, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
