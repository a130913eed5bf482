"""Requests that share a long prefix (a system prompt) with a request still decoding: how much of the
prefix they compute and how soon they get their first token, against the same requests arriving after
that request ended (its prefix cached for sure), measured in the same run.

One "leader" request (prefix + its own suffix) starts and decodes `--leader-tokens` tokens; once it has
its first token, `--followers` requests (the same prefix, each its own suffix) arrive one per engine step.
Then the leader ends, and the same number of fresh followers (new suffixes) arrive again. A radix cache
that only learns a prefix when its request ends recomputes the whole prefix for the first wave.

    python bench/bench_shared_prefix.py --model tiny --device cpu --prefix-len 512
    python bench/bench_shared_prefix.py --model llama-2-7b --load-format dummy --json out.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from pdserve import SamplingParams
from pdserve.engine import LLMEngine


def _sync(engine: LLMEngine) -> None:
    if engine.runner.device.type == "cuda":
        torch.cuda.synchronize(engine.runner.device)


class Stepper:
    """Steps the engine and keeps the ids of the requests not finished yet."""

    def __init__(self, engine: LLMEngine):
        self.engine = engine
        self.live: set[str] = set()

    def add(self, request_id: str, token_ids: list[int], params: SamplingParams) -> None:
        self.engine.add_request(request_id, token_ids, params)
        self.live.add(request_id)

    def step(self) -> list:
        outs = self.engine.step()
        _sync(self.engine)
        self.live -= {o.request_id for o in outs if o.finished}
        return outs


def _wave(stepper: Stepper, tag: str, prefix: list[int], suffixes: list[list[int]]) -> dict:
    """Adds one follower per step (each prefix + its suffix, 4 greedy tokens) and steps until all have
    their first token. Returns their TTFTs and the prompt tokens computed for them."""
    engine = stepper.engine
    params = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
    before = engine.stats().num_computed_prefill_tokens
    arrived: dict[str, float] = {}
    ttft: dict[str, float] = {}
    pending = list(enumerate(suffixes))
    while pending or len(ttft) < len(suffixes):
        if pending:
            i, suffix = pending.pop(0)
            rid = f"{tag}-{i}"
            stepper.add(rid, prefix + suffix, params)
            arrived[rid] = time.perf_counter()
        outs = stepper.step()
        now = time.perf_counter()
        for o in outs:
            if o.request_id in arrived and o.request_id not in ttft and o.new_token_ids:
                ttft[o.request_id] = now - arrived[o.request_id]
    computed = engine.stats().num_computed_prefill_tokens - before
    while stepper.live & set(arrived):
        stepper.step()
    return {
        "ttft_ms": [1e3 * t for t in ttft.values()],
        "median_ttft_ms": 1e3 * statistics.median(ttft.values()),
        "computed_prompt_tokens": computed,
        "prompt_tokens": sum(len(prefix) + len(s) for s in suffixes),
    }


def run(engine: LLMEngine, args, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    vocab = engine.model_config.vocab_size

    def tokens(n: int) -> list[int]:
        return torch.randint(0, vocab, (n,), generator=g).tolist()

    stepper = Stepper(engine)
    prefix = tokens(args.prefix_len)
    leader_id = f"leader-{seed}"
    leader = SamplingParams(temperature=0.0, max_tokens=args.leader_tokens, ignore_eos=True)
    stepper.add(leader_id, prefix + tokens(args.suffix_len), leader)
    while not any(o.new_token_ids for o in stepper.step()):
        pass
    during = _wave(
        stepper, f"during-{seed}", prefix, [tokens(args.suffix_len) for _ in range(args.followers)]
    )
    if leader_id not in stepper.live:
        raise SystemExit(
            "the leader ended before its followers had their first tokens: raise --leader-tokens"
        )
    while stepper.live:
        stepper.step()
    after = _wave(
        stepper, f"after-{seed}", prefix, [tokens(args.suffix_len) for _ in range(args.followers)]
    )
    return {"during": during, "after": after}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="tiny", help="preset name or HF directory")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--load-format", default="auto")
    parser.add_argument("--prefix-len", type=int, default=2048)
    parser.add_argument("--suffix-len", type=int, default=32)
    parser.add_argument("--followers", type=int, default=8)
    parser.add_argument("--leader-tokens", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.6)
    parser.add_argument("--kv-cache-gb", type=float, default=0.25)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", dest="json_path", default=None)
    args = parser.parse_args(argv)
    engine = LLMEngine(
        model=args.model,
        device=args.device,
        load_format=args.load_format,
        seed=args.seed,
        gpu_memory_utilization=args.gpu_memory_utilization,
        kv_cache_gb=args.kv_cache_gb,
        enable_radix_caching=True,
        max_num_batched_tokens=max(2048, args.prefix_len + args.suffix_len),
        max_model_len=args.prefix_len + args.suffix_len + args.leader_tokens + 8,
    )
    run(engine, args, seed=10_000)  # warm-up (graphs, allocator)
    runs = [run(engine, args, seed=args.seed + r) for r in range(args.repeats)]
    summary = {}
    for wave in ("during", "after"):
        summary[wave] = {
            "median_ttft_ms": statistics.median(r[wave]["median_ttft_ms"] for r in runs),
            "computed_fraction": sum(r[wave]["computed_prompt_tokens"] for r in runs)
            / sum(r[wave]["prompt_tokens"] for r in runs),
        }
    ratio = summary["during"]["median_ttft_ms"] / summary["after"]["median_ttft_ms"]
    device = engine.runner.device
    result = {
        "model": args.model,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "args": vars(args),
        "summary": summary,
        "during_over_after": ratio,
        "runs": runs,
    }
    if args.json_path:
        with open(args.json_path, "w") as f:
            json.dump(result, f, indent=1)
    d, a = summary["during"], summary["after"]
    print(
        f"shared prefix {args.prefix_len} + {args.suffix_len}, {args.followers} followers: "
        f"while the leader decodes TTFT {d['median_ttft_ms']:.2f} ms, computed "
        f"{100 * d['computed_fraction']:.1f}% of their prompts; after it ended "
        f"{a['median_ttft_ms']:.2f} ms, {100 * a['computed_fraction']:.1f}%; ratio {ratio:.3f}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
