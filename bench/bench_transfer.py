"""TCP loopback throughput of the transfer engine for several piece sizes, against a raw socket
stream of the same bytes in the same run (the ceiling for any TCP transport on this machine).

    python bench/bench_transfer.py [--total-mib 256] [--piece-kib 4 64 1024 16384] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import socket
import sys
import threading
import time

import numpy as np
from pdserve.transfer import TransferEngine


def raw_socket_gbps(src: np.ndarray, dst: np.ndarray, chunk_nbytes: int) -> float:
    """One TCP stream over 127.0.0.1: sendall from src in chunks of chunk_nbytes (the engine's
    message size, so both copy through the cache alike), recv_into dst; both release the GIL."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    client = socket.create_connection(server.getsockname())
    conn, _ = server.accept()
    view = memoryview(dst).cast("B")

    def receive() -> None:
        got = 0
        while got < len(view):
            got += conn.recv_into(view[got:], len(view) - got)

    t0 = time.perf_counter()
    reader = threading.Thread(target=receive)
    reader.start()
    data = memoryview(src).cast("B")
    for offset in range(0, len(data), chunk_nbytes):
        client.sendall(data[offset : offset + chunk_nbytes])
    reader.join()
    seconds = time.perf_counter() - t0
    for s in (client, conn, server):
        s.close()
    return src.nbytes / seconds / 1e9


def engine_gbps(
    sender: TransferEngine,
    receiver: TransferEngine,
    src: np.ndarray,
    dst: np.ndarray,
    piece_nbytes: int,
    batch_nbytes: int,
    tag: str,
) -> float:
    """Moves all of src into dst as pieces of piece_nbytes, scattered (the destination order is a
    fixed permutation), submitted in batches of ~batch_nbytes (like one layer each), pipelined."""
    num_pieces = src.nbytes // piece_nbytes
    order = np.random.default_rng(0).permutation(num_pieces)
    pieces = np.empty((num_pieces, 3), dtype=np.uint64)
    pieces[:, 0] = src.ctypes.data + np.arange(num_pieces, dtype=np.uint64) * piece_nbytes
    pieces[:, 1] = dst.ctypes.data + order.astype(np.uint64) * piece_nbytes
    pieces[:, 2] = piece_nbytes
    per_batch = max(1, batch_nbytes // piece_nbytes)
    receiver.expect(tag, src.nbytes, timeout_s=120)
    t0 = time.perf_counter()
    tickets = [
        sender.send(receiver.address, tag, pieces[i : i + per_batch])
        for i in range(0, num_pieces, per_batch)
    ]
    for t in tickets:
        result = sender.wait(t)
        if not result.ok:
            raise RuntimeError(f"send failed: {result.error}")
    recv = receiver.wait_recv(tag)
    seconds = time.perf_counter() - t0
    if not recv.ok:
        raise RuntimeError(f"receive failed: {recv.error}")
    check = order[:64]  # spot-check that pieces landed where they were sent
    for i, j in zip(range(64), check, strict=False):
        a = src[i * piece_nbytes : i * piece_nbytes + 16]
        b = dst[j * piece_nbytes : j * piece_nbytes + 16]
        if not np.array_equal(a, b):
            raise RuntimeError(f"piece {i} did not land at slot {j}")
    return src.nbytes / seconds / 1e9


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--total-mib", type=int, default=256, help="bytes moved per measurement")
    parser.add_argument("--piece-kib", type=int, nargs="+", default=[4, 64, 1024, 16384])
    parser.add_argument("--batch-mib", type=int, default=8, help="bytes per send ticket")
    parser.add_argument("--message-kib", type=int, default=1024, help="engine payload per message")
    parser.add_argument("--repeats", type=int, default=5, help="best of N for every measurement")
    parser.add_argument("--json", metavar="PATH", help="write the results as JSON")
    args = parser.parse_args(argv)

    total = args.total_mib << 20
    src = np.random.default_rng(1).integers(0, 256, total, dtype=np.uint8)
    dst = np.zeros_like(src)

    # Repeats interleave the baseline with every piece size, so load from other processes on the
    # machine hits both alike; each number is the best of its repeats.
    raw = 0.0
    best = {piece_kib: 0.0 for piece_kib in args.piece_kib}
    engine = TransferEngine(max_message_nbytes=args.message_kib << 10)
    with engine as sender, TransferEngine() as receiver:
        sender.register_memory(src)
        receiver.register_memory(dst)
        sender.connect(receiver.address)
        for r in range(args.repeats):
            raw = max(raw, raw_socket_gbps(src, dst, args.message_kib << 10))
            for piece_kib in args.piece_kib:
                gbps = engine_gbps(
                    sender,
                    receiver,
                    src,
                    dst,
                    piece_kib << 10,
                    args.batch_mib << 20,
                    f"{piece_kib}k{r}",
                )
                best[piece_kib] = max(best[piece_kib], gbps)
    results = [
        {
            "piece_nbytes": piece_kib << 10,
            "num_pieces": total // (piece_kib << 10),
            "gbps": round(gbps, 3),
            "ratio_vs_raw": round(gbps / raw, 3),
        }
        for piece_kib, gbps in best.items()
    ]

    parts = " | ".join(
        f"{r['piece_nbytes'] >> 10}KiB {r['gbps']:.2f} GB/s ({r['ratio_vs_raw']:.2f}x)"
        for r in results
    )
    print(f"bench_transfer: tcp loopback {args.total_mib} MiB, raw socket {raw:.2f} GB/s | {parts}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {
                    "benchmark": "transfer_tcp_loopback",
                    "total_nbytes": total,
                    "batch_nbytes": args.batch_mib << 20,
                    "message_nbytes": args.message_kib << 10,
                    "repeats": args.repeats,
                    "raw_socket_gbps": round(raw, 3),
                    "results": results,
                },
                f,
                indent=2,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
