"""Decode-shape linear layers: our Triton GEMV vs cuBLAS (torch.nn.functional.linear), as achieved
weight-read bandwidth over the device-to-device copy bandwidth measured in the same run.

Both sides run inside CUDA graphs (as the engine's decode step does), so launch overhead is excluded;
8 weight copies rotate so L2 never holds W.

    python3 bench/bench_gemv.py [--sweep o,down] [--chain] [--json PATH]

--chain also times the batch-1 GEMVs of all 40 layers of the 13B model (distinct weights, 25 GB) in one
CUDA graph, in engine order, with and without programmatic dependent launch (pdserve.ops.pdl), against
the same weight bytes at copy bandwidth.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys

import torch
from limits import copy_bandwidth

SHAPES_13B = [
    ("qkv", 15360, 5120),
    ("o", 5120, 5120),
    ("gate_up", 27648, 5120),
    ("down", 5120, 13824),
]
NUM_COPIES = 8


def _graph_time_ms(fn, reps: int) -> float:
    """Median time of one call of `fn`, from a CUDA graph holding `reps` calls, replayed 30 times."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(reps):
            fn()
    times = []
    for _ in range(30):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / reps)
    return sorted(times)[len(times) // 2]


def _time_layer(op, x, ws, out) -> float:
    it = itertools.cycle(range(NUM_COPIES))

    def call():
        op(x, ws[next(it)], out)

    return _graph_time_ms(call, reps=NUM_COPIES) * 1e3  # microseconds


def chain(copy_bps: float, num_layers: int = 40) -> dict:
    """Batch-1 GEMVs of num_layers 13B layers in one graph (o/down hand out split-K partials as in
    the engine), with PDL off and on."""
    from pdserve.ops.gemv import gemv
    from pdserve.ops.pdl import pdl_supported, set_pdl

    layers = [
        [torch.randn(n, k, dtype=torch.bfloat16, device="cuda") * 0.02 for _, n, k in SHAPES_13B]
        for _ in range(num_layers)
    ]
    xs = {k: torch.randn(1, k, dtype=torch.bfloat16, device="cuda") for _, _, k in SHAPES_13B}
    nbytes = sum(w.numel() * 2 for ws in layers for w in ws)

    def step():
        for ws in layers:
            for (name, _, k), w in zip(SHAPES_13B, ws, strict=True):
                gemv(xs[k], w, reduce=name not in ("o", "down"))

    out = {"bytes": nbytes, "floor_us": nbytes / copy_bps * 1e6}
    for pdl in (False, True):
        if pdl and not pdl_supported(torch.device("cuda")):
            continue
        set_pdl(pdl)
        us = _graph_time_ms(step, reps=1) * 1e3
        out["pdl" if pdl else "plain"] = us
        print(
            f"chain of {num_layers} layers, pdl={pdl}: {us:.0f} us = {us / out['floor_us']:.3f}x "
            f"floor {out['floor_us']:.0f} us"
        )
    set_pdl(False)
    layers.clear()
    torch.cuda.empty_cache()
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json")
    parser.add_argument(
        "--sweep",
        metavar="LAYERS",
        default="",
        help="also time a grid of tile configs, e.g. o,down",
    )
    parser.add_argument("--chain", action="store_true", help="also time 40 layers in one graph")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("bench_gemv: needs a CUDA GPU", file=sys.stderr)
        return 2
    from pdserve.ops.gemv import gemv

    torch.manual_seed(0)
    copy_bps = copy_bandwidth()

    def cublas(x, w, out):
        torch.matmul(x, w.T, out=out)

    rows, totals = [], {"ours": 0.0, "cublas": 0.0, "bytes": 0}
    print(f"copy bandwidth (read+write) {copy_bps / 1e12:.2f} TB/s")
    print(f"{'layer':8} {'M':>3} {'ours us':>8} {'cuBLAS us':>9} {'ours BW':>8} {'cuBLAS BW':>9}")
    for m in (1, 8):
        for name, n, k in SHAPES_13B:
            ws = [
                torch.randn(n, k, dtype=torch.bfloat16, device="cuda") * 0.02
                for _ in range(NUM_COPIES)
            ]
            x = torch.randn(m, k, dtype=torch.bfloat16, device="cuda")
            out = torch.empty(m, n, dtype=torch.bfloat16, device="cuda")
            ref = x.float() @ ws[0].float().T
            err = float((gemv(x, ws[0]).float() - ref).norm() / ref.norm())
            assert err < 1e-2, (name, m, err)
            # o_proj / down_proj hand their split-K partials unreduced to add+RMSNorm in the engine
            reduce = name not in ("o", "down")

            def ours(a, b, c, cfg=None, reduce=reduce):
                return (
                    gemv(a, b, out=c, config=cfg)
                    if reduce
                    else gemv(a, b, config=cfg, reduce=False)
                )

            t_ours = _time_layer(ours, x, ws, out)
            t_cub = _time_layer(cublas, x, ws, out)
            nbytes = n * k * 2
            row = dict(layer=name, m=m, n=n, k=k, ours_us=t_ours, cublas_us=t_cub, rel_err=err)
            if args.sweep and m == 1 and name in args.sweep.split(","):
                timed = []
                for bn, bk, sk, nw, ns in itertools.product(
                    (32, 64, 128), (128, 256), (1, 2, 3, 4, 6), (4, 8), (3, 4)
                ):
                    cfg = (bn, bk, sk, nw, ns)
                    try:
                        t = _time_layer(lambda a, b, c, cfg=cfg: ours(a, b, c, cfg), x, ws, out)
                    except Exception:  # noqa: BLE001 - configs that do not compile are skipped
                        continue
                    timed.append((t, cfg))
                timed.sort()
                row["best_config"], row["best_us"] = timed[0][1], timed[0][0]
                for t, cfg in timed[:3]:
                    print(f"   {cfg}: {t:.1f} us ({nbytes / (t * 1e-6) / copy_bps:.1%})")
            rows.append(row)
            if m == 1:
                totals["ours"] += t_ours
                totals["cublas"] += t_cub
                totals["bytes"] += nbytes
            bw_o, bw_c = nbytes / (t_ours * 1e-6), nbytes / (t_cub * 1e-6)
            print(
                f"{name:8} {m:3d} {t_ours:8.1f} {t_cub:9.1f} {bw_o / copy_bps:8.1%} {bw_c / copy_bps:9.1%}"
            )
            del ws
    floor_us = totals["bytes"] / copy_bps * 1e6
    summary = dict(
        device=torch.cuda.get_device_name(),
        copy_bytes_per_s=copy_bps,
        cases=rows,
        batch1_layer_us_ours=totals["ours"],
        batch1_layer_us_cublas=totals["cublas"],
        batch1_layer_floor_us=floor_us,
    )
    print(
        f"gemv: 13B layer at batch 1 in graphs: ours {totals['ours']:.0f} us, cuBLAS "
        f"{totals['cublas']:.0f} us, floor {floor_us:.0f} us "
        f"(ours {totals['ours'] / floor_us:.2f}x, cuBLAS {totals['cublas'] / floor_us:.2f}x floor)"
    )
    if args.chain:
        summary["chain"] = chain(copy_bps)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(summary, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
