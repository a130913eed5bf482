"""Time to first token of one prompt, disaggregated against colocated, on one GPU (SPEC §5: layer-wise
overlap, disaggregated TTFT <= 1.10 x the prefill-only TTFT of the same prompt).

Three set-ups, one after another (each gets the GPU to itself), each behind a `pdserve scheduler`:
  colocated   one instance (--role both): prefill only, the KV never moves (the baseline);
  direct      prefill + decode instance, --enable-direct --enable-layer (cuda_ipc, layer by layer);
  direct-whole  the same without --enable-layer (the whole request's KV after the prefill);
  staged      prefill + decode instance, --enable-layer, KV through pinned host slots and TCP.
Each request is max_tokens=1 with a fresh prompt (no cache hits), so the time is the prefill plus,
when disaggregated, whatever part of the KV transfer does not overlap it (P answers once D holds every
byte). Median of --repeats after one warm-up request.

    python bench/bench_disagg_ttft.py [--model llama-2-7b] [--prompt-len 2048] [--json F]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

from pdserve.server.launcher import ProcessGroup, free_port, http_json


def _start(group: ProcessGroup, model: str, mode: str, util: str) -> str:
    common = ["--model", model, "--load-format", "dummy", "--device", "cuda"]
    common += ["--gpu-memory-utilization", util, "--heartbeat-interval", "0.5"]
    sp = free_port()
    surl = f"http://127.0.0.1:{sp}"
    if mode == "colocated":
        ip = free_port()
        inst = group.start("colo", ["serve", "--port", str(ip), "--scheduler", "none", *common])
        group.wait_healthy(inst, f"http://127.0.0.1:{ip}", timeout=600)
        sched = group.start(
            "sched",
            [
                "scheduler",
                "--model",
                model,
                "--port",
                str(sp),
                "--colocated",
                f"http://127.0.0.1:{ip}",
            ],
        )
    else:
        flags = [] if mode == "direct-whole" else ["--enable-layer"]
        flags += ["--enable-direct"] if mode.startswith("direct") else []
        for role in ("prefill", "decode"):
            port = free_port()
            group.start(
                role,
                [
                    "serve",
                    "--role",
                    role,
                    "--port",
                    str(port),
                    "--scheduler",
                    surl,
                    *common,
                    *flags,
                ],
            )
        sched = group.start(
            "sched", ["scheduler", "--model", model, "--port", str(sp), "--poll-interval", "0.2"]
        )
    group.wait_healthy(sched, surl, timeout=600, ready_key="ready")
    if mode != "colocated":
        deadline = time.monotonic() + 600
        while not http_json(f"{surl}/internal/v1/cluster")["linked"]:
            if time.monotonic() > deadline:
                raise RuntimeError("the scheduler never linked prefill and decode")
            time.sleep(0.2)
    return surl


def _ttft_ms(url: str, prompt_len: int, repeats: int, seed: int) -> list[float]:
    times = []
    for r in range(repeats + 1):
        # a fresh prompt every time: nothing cached anywhere
        prompt = [(seed * 7919 + r * 104729 + i * 31) % 30000 + 100 for i in range(prompt_len)]
        t0 = time.perf_counter()
        out = http_json(
            f"{url}/v1/completions",
            {"prompt": prompt, "max_tokens": 1, "temperature": 0, "ignore_eos": True},
            timeout=300,
        )
        elapsed = (time.perf_counter() - t0) * 1e3
        if len(out["choices"][0]["token_ids"]) != 1:
            raise RuntimeError(f"unexpected reply {out}")
        if r > 0:  # the first request warms up
            times.append(elapsed)
    return times


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="llama-2-7b")
    parser.add_argument("--prompt-len", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--modes", nargs="+", default=["colocated", "direct", "staged"])
    parser.add_argument("--gpu-memory-utilization", default="0.4")
    parser.add_argument("--json", metavar="PATH")
    args = parser.parse_args(argv)
    results = {}
    for i, mode in enumerate(args.modes):
        with ProcessGroup() as group:
            url = _start(group, args.model, mode, args.gpu_memory_utilization)
            times = _ttft_ms(url, args.prompt_len, args.repeats, seed=i)
        results[mode] = {"median_ms": statistics.median(times), "all_ms": times}
        print(
            f"{mode:>10}: TTFT median {statistics.median(times):8.1f} ms  {[round(t, 1) for t in times]}"
        )
    base = results.get("colocated", {}).get("median_ms")
    summary = {
        "model": args.model,
        "prompt_len": args.prompt_len,
        "commit": os.environ.get("PDSERVE_COMMIT", "unknown"),
        "results": results,
    }
    if base:
        for r in results.values():
            r["of_colocated"] = r["median_ms"] / base
    if args.json:
        with open(args.json, "w") as f:
            json.dump(summary, f, indent=1)
    parts = [
        f"{m} {r['median_ms']:.1f} ms" + (f" = {r['of_colocated']:.3f}x" if base else "")
        for m, r in results.items()
    ]
    print(f"TTFT {args.model} {args.prompt_len} tokens: " + "; ".join(parts))
    return 0


if __name__ == "__main__":
    sys.exit(main())
