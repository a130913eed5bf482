"""How long a tiny kernel (and a 4 MiB device-to-device memcpy) takes to complete while another process,
or the same process on another stream, keeps the GPU busy with back-to-back 1.5 ms GEMMs. On an H100
(docs/PERFORMANCE.md, session 5): ~65 us idle, ~390 us from another process (the two CUDA contexts
time-slice), ~1 ms from a side stream of the busy process (it waits for SMs to free up). Why a receiver-side copy
in the decode process slowed a prefill on a shared GPU, and why cuda_ipc copies on the sender instead.

    python bench/experiments/timeslice_latency.py
"""

from __future__ import annotations

import multiprocessing as mp
import statistics
import threading
import time

import torch


def _busy(seconds: float, ready, tiny_in_thread: bool, out) -> None:
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    torch.cuda.synchronize()
    stop = time.perf_counter() + seconds
    result = {}
    if tiny_in_thread:

        def probe():
            s = torch.cuda.Stream()
            x = torch.zeros(1024, device="cuda")
            with torch.cuda.stream(s):
                result["lat"] = _probe(x, s)

        t = threading.Thread(target=probe)
    ready.set()
    if tiny_in_thread:
        t.start()
    while time.perf_counter() < stop:
        for _ in range(20):
            torch.matmul(a, b)
        torch.cuda.synchronize()
    if tiny_in_thread:
        t.join()
        out.put(result["lat"])


def _probe(x: torch.Tensor, stream) -> dict[str, list[float]]:
    """Latency of a tiny kernel, and of a 4 MiB device-to-device memcpy (the copy engines), each
    followed by a stream sync."""
    time.sleep(0.5)
    src = torch.ones(4 << 20, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    lat: dict[str, list[float]] = {"kernel": [], "memcpy 4 MiB": []}
    for _ in range(100):
        for kind, op in (("kernel", lambda: x.add_(1)), ("memcpy 4 MiB", lambda: dst.copy_(src))):
            t0 = time.perf_counter()
            op()
            stream.synchronize()
            lat[kind].append((time.perf_counter() - t0) * 1e6)
            time.sleep(0.002)
    return lat


def _other_process(ready, out) -> None:
    ready.wait()
    x = torch.zeros(1024, device="cuda")
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        out.put(_probe(x, s))


def main() -> None:
    ctx = mp.get_context("spawn")
    x = torch.zeros(1024, device="cuda")
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        idle = _probe(x, s)
    rows = {"idle GPU": idle}
    # another process's kernel while this one computes
    ready, out = ctx.Event(), ctx.Queue()
    p = ctx.Process(target=_other_process, args=(ready, out))
    p.start()
    busy = ctx.Process(target=_busy, args=(4.0, ready, False, None))
    busy.start()
    rows["other process"] = out.get()
    busy.join()
    p.join()
    ready, out = ctx.Event(), ctx.Queue()
    busy = ctx.Process(target=_busy, args=(4.0, ready, True, out))
    busy.start()
    rows["same process, side stream"] = out.get()
    busy.join()
    for name, by_kind in rows.items():
        for kind, lat in by_kind.items():
            lat = sorted(lat)
            print(
                f"{name:>26}: {kind:>12} + sync median {statistics.median(lat):8.1f} us, "
                f"p90 {lat[int(0.9 * len(lat))]:8.1f} us, max {lat[-1]:8.1f} us"
            )


if __name__ == "__main__":
    main()
