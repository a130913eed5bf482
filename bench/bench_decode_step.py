"""Decode step and prefill of one engine instance against the GPU's own limits, measured in the same run.

Why: issue 5's targets are ratios to this GPU's measured ceilings — decode at batch 1 within 1.15x of
(weight bytes / copy bandwidth), prefill of a 2,048-token prompt at >= 65 % of the bf16 matmul rate in
model FLOPs — and the same weights under transformers as a ratio. Engine variants (CUDA graphs, Triton
attention, fused ops, GEMV on/off) run one after another in the same process, so each change is
measured with and without.

    python3 bench/bench_decode_step.py --json decode_step.json
    python3 bench/bench_decode_step.py --variants fast --batch-sizes 1 --hf off   # quick

Decode figures per batch size: `gpu_ms`, the decode step's device time (a CUDA-graph replay timed with
events, median of 30; eager variants: events around the model call), and `step_ms`, the engine's
wall-clock step (scheduling, input copy, forward, sampling; median). Floor = (weights read per step +
KV read per step) / copy bandwidth; the embedding table is not counted (a step reads b rows of it).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import time

import torch
from limits import copy_bandwidth, matmul_rate

VARIANTS = {
    # name: engine options
    "fast": dict(),
    "no-pdl": dict(pdl=False),
    "no-gemv": dict(small_batch_gemv=False),
    "no-fused": dict(fused_ops=False),
    "eager-triton": dict(enforce_eager=True),
    "eager-torch": dict(attention_backend="torch", enforce_eager=True),
}


def _sync() -> None:
    torch.cuda.synchronize()


def model_bytes(engine) -> tuple[int, int]:
    """(all parameter bytes, bytes a decode step reads: all but the embedding table)."""
    model = engine.runner.model
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    embed = model.model.embed_tokens.weight
    tied = model.lm_head.weight is embed
    read = total if tied else total - embed.numel() * embed.element_size()
    return total, read


def kv_bytes_per_token(engine) -> int:
    mc, r = engine.model_config, engine.runner
    return 2 * mc.num_hidden_layers * r.num_kv_heads * mc.head_dim * r.kv_cache.element_size()


def prefill_flops(engine, num_tokens: int) -> float:
    """Model FLOPs of one causal prefill: 2 x (non-embedding, non-head params) per token, the causal
    attention matmuls (2 x L x H x D x T^2), and the logits of the last token."""
    mc = engine.model_config
    model = engine.runner.model
    layers = sum(p.numel() for p in model.model.layers.parameters())
    attn = 2 * mc.num_hidden_layers * mc.num_attention_heads * mc.head_dim * num_tokens**2
    head = 2 * model.lm_head.weight.numel()
    return 2 * layers * num_tokens + attn + head


def _random_prompts(n: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (n, length), generator=g).tolist()


def bench_decode(engine, batch_size: int, context_len: int, num_steps: int, seed: int) -> dict:
    """Prefills batch_size prompts of context_len tokens, then times decode steps."""
    from pdserve import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=num_steps + 40, ignore_eos=True)
    vocab = engine.model_config.vocab_size
    ids = [f"d{batch_size}-{i}" for i in range(batch_size)]
    for rid, p in zip(ids, _random_prompts(batch_size, context_len, vocab, seed), strict=True):
        engine.add_request(rid, p, params)
    sched = engine.scheduler
    while sched.waiting or any(s.num_computed_tokens < s.num_prompt_tokens for s in sched.running):
        engine.step()
    for _ in range(3):  # warm-up decode steps
        engine.step()
    runner = engine.runner
    gpu_ms: list[float] = []
    graphs = runner.decode_graphs
    orig_run = runner.run

    def timed_run(batch, after_layer=None):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        if graphs is not None and graphs.can_run(batch) and not gpu_ms:
            bs = graphs.prepare(batch)
            for _ in range(30):
                start.record()
                graphs.replay(bs)
                end.record()
                end.synchronize()
                gpu_ms.append(start.elapsed_time(end))
        if graphs is None:
            start.record()
            out = orig_run(batch, after_layer)
            end.record()
            end.synchronize()
            gpu_ms.append(start.elapsed_time(end))
            return out
        return orig_run(batch, after_layer)

    runner.run = timed_run
    step_ms = []
    kv_tokens = sum(s.num_tokens for s in sched.running)
    try:
        for _ in range(num_steps):
            _sync()
            t0 = time.perf_counter()
            engine.step()
            _sync()
            step_ms.append(1e3 * (time.perf_counter() - t0))
    finally:
        runner.run = orig_run
    for rid in ids:
        engine.abort_request(rid)
    engine.step()
    med_step = statistics.median(step_ms)
    return {
        "batch_size": batch_size,
        "context_len": context_len,
        "kv_tokens_read": kv_tokens,
        "gpu_ms": statistics.median(gpu_ms),
        "step_ms": med_step,
        "tokens_per_s": batch_size / (med_step * 1e-3),
    }


def bench_prefill(engine, num_tokens: int, repeats: int, seed: int) -> dict:
    """One prompt of num_tokens (fresh, random) per step, median wall time to its first token."""
    from pdserve import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True)
    vocab = engine.model_config.vocab_size
    times = []
    for r in range(repeats + 1):
        engine.add_request(f"p{r}", _random_prompts(1, num_tokens, vocab, seed + r)[0], params)
        _sync()
        t0 = time.perf_counter()
        while engine.has_unfinished():
            engine.step()
        _sync()
        if r:  # the first is a warm-up
            times.append(time.perf_counter() - t0)
    return {"num_tokens": num_tokens, "seconds": statistics.median(times)}


def make_engine(args, **options):
    from pdserve.engine import LLMEngine

    return LLMEngine(
        model=args.model,
        dtype=args.dtype,
        load_format="dummy",
        device="cuda",
        seed=args.seed,
        gpu_memory_utilization=args.gpu_memory_utilization,
        max_num_seqs=max(args.batch_sizes),
        max_num_batched_tokens=max(2048, args.prefill_len),
        max_model_len=args.max_model_len,
        **options,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="llama-2-13b")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--batch-sizes", default="1,8,32,128")
    parser.add_argument("--context-len", type=int, default=128, help="prompt tokens per sequence")
    parser.add_argument("--steps", type=int, default=20, help="timed decode steps per batch size")
    parser.add_argument("--prefill-len", type=int, default=2048)
    parser.add_argument("--prefill-repeats", type=int, default=3)
    parser.add_argument("--max-model-len", type=int, default=4096)
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.85)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--hf", choices=["on", "off"], default="on")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", dest="json_path")
    args = parser.parse_args(argv)
    args.batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    if not torch.cuda.is_available():
        print("bench_decode_step: needs a CUDA GPU", file=sys.stderr)
        return 2
    torch.manual_seed(args.seed)
    result: dict = {
        "device": torch.cuda.get_device_name(),
        "model": args.model,
        "dtype": args.dtype,
        "commit": os.environ.get("PDSERVE_COMMIT", ""),
        "args": {k: v for k, v in vars(args).items() if k != "json_path"},
    }
    bw = copy_bandwidth()
    flops = matmul_rate()
    result["copy_bandwidth_Bps"], result["matmul_flops"] = bw, flops
    print(
        f"copy bandwidth {bw / 1e12:.3f} TB/s (read+write), bf16 matmul {flops / 1e12:.1f} TFLOP/s"
    )
    result["variants"] = {}
    for name in args.variants.split(","):
        engine = make_engine(args, **VARIANTS[name])
        total_b, read_b = model_bytes(engine)
        kv_tok = kv_bytes_per_token(engine)
        result.update(weight_bytes=total_b, weight_bytes_read_per_step=read_b)
        rows = []
        for b in args.batch_sizes:
            row = bench_decode(engine, b, args.context_len, args.steps, args.seed + b)
            floor_ms = 1e3 * (read_b + row["kv_tokens_read"] * kv_tok) / bw
            row.update(floor_ms=floor_ms, gpu_vs_floor=row["gpu_ms"] / floor_ms)
            row["step_vs_floor"] = row["step_ms"] / floor_ms
            rows.append(row)
            print(
                f"{name:13s} b={b:4d}: gpu {row['gpu_ms']:7.2f} ms, step {row['step_ms']:7.2f} ms "
                f"({row['tokens_per_s']:8.0f} tok/s), floor {floor_ms:6.2f} ms -> gpu x{row['gpu_vs_floor']:.3f}",
                flush=True,
            )
        entry: dict = {"decode": rows, "options": VARIANTS[name]}
        if name in ("fast", "eager-torch"):
            pre = bench_prefill(engine, args.prefill_len, args.prefill_repeats, args.seed)
            fl = prefill_flops(engine, args.prefill_len)
            pre.update(model_flops=fl, flops_per_s=fl / pre["seconds"])
            pre["frac_of_matmul"] = pre["flops_per_s"] / flops
            entry["prefill"] = pre
            print(
                f"{name:13s} prefill {args.prefill_len}: {pre['seconds'] * 1e3:.1f} ms, "
                f"{pre['flops_per_s'] / 1e12:.1f} TFLOP/s = {100 * pre['frac_of_matmul']:.1f} % of matmul",
                flush=True,
            )
        if name == "fast" and args.hf == "on":
            sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
            from bench_engine import bench_hf, hf_from_engine

            hf = hf_from_engine(engine)
            vocab = engine.model_config.vocab_size
            hf_rows = []
            for b in (1, 8):
                bench_hf(hf, engine.runner.device, vocab, b, args.context_len, 2, args.seed)
                h = bench_hf(hf, engine.runner.device, vocab, b, args.context_len, 16, args.seed)
                ours = (
                    next(r for r in rows if r["batch_size"] == b) if b in args.batch_sizes else None
                )
                if ours is not None:
                    h["decode_speedup"] = h["decode_step_ms"] / ours["step_ms"]
                h["batch_size"] = b
                hf_rows.append(h)
                print(
                    f"transformers  b={b:4d}: decode {h['decode_step_ms']:.2f} ms/step"
                    + (f" (ours x{h['decode_speedup']:.2f} faster)" if ours else ""),
                    flush=True,
                )
            entry["hf"] = hf_rows
            del hf
        result["variants"][name] = entry
        engine.runner.decode_graphs = None
        del engine
        gc.collect()
        torch.cuda.empty_cache()
    if args.json_path:
        with open(args.json_path, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=2)
    fast = result["variants"].get("fast") or next(iter(result["variants"].values()))
    d1 = fast["decode"][0]
    summary = (
        f"bench_decode_step {args.model} {args.dtype} on {result['device']}: b={d1['batch_size']} "
        f"{d1['gpu_ms']:.2f} ms = x{d1['gpu_vs_floor']:.3f} of floor {d1['floor_ms']:.2f} ms"
    )
    if "prefill" in fast:
        summary += f"; prefill {100 * fast['prefill']['frac_of_matmul']:.1f} % of matmul"
    if "hf" in fast and "decode_speedup" in fast["hf"][0]:
        summary += f"; vs transformers x{fast['hf'][0]['decode_speedup']:.1f}"
    print(summary)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
