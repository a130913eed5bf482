"""Where a decode step's device time goes: per-kernel device time of CUDA-graph replays (torch profiler),
summed by kernel name, against the replay's wall time measured with events (the difference is the time
between kernels). Diagnostic for issue 5's batch-1 target; prints a table, optional JSON.

    python3 bench/profile_decode.py [--model llama-2-13b] [--batch-size 1] [--variants fast,no-pdl]
    python3 bench/profile_decode.py --host 50     # also: host phases and cProfile of 50 engine steps
"""

from __future__ import annotations

import argparse
import collections
import gc
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_decode_step import VARIANTS, _random_prompts  # noqa: E402


def profile(engine, batch_size: int, context_len: int, replays: int, host_steps: int = 0) -> dict:
    from pdserve import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=64 + host_steps, ignore_eos=True)
    vocab = engine.model_config.vocab_size
    ids = [f"p{i}" for i in range(batch_size)]
    for rid, p in zip(ids, _random_prompts(batch_size, context_len, vocab, 0), strict=True):
        engine.add_request(rid, p, params)
    sched = engine.scheduler
    while sched.waiting or any(s.num_computed_tokens < s.num_prompt_tokens for s in sched.running):
        engine.step()  # prefill (several steps for long batches)
    for _ in range(2):  # warm-up decode steps
        engine.step()
    runner = engine.runner
    graphs = runner.decode_graphs
    result: dict = {}
    orig_run = runner.run

    def measured_run(batch, after_layer=None):
        if not result and graphs is not None and graphs.can_run(batch):
            result.update(_measure(graphs, graphs.prepare(batch), replays))
        return orig_run(batch, after_layer)

    runner.run = measured_run
    try:
        engine.step()
    finally:
        runner.run = orig_run
    if not result:
        raise SystemExit("profile_decode: the decode step did not run a CUDA graph")
    if host_steps:
        result["host_phases_us"] = _host_phases(engine, host_steps)
        result["host_profile"] = _host_profile(engine, host_steps)
    for rid in ids:
        engine.abort_request(rid)
    engine.step()
    return result


def _host_profile(engine, steps: int) -> str:
    """cProfile of `steps` decode steps (the engine's Python side; the GPU work is a graph replay)."""
    import cProfile
    import io
    import pstats

    torch.cuda.synchronize()
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(steps):
        engine.step()
    torch.cuda.synchronize()
    prof.disable()
    out = io.StringIO()
    pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(25)
    return out.getvalue()


def _host_phases(engine, steps: int) -> dict[str, float]:
    """Wall µs per engine step spent in each phase (no profiler: perf_counter around the calls).
    `sample` includes waiting for the GPU; `other` is the step's remainder (outputs, bookkeeping)."""
    import time

    import pdserve.engine.model_runner as model_runner

    sched, graphs = engine.scheduler, engine.runner.decode_graphs
    spent: dict[str, float] = collections.defaultdict(float)

    def timed(name, fn):
        def wrapper(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                spent[name] += time.perf_counter() - t0

        return wrapper

    targets = [
        (sched, "schedule"), (graphs, "prepare"), (graphs, "replay"), (model_runner, "sample"),
        (sched, "postprocess"), (engine.block_manager, "run_evictor"),
    ]  # fmt: skip
    saved = [(obj, name, getattr(obj, name)) for obj, name in targets]
    for obj, name, fn in saved:
        setattr(obj, name, timed(name, fn))
    try:
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(steps):
            engine.step()
        total = time.perf_counter() - t0
    finally:
        for obj, name, fn in saved:
            if obj is model_runner:
                setattr(obj, name, fn)
            else:
                delattr(obj, name)  # the instance attribute hid the class's method
    phases = {name: 1e6 * t / steps for name, t in spent.items()}
    phases["step"] = 1e6 * total / steps
    phases["other"] = phases["step"] - sum(v for k, v in phases.items() if k != "step")
    return phases


def _measure(graphs, bs: int, replays: int) -> dict:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as tprofile

    for _ in range(5):
        graphs.replay(bs)
    torch.cuda.synchronize()
    times = []
    for _ in range(30):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        graphs.replay(bs)
        e.record()
        e.synchronize()
        times.append(s.elapsed_time(e))
    wall_ms = sorted(times)[len(times) // 2]
    with tprofile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(replays):
            graphs.replay(bs)
        torch.cuda.synchronize()
    per_name: dict[str, list[float]] = collections.defaultdict(list)
    for ev in prof.events():
        if ev.device_type == torch.autograd.DeviceType.CUDA:
            per_name[ev.name].append(ev.device_time_total)
    kernels = {
        name: {"calls_per_step": len(v) / replays, "us_per_step": sum(v) / replays}
        for name, v in per_name.items()
    }
    busy_us = sum(k["us_per_step"] for k in kernels.values())
    return {"wall_ms": wall_ms, "kernel_busy_ms": busy_us / 1e3, "kernels": kernels}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="llama-2-13b")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--context-len", type=int, default=128)
    parser.add_argument("--variants", default="fast,no-pdl")
    parser.add_argument("--replays", type=int, default=10)
    parser.add_argument("--host", type=int, default=0, metavar="STEPS", help="cProfile STEPS steps")
    parser.add_argument("--json")
    args = parser.parse_args()
    from pdserve.engine import LLMEngine

    out = {}
    for name in args.variants.split(","):
        engine = LLMEngine(
            model=args.model,
            dtype="bfloat16",
            load_format="dummy",
            device="cuda",
            seed=0,
            gpu_memory_utilization=0.85,
            max_num_seqs=max(8, args.batch_size),
            max_model_len=4096,
            **VARIANTS[name],
        )
        r = profile(engine, args.batch_size, args.context_len, args.replays, args.host)
        out[name] = r
        print(
            f"== {name}: replay {r['wall_ms']:.3f} ms, kernels busy {r['kernel_busy_ms']:.3f} ms, "
            f"between kernels {r['wall_ms'] - r['kernel_busy_ms']:.3f} ms"
        )
        print(f"{'us/step':>9} {'calls':>6} {'us/call':>8}  kernel")
        for kname, k in sorted(r["kernels"].items(), key=lambda kv: -kv[1]["us_per_step"])[:25]:
            c = k["calls_per_step"]
            print(
                f"{k['us_per_step']:9.1f} {c:6.0f} {k['us_per_step'] / max(c, 1):8.2f}  {kname[:90]}"
            )
        if "host_phases_us" in r:
            print("host phases, us/step: " + ", ".join(
                f"{k} {v:.0f}" for k, v in r["host_phases_us"].items()
            ))  # fmt: skip
        if "host_profile" in r:
            print(r["host_profile"])
        engine.runner.decode_graphs = None
        del engine
        gc.collect()
        torch.cuda.empty_cache()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
