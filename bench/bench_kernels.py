"""Benchmark of the CUDA KV block copy kernels against a plain copy of the same bytes, in one run.

Why: SPEC §5 asks gather/scatter to reach >= 80 % of device-to-device copy bandwidth; tier copies are
compared with torch's pinned-memory copies (the copy engines). For each (piece size, number of blocks)
it times, with CUDA events:
  copy      torch `dst.copy_(src)` of the same bytes, contiguous, device to device (the baseline)
  gather    pdserve gather_blocks from a pool twice as large, random distinct ids
  scatter   pdserve scatter_blocks back into the pool
  index     torch.index_select of the same blocks (for reference)
  vN        gather with each forced kernel version, side by side
and, for a subset, GPU -> pinned host and pinned host -> GPU copy_blocks vs torch pinned copies.
Each sample enqueues a few calls behind a GPU sleep (so host launch overhead is hidden, as it is in a
busy server), rotating over enough buffer sets that the L2 cache cannot serve them; the median of many
samples is reported. Device-to-device bandwidth counts bytes read + written; tier copies count bytes moved.

  python bench/bench_kernels.py [--pieces-kib 16,64,320,512] [--num-blocks 64,512,4096] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

import torch
from pdserve.cache import kernels

KIB, MIB = 1024, 1024 * 1024
_gpu_sleep = getattr(torch.cuda, "_sleep", None)  # spins the GPU for N cycles


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--pieces-kib", default="16,64,320,512", help="piece sizes in KiB (comma list)")
    p.add_argument("--num-blocks", default="64,512,4096", help="blocks per call (comma list)")
    p.add_argument(
        "--host",
        default="16x4096,64x1024,320x256,512x1024",
        help="tier-copy configs PIECE_KIBxNUM_BLOCKS (comma list; empty for none)",
    )
    p.add_argument(
        "--max-mib", type=float, default=2048, help="skip configs moving more MiB per call"
    )
    p.add_argument("--reps", type=int, default=40, help="timed samples per measurement (median)")
    p.add_argument("--warmup", type=int, default=3, help="untimed samples first")
    p.add_argument(
        "--rotate-mib", type=float, default=256, help="distinct MiB touched before reuse"
    )
    p.add_argument(
        "--no-versions", dest="versions", action="store_false", help="skip the per-version rows"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--commit", default=None, help="commit to record (default: git rev-parse HEAD)")
    p.add_argument("--json", type=Path, default=None, help="write all results to this JSON file")
    return p.parse_args(argv)


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def _commit(explicit: str | None) -> str:
    if explicit:
        return explicit
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
            cwd=Path(__file__).parent,
        )
        return out.stdout.strip() or "unknown"
    except OSError:
        return "unknown"


def time_calls(fn: Callable[[int], None], bytes_per_call: int, args: argparse.Namespace) -> float:
    """Median seconds per call of fn(i) (i rotates buffer sets), measured with CUDA events."""
    calls_per_sample = max(1, min(20, int(64 * MIB // max(bytes_per_call, 1))))
    stream = torch.cuda.current_stream()
    samples: list[float] = []
    i = 0
    for rep in range(args.warmup + args.reps):
        # Keep the GPU busy while the host enqueues the sample, so only device time is measured.
        if _gpu_sleep is not None:
            _gpu_sleep(5_000_000)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record(stream)
        for _ in range(calls_per_sample):
            fn(i)
            i += 1
        end.record(stream)
        end.synchronize()
        if rep >= args.warmup:
            samples.append(start.elapsed_time(end) / 1e3 / calls_per_sample)
    return statistics.median(samples)


def bench_device(piece_nbytes: int, num_blocks: int, args: argparse.Namespace) -> list[dict]:
    nbytes = piece_nbytes * num_blocks
    num_sets = max(1, min(64, math.ceil(args.rotate_mib * MIB / (2 * nbytes))))
    pool_blocks = 2 * num_blocks
    elems = piece_nbytes // 2
    pools = [
        torch.empty(pool_blocks, elems, dtype=torch.bfloat16, device="cuda").normal_()
        for _ in range(num_sets)
    ]
    outs = [
        torch.empty(num_blocks, elems, dtype=torch.bfloat16, device="cuda") for _ in range(num_sets)
    ]
    ids = [
        torch.randperm(pool_blocks, device="cuda")[:num_blocks].to(torch.int32)
        for _ in range(num_sets)
    ]
    ids_long = [t.long() for t in ids]

    def run(op: str, fn: Callable[[int], None]) -> dict:
        seconds = time_calls(fn, nbytes, args)
        return {
            "op": op,
            "piece_kib": piece_nbytes / KIB,
            "num_blocks": num_blocks,
            "nbytes": nbytes,
            "seconds": seconds,
            "gbps": 2 * nbytes / seconds / 1e9,
        }

    def k(i: int) -> int:
        return i % num_sets

    rows = [
        run("copy", lambda i: outs[k(i)].copy_(pools[k(i)][:num_blocks])),
        run(
            "gather",
            lambda i: kernels.gather_blocks(pools[k(i)], ids[k(i)], outs[k(i)], check_ids=False),
        ),
        run(
            "scatter",
            lambda i: kernels.scatter_blocks(outs[k(i)], ids[k(i)], pools[k(i)], check_ids=False),
        ),
        run("index", lambda i: torch.index_select(pools[k(i)], 0, ids_long[k(i)], out=outs[k(i)])),
    ]
    # Correctness guard: a fast wrong kernel must not produce a number.
    kernels.gather_blocks(pools[0], ids[0], outs[0])
    if not torch.equal(outs[0], pools[0][ids_long[0]]):
        raise SystemExit(f"gather result is wrong at piece {piece_nbytes} B x {num_blocks}")
    if args.versions:
        for version in range(1, kernels._cuda.NUM_KERNEL_VERSIONS):
            name = f"v{version}:{kernels._cuda.kernel_version_name(version)}"
            rows.append(
                run(
                    name,
                    lambda i, v=version: kernels.gather_blocks(
                        pools[k(i)], ids[k(i)], outs[k(i)], check_ids=False, kernel_version=v
                    ),
                )
            )
    base = rows[0]["seconds"]
    for row in rows:
        row["frac_of_copy"] = base / row["seconds"]
    return rows


def bench_host(piece_nbytes: int, num_blocks: int, args: argparse.Namespace) -> list[dict]:
    nbytes = piece_nbytes * num_blocks
    elems = piece_nbytes // 2
    gpu_pool = torch.empty(2 * num_blocks, elems, dtype=torch.bfloat16, device="cuda").normal_()
    host_pool = torch.empty(num_blocks, elems, dtype=torch.bfloat16).pin_memory()
    gpu_ids = torch.randperm(2 * num_blocks, device="cuda")[:num_blocks].to(torch.int32)
    host_ids = torch.randperm(num_blocks, device="cuda").to(torch.int32)
    gpu_flat = gpu_pool[:num_blocks]

    def run(op: str, fn: Callable[[int], None], baseline: float | None) -> dict:
        seconds = time_calls(fn, nbytes, args)
        row = {
            "op": op,
            "piece_kib": piece_nbytes / KIB,
            "num_blocks": num_blocks,
            "nbytes": nbytes,
            "seconds": seconds,
            "gbps": nbytes / seconds / 1e9,
        }
        row["frac_of_copy"] = (baseline or seconds) / seconds
        return row

    d2h = run("torch d2h", lambda i: host_pool.copy_(gpu_flat, non_blocking=True), None)
    h2d = run("torch h2d", lambda i: gpu_flat.copy_(host_pool, non_blocking=True), None)
    rows = [
        d2h,
        run(
            "copy_blocks d2h",
            lambda i: kernels.copy_blocks(gpu_pool, host_pool, gpu_ids, host_ids, check_ids=False),
            d2h["seconds"],
        ),
        h2d,
        run(
            "copy_blocks h2d",
            lambda i: kernels.copy_blocks(host_pool, gpu_pool, host_ids, gpu_ids, check_ids=False),
            h2d["seconds"],
        ),
    ]
    if args.versions:
        for version in (2, 3):
            name = f"d2h v{version}:{kernels._cuda.kernel_version_name(version)}"
            rows.append(
                run(
                    name,
                    lambda i, v=version: kernels.copy_blocks(
                        gpu_pool, host_pool, gpu_ids, host_ids, check_ids=False, kernel_version=v
                    ),
                    d2h["seconds"],
                )
            )
            name = f"h2d v{version}:{kernels._cuda.kernel_version_name(version)}"
            rows.append(
                run(
                    name,
                    lambda i, v=version: kernels.copy_blocks(
                        host_pool, gpu_pool, host_ids, gpu_ids, check_ids=False, kernel_version=v
                    ),
                    h2d["seconds"],
                )
            )
    torch.cuda.synchronize()
    kernels.copy_blocks(gpu_pool, host_pool, gpu_ids, host_ids)
    torch.cuda.synchronize()
    if not torch.equal(host_pool.cuda()[host_ids.long()], gpu_pool[gpu_ids.long()]):
        raise SystemExit(
            f"copy_blocks d2h result is wrong at piece {piece_nbytes} B x {num_blocks}"
        )
    return rows


def host_overhead_us(num_calls: int = 300) -> dict:
    """Host microseconds per call to enqueue a small gather: typed wrapper vs raw extension."""
    pool = torch.empty(128, 8192, dtype=torch.bfloat16, device="cuda").normal_()
    ids = torch.randperm(128, device="cuda")[:64].to(torch.int32)
    out = torch.empty(64, 8192, dtype=torch.bfloat16, device="cuda")
    stream = torch.cuda.current_stream().cuda_stream
    piece = 8192 * 2
    calls = {
        "wrapper": lambda: kernels.gather_blocks(pool, ids, out, check_ids=False),
        "raw": lambda: kernels._cuda.gather_blocks(
            pool.data_ptr(), piece, 128, ids.data_ptr(), 64, out.data_ptr(), piece, stream
        ),
    }
    result = {}
    for name, fn in calls.items():
        fn()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(num_calls):
            fn()
        result[name] = (time.perf_counter() - t0) / num_calls * 1e6
        torch.cuda.synchronize()
    return result


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not kernels.is_available():
        print("bench_kernels: needs pdserve._cuda and a CUDA GPU", file=sys.stderr)
        return 2
    torch.manual_seed(args.seed)
    t0 = time.time()
    device_rows: list[dict] = []
    for piece_kib in _ints(args.pieces_kib):
        for num_blocks in _ints(args.num_blocks):
            if piece_kib * KIB * num_blocks > args.max_mib * MIB:
                continue
            device_rows += bench_device(piece_kib * KIB, num_blocks, args)
            torch.cuda.empty_cache()
    overhead = host_overhead_us()
    host_rows: list[dict] = []
    for spec in [s for s in args.host.split(",") if s.strip()]:
        piece_kib, num_blocks = (int(x) for x in spec.split("x"))
        host_rows += bench_host(piece_kib * KIB, num_blocks, args)
        torch.cuda.empty_cache()

    print(
        f"\n{'piece KiB':>9} {'blocks':>6} {'MiB':>7}  {'op':<26} {'us':>9} {'GB/s':>8} {'vs base':>8}"
    )
    for row in device_rows + host_rows:
        print(
            f"{row['piece_kib']:>9.0f} {row['num_blocks']:>6} {row['nbytes'] / MIB:>7.1f}  {row['op']:<26} "
            f"{row['seconds'] * 1e6:>9.1f} {row['gbps']:>8.1f} {row['frac_of_copy']:>7.1%}"
        )

    def fracs(rows: list[dict], op: str) -> list[float]:
        return [r["frac_of_copy"] for r in rows if r["op"] == op]

    gs = fracs(device_rows, "gather") + fracs(device_rows, "scatter")
    copy_gbps = max((r["gbps"] for r in device_rows if r["op"] == "copy"), default=0.0)
    summary = {
        "gather_scatter_min_frac": min(gs, default=float("nan")),
        "gather_scatter_median_frac": statistics.median(gs) if gs else float("nan"),
        "gather_min_frac": min(fracs(device_rows, "gather"), default=float("nan")),
        "scatter_min_frac": min(fracs(device_rows, "scatter"), default=float("nan")),
        "copy_peak_gbps": copy_gbps,
        "d2h_min_frac": min(fracs(host_rows, "copy_blocks d2h"), default=float("nan")),
        "h2d_min_frac": min(fracs(host_rows, "copy_blocks h2d"), default=float("nan")),
        "host_us_per_call_wrapper": overhead["wrapper"],
        "host_us_per_call_raw": overhead["raw"],
    }
    print(
        f"\nsummary: gather/scatter reach {summary['gather_scatter_min_frac']:.1%} (min) / "
        f"{summary['gather_scatter_median_frac']:.1%} (median) of device-to-device copy bandwidth "
        f"(copy peak {copy_gbps:.0f} GB/s, same run); copy_blocks GPU->pinned "
        f"{summary['d2h_min_frac']:.1%}, pinned->GPU {summary['h2d_min_frac']:.1%} of torch pinned copies (min); host cost per call "
        f"{overhead['wrapper']:.1f} us (wrapper), {overhead['raw']:.1f} us (raw)"
    )
    if args.json:
        report = {
            "bench": "bench_kernels",
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "device": torch.cuda.get_device_name(),
            "torch": torch.__version__,
            "commit": _commit(args.commit),
            "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
            "seconds_total": time.time() - t0,
            "device_rows": device_rows,
            "host_rows": host_rows,
            "summary": summary,
        }
        args.json.write_text(json.dumps(report, indent=2))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
