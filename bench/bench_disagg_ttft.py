"""Time to first token of one prompt, disaggregated against colocated, on one GPU (SPEC §5: layer-wise
overlap, disaggregated TTFT <= 1.10 x the prefill-only TTFT of the same prompt).

Set-ups (--modes), one after another, each with the GPU to itself:
  engine        the same prefill through an in-process engine: no server, no HTTP (the compute floor);
  colocated     one instance (--role both) behind a `pdserve scheduler` (the baseline), also measured
                without the scheduler (row "instance");
  direct        prefill + decode instance, --enable-direct --enable-layer (cuda_ipc, layer by layer);
  direct-dma    the same with the cuda_ipc copies made by the driver (PDSERVE_IPC_COPY=driver) instead
                of the copy kernel;
  direct-whole  --enable-direct without --enable-layer (the whole request's KV after the prefill);
  staged        prefill + decode instance, --enable-layer, KV through pinned host slots and TCP.
Each request streams one token of a fresh prompt (no cache hits; with --cached-prefix N, a prompt is N
tokens every request shares, cached on every instance by the warm-up request, then fresh ones: a
conversation's next turn, radix caching on); TTFT is the time to the first
streamed data line: the prefill plus, when disaggregated, the reservation on D and whatever part of
the KV transfer does not overlap the prefill (P answers once D holds every byte). Median of
--repeats after one warm-up request. Disaggregated rows also give P's mean `pdserve_kv_send_wait_seconds`
over the same requests (first token to D holding every byte: the transfer's unhidden part). --use-agg-block: every instance
keeps its KV block-major (a block's layers are one contiguous run).

    python bench/bench_disagg_ttft.py [--model llama-2-7b] [--prompt-lens 16,2048] [--modes ...]
        [--cached-prefix 3072]
"""

from __future__ import annotations

import argparse
import http.client
import json
import multiprocessing
import os
import statistics
import sys
import time

from pdserve.engine.config import ModelConfig
from pdserve.server import auth
from pdserve.server.launcher import ProcessGroup, free_port, histogram_sum_count, http_json

MODES = ["engine", "colocated", "direct", "direct-dma", "direct-whole", "staged"]


def _start(
    group: ProcessGroup, model: str, mode: str, util: str, device: str, extra: list[str]
) -> dict[str, str]:
    """Starts one set-up; returns {row label: URL to send completions to} and the prefill instance's
    URL (None when colocated)."""
    common = ["--model", model, "--load-format", "dummy", "--device", device, *extra]
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
            if role == "prefill":
                prefill_url = f"http://127.0.0.1:{port}"
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
        # the processes inherit $PDSERVE_CLUSTER_TOKEN when set: our internal call carries it too
        token = auth.cluster_headers(auth.secret_from(None, auth.CLUSTER_TOKEN_ENV))
        while not http_json(f"{surl}/internal/v1/cluster", headers=token)["linked"]:
            if time.monotonic() > deadline:
                raise RuntimeError("the scheduler never linked prefill and decode")
            time.sleep(0.2)
        return {mode: surl}, prefill_url
    return {"instance": f"http://127.0.0.1:{ip}", "colocated": surl}, None


def _send_wait(prefill_url: str) -> tuple[float, float]:
    """(sum in seconds, count) of the prefill instance's pdserve_kv_send_wait_seconds histogram."""
    token = auth.cluster_headers(auth.secret_from(None, auth.CLUSTER_TOKEN_ENV))
    return histogram_sum_count(prefill_url, "pdserve_kv_send_wait_seconds", token)


def _first_token_ms(url: str, prompt: list[int]) -> float:
    """Streams one completion; returns the milliseconds until its first data line (the first token)."""
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=300)
    body = json.dumps(
        {"prompt": prompt, "max_tokens": 1, "temperature": 0, "ignore_eos": True, "stream": True}
    )
    t0 = time.perf_counter()
    conn.request("POST", "/v1/completions", body, {"Content-Type": "application/json"})
    resp = conn.getresponse()
    if resp.status != 200:
        raise RuntimeError(f"HTTP {resp.status}: {resp.read()[:500]!r}")
    first = None
    for raw in resp:
        line = raw.decode().strip()
        if line.startswith("data:") and first is None:
            first = (time.perf_counter() - t0) * 1e3
            if "error" in line:
                raise RuntimeError(line)
    conn.close()
    if first is None:
        raise RuntimeError("the stream carried no data")
    return first


def _prompts(
    prompt_len: int, repeats: int, seed: int, vocab: int, prefix: list[int] | None = None
) -> list[list[int]]:
    """A fresh prompt every time (nothing cached anywhere but `prefix`, which starts each); the first
    one warms up."""
    span = vocab - 10
    return [
        (prefix or []) + [(seed * 7919 + r * 104729 + i * 31) % span + 5 for i in range(prompt_len)]
        for r in range(repeats + 1)
    ]


def _ttft_ms(
    url: str,
    prompt_len: int,
    repeats: int,
    seed: int,
    vocab: int,
    after_warm_up=None,
    prefix: list[int] | None = None,
) -> list[float]:
    """TTFT of `repeats` fresh prompts after one warm-up request (then `after_warm_up()` is called)."""
    warm_up, *prompts = _prompts(prompt_len, repeats, seed, vocab, prefix)
    _first_token_ms(url, warm_up)
    if after_warm_up is not None:
        after_warm_up()
    return [_first_token_ms(url, p) for p in prompts]


