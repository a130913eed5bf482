"""cuda_ipc transfer throughput between two processes on one GPU (a prefill and a decode instance
sharing it), for several piece sizes, against a device-to-device copy of the same bytes measured in
the same run (the physical limit of a copy on this GPU). Also the latency of a one-piece batch.

    python bench/bench_transfer_gpu.py [--total-mib 1024] [--piece-kib 16 256 4096 65536] [--json F]

The receiver runs in a spawned process (CUDA IPC maps memory between processes); each measurement
expects the bytes there first, then times send -> the ticket's acknowledgement (the receiver
acknowledges once its copies completed). Prints one summary line last.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import sys
import time

import numpy as np
import torch
from pdserve.transfer import TransferEngine


def _receiver(conn, nbytes: int) -> None:
    engine = TransferEngine("cuda_ipc")
    buf = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    engine.register_memory(buf)
    conn.send((engine.address, buf.data_ptr()))
    while True:
        msg = conn.recv()
        if msg is None:
            break
        request_id, n = msg
        engine.expect(request_id, n, 60.0)
        conn.send(True)
    engine.close()


def copy_gbps(nbytes: int, repeats: int) -> float:
    """Best-of-N device-to-device copy of nbytes (one contiguous cudaMemcpy), in GB/s of data moved."""
    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(repeats + 1):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        dst.copy_(src)
        torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return nbytes / best / 1e9


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--total-mib", type=int, default=1024, help="bytes moved per measurement")
    parser.add_argument("--piece-kib", type=int, nargs="+", default=[16, 256, 4096, 65536])
    parser.add_argument("--repeats", type=int, default=5, help="best of N for every measurement")
    parser.add_argument("--json", metavar="PATH", help="write the results as JSON")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_transfer_gpu: needs a CUDA GPU", file=sys.stderr)
        return 2
    torch.manual_seed(0)
    nbytes = args.total_mib << 20
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_receiver, args=(child, nbytes), daemon=True)
    proc.start()
    address, dst_base = parent.recv()
    engine = TransferEngine("cuda_ipc")
    src = torch.randint(0, 256, (nbytes,), dtype=torch.uint8, device="cuda")
    engine.register_memory(src)
    engine.connect(address)
    limit = copy_gbps(nbytes, args.repeats)
    rows = []
    counter = 0

    def timed_send(pieces: np.ndarray) -> float:
        nonlocal counter
        counter += 1
        rid = f"r{counter}"
        parent.send((rid, int(pieces[:, 2].sum())))
        parent.recv()
        t0 = time.perf_counter()
        result = engine.wait(engine.send(address, rid, pieces), 60.0)
        if not result.ok:
            raise RuntimeError(f"send failed: {result.status} {result.error}")
        return time.perf_counter() - t0

    rng = np.random.default_rng(0)
    for piece_kib in args.piece_kib:
        piece = piece_kib << 10
        num = nbytes // piece
        # scattered destinations (a decode instance's free blocks are not in order)
        order = rng.permutation(num).astype(np.uint64)
        idx = np.arange(num, dtype=np.uint64)
        pieces = np.stack(
            [
                src.data_ptr() + idx * piece,
                dst_base + order * piece,
                np.full(num, piece, dtype=np.uint64),
            ],
            axis=1,
        )
        best = min(timed_send(pieces) for _ in range(args.repeats))
        gbps = num * piece / best / 1e9
        rows.append(
            {"piece_kib": piece_kib, "num_pieces": int(num), "gbps": gbps, "of_copy": gbps / limit}
        )
        print(
            f"piece {piece_kib:>6} KiB x {num:>6}: {gbps:8.1f} GB/s = {gbps / limit:6.1%} of the copy"
        )
    one = np.array([[src.data_ptr(), dst_base, 4096]], dtype=np.uint64)
    latency_us = sorted(timed_send(one) for _ in range(50))[25] * 1e6
    parent.send(None)
    proc.join(30)
    engine.close()
    best_row = max(rows, key=lambda r: r["gbps"])
    summary = {
        "device": torch.cuda.get_device_name(),
        "commit": os.environ.get("PDSERVE_COMMIT", "unknown"),
        "total_mib": args.total_mib,
        "copy_gbps": limit,
        "rows": rows,
        "one_piece_latency_us": latency_us,
    }
    if args.json:
        with open(args.json, "w") as f:
            json.dump(summary, f, indent=1)
    print(
        f"cuda_ipc {best_row['gbps']:.1f} GB/s at {best_row['piece_kib']} KiB pieces = "
        f"{best_row['of_copy']:.1%} of the {limit:.1f} GB/s device copy; "
        f"one 4 KiB piece {latency_us:.0f} us (median)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
