"""TCP loopback throughput of the transfer engine for several piece sizes, against a raw socket
stream of the same bytes to another process in the same run (the ceiling for a TCP transport here).
The engine's receiver runs in this process on its own native threads (no GIL involved).

    python bench/bench_transfer.py [--total-mib 256] [--piece-kib 4 64 1024 16384] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import socket
import sys
import time

import numpy as np
from pdserve.transfer import TransferEngine


def _raw_receiver(port: int, nbytes: int, rounds: int) -> None:
    """Child process: receives `rounds` streams of nbytes with recv_into, acks each with one byte.
    A separate process, so the baseline's two ends do not share a GIL (the engine's threads hold
    none)."""
    buf = bytearray(nbytes)
    view = memoryview(buf)
    with socket.create_connection(("127.0.0.1", port)) as sock:
        for _ in range(rounds):
            got = 0
            while got < nbytes:
                got += sock.recv_into(view[got:], nbytes - got)
            sock.sendall(b"k")


class RawSocket:
    """The baseline: one plain TCP stream over 127.0.0.1 to a receiver process, the same bytes
    sent with sendall in chunks of the engine's message size."""

    def __init__(self, nbytes: int, rounds: int, chunk_nbytes: int) -> None:
        server = socket.socket()
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        ctx = mp.get_context("spawn")
        self.proc = ctx.Process(
            target=_raw_receiver, args=(server.getsockname()[1], nbytes, rounds)
        )
        self.proc.start()
        self.sock, _ = server.accept()
        server.close()
        self.chunk_nbytes = chunk_nbytes

    def gbps(self, src: np.ndarray) -> float:
        data = memoryview(src).cast("B")
        t0 = time.perf_counter()
        for offset in range(0, len(data), self.chunk_nbytes):
            self.sock.sendall(data[offset : offset + self.chunk_nbytes])
        if self.sock.recv(1) != b"k":
            raise RuntimeError("raw receiver failed")
        return src.nbytes / (time.perf_counter() - t0) / 1e9

    def close(self) -> None:
        self.sock.close()
        self.proc.join(10)


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


def small_batch_latency_us(
    sender: TransferEngine, receiver: TransferEngine, src: np.ndarray, dst: np.ndarray, n: int = 200
) -> float:
    """Median submit -> acknowledged time of a one-piece 4 KiB batch (one layer of one block, say)."""
    receiver.expect("latency", n * 4096, timeout_s=60)
    times = []
    for i in range(n):
        t0 = time.perf_counter()
        ticket = sender.send(
            receiver.address,
            "latency",
            [(src.ctypes.data + i * 4096, dst.ctypes.data + i * 4096, 4096)],
        )
        if not sender.wait(ticket, 10).ok:
            raise RuntimeError("latency send failed")
        times.append(time.perf_counter() - t0)
    return float(np.median(times) * 1e6)


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
    baseline = RawSocket(total, args.repeats, args.message_kib << 10)
    engine = TransferEngine(max_message_nbytes=args.message_kib << 10)
    with engine as sender, TransferEngine() as receiver:
        sender.register_memory(src)
        receiver.register_memory(dst)
        sender.connect(receiver.address)
        for r in range(args.repeats):
            raw = max(raw, baseline.gbps(src))
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
        latency_us = small_batch_latency_us(sender, receiver, src, dst)
    baseline.close()
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
    print(
        f"bench_transfer: tcp loopback {args.total_mib} MiB, raw socket {raw:.2f} GB/s | {parts}"
        f" | 4KiB batch round trip {latency_us:.0f} us (median)"
    )
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
                    "small_batch_round_trip_us": round(latency_us, 1),
                    "results": results,
                },
                f,
                indent=2,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