def _engine_ms(
    model: str, util: str, device: str, prompt_lens: list[int], repeats: int
) -> dict[int, list[float]]:
    """The compute floor: the same prefill through an in-process engine, no server, no HTTP."""
    import torch
    from pdserve.engine import LLM, SamplingParams

    llm = LLM(
        model,
        load_format="dummy",
        device=device,
        gpu_memory_utilization=float(util),
    )
    sync = torch.cuda.synchronize if device == "cuda" else lambda: None
    params = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
    out = {}
    for n in prompt_lens:
        times = []
        for p in _prompts(n, repeats, 99, llm.engine.model_config.vocab_size):
            sync()
            t0 = time.perf_counter()
            llm.generate([p], params)
            times.append((time.perf_counter() - t0) * 1e3)
        out[n] = times[1:]
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="llama-2-7b")
    parser.add_argument("--prompt-lens", default="2048", help="comma-separated prompt lengths")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--modes", nargs="+", default=["colocated", "direct", "staged"], choices=MODES
    )
    parser.add_argument("--gpu-memory-utilization", default="0.4")
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument(
        "--use-agg-block",
        action="store_true",
        help="every instance (colocated too) keeps its KV block-major: a block's layers are one run",
    )
    parser.add_argument(
        "--cached-prefix",
        type=int,
        default=0,
        metavar="N",
        help="every prompt starts with the same N tokens, cached everywhere by the warm-up request "
        "(radix caching on every instance); --prompt-lens then counts the fresh tokens after them",
    )
    parser.add_argument("--json", metavar="PATH")
    args = parser.parse_args(argv)
    extra = ["--use-agg-block"] if args.use_agg_block else []
    if args.cached_prefix < 0:
        parser.error(f"--cached-prefix must be >= 0, got {args.cached_prefix}")
    if args.cached_prefix and "engine" in args.modes:
        parser.error(
            "--cached-prefix is for the server set-ups: bench_short_prefill.py times the engine"
        )
    if args.cached_prefix:
        extra.append("--enable-radix-caching")
    prompt_lens = [int(n) for n in args.prompt_lens.split(",")]
    vocab = ModelConfig.load(args.model).vocab_size
    prefix = _prompts(args.cached_prefix, 0, 12345, vocab)[0] if args.cached_prefix else None
    results: dict[str, dict[int, dict]] = {}
    # mode -> prompt length -> P's mean KV send wait after the warm-up: the transfer's unhidden part
    send_wait_ms: dict[str, dict[int, float | None]] = {}
    for i, mode in enumerate(args.modes):
        if mode == "engine":
            # in a process of its own, so that its GPU memory is given back for the next set-ups
            with multiprocessing.get_context("spawn").Pool(1) as pool:
                per_len = pool.apply(
                    _engine_ms,
                    (
                        args.model,
                        args.gpu_memory_utilization,
                        args.device,
                        prompt_lens,
                        args.repeats,
                    ),
                )
        else:
            env = {"PDSERVE_IPC_COPY": "driver"} if mode == "direct-dma" else None
            per_len = {}
            with ProcessGroup(env=env) as group:
                urls, prefill_url = _start(
                    group, args.model, mode, args.gpu_memory_utilization, args.device, extra
                )
                for n in prompt_lens:
                    before = []  # P's send-wait histogram after the warm-up request

                    def scrape(before=before, prefill_url=prefill_url):
                        if prefill_url:
                            before.append(_send_wait(prefill_url))

                    for j, (label, url) in enumerate(urls.items()):
                        # prompts of their own per row: two rows of one set-up share its cache
                        per_len.setdefault(n, {})[label] = _ttft_ms(
                            url, n, args.repeats, 16 * i + j, vocab, scrape, prefix
                        )
                    if before:
                        after = _send_wait(prefill_url)
                        count = after[1] - before[0][1]
                        send_wait_ms.setdefault(mode, {})[n] = (
                            (after[0] - before[0][0]) / count * 1e3 if count else None
                        )
            # one set-up may be measured at two URLs (the colocated instance, with and without
            # the scheduler in front): each becomes its own row
            for n, by_label in per_len.items():
                for label, times in by_label.items():
                    results.setdefault(label, {})[n] = times
            continue
        for n, times in per_len.items():
            results.setdefault(mode, {})[n] = times
    summary = {
        "model": args.model,
        "use_agg_block": args.use_agg_block,
        "cached_prefix_tokens": args.cached_prefix,
        "commit": os.environ.get("PDSERVE_COMMIT", "unknown"),
        "ttft_ms": {},
    }
    lines = []
    for n in prompt_lens:
        base = statistics.median(results["colocated"][n]) if "colocated" in results else None
        for label, per_len in results.items():
            times = per_len[n]
            med = statistics.median(times)
            row = {"median_ms": med, "all_ms": times}
            if base:
                row["of_colocated"] = med / base
            wait = send_wait_ms.get(label, {}).get(n)
            if wait is not None:
                row["mean_kv_send_wait_ms"] = wait
            summary["ttft_ms"].setdefault(str(n), {})[label] = row
            ratio = f" = {med / base:.3f}x colocated" if base else ""
            waited = f", KV send wait {wait:.2f} ms" if wait is not None else ""
            lines.append(
                f"{n:>6} tokens {label:>14}: TTFT median {med:8.1f} ms{ratio}{waited}  "
                f"{[round(t, 1) for t in times]}"
            )
    print("\n".join(lines))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(summary, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
