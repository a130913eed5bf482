"""Decode-shape linear layers: our Triton GEMV vs cuBLAS (torch.nn.functional.linear), as achieved
weight-read bandwidth over the device-to-device copy bandwidth measured in the same run.

    python3 bench/bench_gemv.py [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import sys

import torch


def _copy_bandwidth(do_bench) -> float:
    """Device-to-device copy of 2 GiB in bytes/s, counting bytes read plus bytes written."""
    src = torch.randn(1 << 30, dtype=torch.bfloat16, device="cuda")
    dst = torch.empty_like(src)
    copy_ms = do_bench(lambda: dst.copy_(src), warmup=50, rep=300, return_mode="median")
    return 2 * src.numel() * src.element_size() / (copy_ms * 1e-3)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("bench_gemv: needs a CUDA GPU", file=sys.stderr)
        return 2
    from pdserve.ops.gemv import gemv
    from triton.testing import do_bench

    torch.manual_seed(0)
    copy_bps = _copy_bandwidth(do_bench)
    # 13B layer shapes (N, K): fused qkv, o, fused gate_up, down; 8 copies rotate so L2 never holds W.
    shapes = [
        ("qkv", 15360, 5120),
        ("o", 5120, 5120),
        ("gate_up", 27648, 5120),
        ("down", 5120, 13824),
    ]
    rows, total = [], {"ours": 0.0, "cublas": 0.0, "bytes": 0}
    print(f"copy bandwidth (read+write) {copy_bps / 1e12:.2f} TB/s")
    print(f"{'layer':8} {'M':>3} {'ours us':>8} {'cuBLAS us':>9} {'ours BW':>8} {'cuBLAS BW':>9}")
    for m in (1, 8):
        for name, n, k in shapes:
            ws = [torch.randn(n, k, dtype=torch.bfloat16, device="cuda") * 0.02 for _ in range(8)]
            x = torch.randn(m, k, dtype=torch.bfloat16, device="cuda")
            ref = torch.nn.functional.linear(x.float(), ws[0].float())
            got = gemv(x, ws[0]).float()
            err = float((got - ref).norm() / ref.norm())
            assert err < 1e-2, (name, m, err)
            it = [0]

            def ours(ws=ws, x=x, it=it):
                it[0] += 1
                gemv(x, ws[it[0] % 8])

            def cublas(ws=ws, x=x, it=it):
                it[0] += 1
                torch.nn.functional.linear(x, ws[it[0] % 8])

            t_ours = do_bench(ours, warmup=50, rep=300, return_mode="median") * 1e3
            t_cub = do_bench(cublas, warmup=50, rep=300, return_mode="median") * 1e3
            nbytes = n * k * 2
            bw_o, bw_c = nbytes / (t_ours * 1e-6), nbytes / (t_cub * 1e-6)
            rows.append(dict(layer=name, m=m, n=n, k=k, ours_us=t_ours, cublas_us=t_cub, err=err))
            if m == 1:
                total["ours"] += t_ours
                total["cublas"] += t_cub
                total["bytes"] += nbytes
            print(
                f"{name:8} {m:3d} {t_ours:8.1f} {t_cub:9.1f} {bw_o / copy_bps:8.1%} {bw_c / copy_bps:9.1%}"
            )
            del ws
    layer_floor_us = total["bytes"] / copy_bps * 1e6
    summary = dict(
        device=torch.cuda.get_device_name(),
        copy_bytes_per_s=copy_bps,
        cases=rows,
        batch1_layer_us_ours=total["ours"],
        batch1_layer_us_cublas=total["cublas"],
        batch1_layer_floor_us=layer_floor_us,
    )
    print(
        f"gemv: 13B layer at batch 1: ours {total['ours']:.0f} us, cuBLAS {total['cublas']:.0f} us, "
        f"floor {layer_floor_us:.0f} us (ours {total['ours'] / layer_floor_us:.2f}x floor)"
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(summary, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
