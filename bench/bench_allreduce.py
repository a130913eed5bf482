"""All-reduce latency between tensor-parallel ranks: the IPC collectives (replayed from a CUDA graph,
as decode runs them) against NCCL (eager, back to back) on the same GPUs in the same run, bf16, at
the sizes a 13B decode step all-reduces (batch x 5120 x 2 bytes) and beyond.

    python bench/bench_allreduce.py --tp 2 [--json out.json]

Needs --tp GPUs (ranks on one GPU time-slice it: no meaningful figure, so that is refused).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import traceback

import torch

SIZES_KIB = [10, 80, 320, 1280, 5120, 20480]  # batch 1, 8, 32, 128, 512 of 13B; a 2k-token prefill
CALLS = 50  # per graph / per timed burst
CAPACITY = 8 << 20


def _time_ms(fn, repeats: int = 5) -> float:
    """Median ms of fn() measured with CUDA events."""
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def _rank(rank: int, world: int, port: int, results, store=None) -> None:
    os.environ["NCCL_NVLS_ENABLE"] = "0"
    from pdserve.engine import distributed

    try:
        store = store if store is not None else distributed.connect_store(port, world)
        device = torch.device("cuda", rank)
        group = distributed.init_group(store, rank, world, device)
        group.enable_ipc(CAPACITY)
        torch.cuda.set_device(device)
        rows = {}
        for kib in SIZES_KIB:
            x = torch.randn(kib * 512, device=device).to(torch.bfloat16)
            row = {}
            if kib * 1024 <= CAPACITY:
                stream = torch.cuda.Stream(device)
                stream.wait_stream(torch.cuda.current_stream(device))
                with torch.cuda.stream(stream):
                    group.ipc.all_reduce(x)
                    graph = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(graph, stream=stream):
                        for _ in range(CALLS):
                            group.ipc.all_reduce(x)
                torch.cuda.current_stream(device).wait_stream(stream)
                graph.replay()
                row["ipc_graph_us"] = 1e3 * _time_ms(graph.replay) / CALLS

            def nccl_burst(x: torch.Tensor = x) -> None:
                for _ in range(CALLS):
                    group.pg.allreduce([x]).wait()

            nccl_burst()
            row["nccl_eager_us"] = 1e3 * _time_ms(nccl_burst) / CALLS
            rows[kib] = row
        if rank == 0:
            results.put(rows)
        group.shutdown()
    except BaseException:  # noqa: BLE001  (reported by the parent)
        results.put({"error": f"rank {rank}:\n{traceback.format_exc()}"})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tp", type=int, default=2)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    if torch.cuda.device_count() < args.tp:
        raise SystemExit(
            f"--tp {args.tp} needs {args.tp} GPUs; {torch.cuda.device_count()} are visible"
        )
    from pdserve.engine import distributed

    store = distributed.create_store(args.tp)
    ctx = multiprocessing.get_context("spawn")
    results = ctx.Queue()
    procs = [
        ctx.Process(target=_rank, args=(r, args.tp, store.port, results)) for r in range(1, args.tp)
    ]
    for p in procs:
        p.start()
    _rank(0, args.tp, store.port, results, store)
    rows = results.get(timeout=600)
    for p in procs:
        p.join(60)
    if "error" in rows:
        raise SystemExit(rows["error"])
    name = torch.cuda.get_device_name(0)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"device": name, "tp": args.tp, "rows_kib": rows}, f, indent=2)
    print(f"all-reduce bf16, {args.tp} x {name}: per call, IPC in a CUDA graph vs NCCL eager")
    for kib, row in rows.items():
        ipc = row.get("ipc_graph_us")
        ipc_text = f"{ipc:7.1f} us" if ipc is not None else "      -   "
        print(f"{kib:6d} KiB  IPC {ipc_text}  NCCL {row['nccl_eager_us']:7.1f} us")


if __name__ == "__main__":
    main()
