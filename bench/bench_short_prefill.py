"""Short prompts: time to the first token of one request, its prompt chunk replayed through the step
CUDA graphs (one row per token, attention in tiles of rows) vs run eagerly, on the same engine and
weights in the same run; the batch-1 decode step (the weight-read floor of any small step) alongside.
Also a mixed step: a short prompt joining a running decode batch.

    python3 bench/bench_short_prefill.py --model llama-2-7b --new-tokens 1,8,16,32,64,128,256,512 \
        --prefix-tokens 0,1024,3072 --json short_prefill.json

Prints a table and one summary line (graph vs eager at 16 and 32 new tokens, no prefix).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch
from pdserve import SamplingParams
from pdserve.engine import LLMEngine

FIRST = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True)


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


class Prompts:
    """Random prompts of a fixed seed; each call gives fresh tokens (no radix hit past the prefix)."""

    def __init__(self, vocab: int, seed: int) -> None:
        self.vocab = vocab
        self.gen = torch.Generator().manual_seed(seed)

    def take(self, n: int) -> list[int]:
        return torch.randint(1, self.vocab, (n,), generator=self.gen).tolist()


def time_first_token(engine: LLMEngine, rid: str, prompt: list[int]) -> float:
    """Seconds from add_request to the step that returns the first token (sampling waits for the GPU)."""
    start = time.perf_counter()
    engine.add_request(rid, prompt, FIRST)
    while True:
        if any(o.request_id == rid and o.new_token_ids for o in engine.step()):
            break
    elapsed = time.perf_counter() - start
    while engine.has_unfinished():
        engine.step()
    return elapsed


def decode_step_ms(engine: LLMEngine, prompts: Prompts, steps: int) -> float:
    params = SamplingParams(temperature=0.0, max_tokens=steps + 1, ignore_eos=True)
    engine.add_request("decode", prompts.take(16), params)
    engine.step()  # prefill
    torch.cuda.synchronize()
    start = time.perf_counter()
    while engine.has_unfinished():
        engine.step()
    return 1e3 * (time.perf_counter() - start) / steps


def mixed_step_ms(engine: LLMEngine, prompts: Prompts, num_decodes: int, new_tokens: int) -> float:
    """One step of num_decodes running decodes plus one new prompt of new_tokens (its first step)."""
    params = SamplingParams(temperature=0.0, max_tokens=64, ignore_eos=True)
    for i in range(num_decodes):
        engine.add_request(f"run{i}", prompts.take(8), params)
    for _ in range(3):  # prefilled and decoding
        engine.step()
    engine.add_request("join", prompts.take(new_tokens), FIRST)
    torch.cuda.synchronize()
    start = time.perf_counter()
    engine.step()
    ms = 1e3 * (time.perf_counter() - start)
    for rid in [f"run{i}" for i in range(num_decodes)] + ["join"]:
        engine.abort_request(rid)
    while engine.has_unfinished():
        engine.step()
    return ms


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="llama-2-7b")
    parser.add_argument("--new-tokens", type=_ints, default=_ints("1,8,16,32,64,128,256,512"))
    parser.add_argument("--prefix-tokens", type=_ints, default=_ints("0,1024,3072"))
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--mixed-decodes", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--ignore-kv-reads",
        action="store_true",
        help="replay graphs past the engine's KV-read bound (to see where it should lie)",
    )
    parser.add_argument("--json", dest="json_path")
    args = parser.parse_args()
    largest = max(args.new_tokens)
    engine = LLMEngine(
        model=args.model,
        load_format="dummy",
        device="cuda",
        dtype="bfloat16",
        enable_radix_caching=True,
        cuda_graph_max_prefill_tokens=largest,
        max_num_batched_tokens=max(2048, largest + max(args.prefix_tokens)),
        seed=args.seed,
    )
    graphs = engine.runner.decode_graphs
    if graphs is None:
        raise SystemExit("no CUDA graphs on this engine (needs CUDA, Triton and bf16/fp16)")
    default_kv_reads = graphs.max_prefill_kv_reads
    if args.ignore_kv_reads:  # time the graph rows even where the engine would run eagerly
        graphs.max_prefill_kv_reads = 1 << 62
    prompts = Prompts(engine.model_config.vocab_size, args.seed)
    for _ in range(3):  # warm-up: allocator, Triton's eager prefill kernels
        time_first_token(engine, "warm", prompts.take(largest))
        graphs.max_prefill_tokens = 0
        time_first_token(engine, "warm", prompts.take(largest))
        graphs.max_prefill_tokens = largest
    rows = []
    for prefix_len in args.prefix_tokens:
        prefix = prompts.take(prefix_len)
        if prefix_len:
            time_first_token(engine, "prefix", prefix)  # cached from now on
        for n in args.new_tokens:
            times: dict[str, list[float]] = {"graph": [], "eager": []}
            for rep in range(args.repeats):
                for mode in ("graph", "eager") if rep % 2 == 0 else ("eager", "graph"):
                    graphs.max_prefill_tokens = largest if mode == "graph" else 0
                    prompt = prefix + prompts.take(n)
                    times[mode].append(time_first_token(engine, f"{mode}-{rep}", prompt))
            kv_reads = graphs.kv_reads([prefix_len], [n])
            graph_ms = 1e3 * statistics.median(times["graph"])
            eager_ms = 1e3 * statistics.median(times["eager"])
            rows.append(
                {
                    "prefix_tokens": prefix_len,
                    "new_tokens": n,
                    "graph_ms": graph_ms,
                    "eager_ms": eager_ms,
                    "graph_over_eager": graph_ms / eager_ms,
                    "kv_reads": kv_reads,
                    "engine_replays": kv_reads <= default_kv_reads,
                }
            )
    graphs.max_prefill_tokens = largest
    step_ms = decode_step_ms(engine, prompts, steps=50)
    mixed = {}
    for mode in ("graph", "eager"):
        graphs.max_prefill_tokens = largest if mode == "graph" else 0
        mixed[mode] = statistics.median(
            mixed_step_ms(engine, prompts, args.mixed_decodes, 32) for _ in range(args.repeats)
        )
    engine.shutdown()

    print(
        f"{'prefix':>7} {'new':>5} {'graph ms':>9} {'eager ms':>9} {'graph/eager':>11} "
        f"{'kv reads':>9} engine replays"
    )
    for r in rows:
        print(
            f"{r['prefix_tokens']:>7} {r['new_tokens']:>5} {r['graph_ms']:>9.2f} "
            f"{r['eager_ms']:>9.2f} {r['graph_over_eager']:>11.3f} {r['kv_reads']:>9} "
            f"{'yes' if r['engine_replays'] else 'no'}"
        )
    print(f"batch-1 decode step {step_ms:.2f} ms")
    print(
        f"mixed step ({args.mixed_decodes} decodes + a 32-token prompt): graph {mixed['graph']:.2f} ms, "
        f"eager {mixed['eager']:.2f} ms"
    )
    result = {
        "model": args.model,
        "device": torch.cuda.get_device_name(),
        "commit": os.environ.get("PDSERVE_COMMIT", "unknown"),
        "args": {k: v for k, v in vars(args).items() if k != "json_path"},
        "rows": rows,
        "decode_step_ms": step_ms,
        "mixed_step_ms": mixed,
    }
    if args.json_path:
        with open(args.json_path, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=2)
    short = {r["new_tokens"]: r for r in rows if r["prefix_tokens"] == 0}
    summary = ", ".join(
        f"{n} tokens {short[n]['graph_ms']:.1f} vs {short[n]['eager_ms']:.1f} ms"
        for n in (16, 32)
        if n in short
    )
    print(f"short prefill, graph vs eager: {summary}; decode step {step_ms:.2f} ms")


if __name__ == "__main__":
    main()
