"""`pdserve demo`: the main job on a fresh machine (SPEC §2).

Starts a global scheduler, one prefill and one decode instance here (the `tiny` preset by default; on
the GPU when present, sharing it, else on the CPU), runs a short multi-turn workload
through them with the load client, prints its table and the cache/transfer counters, and stops every
process it started, also on Ctrl-C and on failure.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import sys
import time


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="tiny", help="preset or HF directory (default: tiny)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--num-conversations", type=int, default=8)
    parser.add_argument("--turns", type=int, default=3, help="turns per conversation")
    parser.add_argument("--input-len", type=int, default=32, help="tokens of each new user message")
    parser.add_argument("--output-len", type=int, default=16)
    parser.add_argument(
        "--request-rate",
        type=float,
        default=8.0,
        help="conversations per second (inf: all at once)",
    )
    parser.add_argument(
        "--ep-policy", default="prefix", help="prefill pick (random, rr, prefix, least, cost)"
    )
    parser.add_argument("--ed-policy", default="least", help="decode pick")
    parser.add_argument(
        "--timeout", type=float, default=120.0, help="seconds before giving up on start-up"
    )
    parser.add_argument(
        "--keep-logs", action="store_true", help="print where the processes' logs are"
    )


def _device(requested: str) -> str:
    if requested != "auto":
        return requested
    try:
        import torch
    except ImportError:
        return "cpu"
    # On a GPU the KV crosses between the instances GPU to GPU (--enable-direct: CUDA IPC).
    return "cuda" if torch.cuda.is_available() else "cpu"


def run(args: argparse.Namespace) -> int:
    device = _device(args.device)
    rc = _run_on(args, device)
    if rc not in (0, 130) and device == "cuda" and args.device == "auto":
        # The GPU is optional for the demo: a failure there (driver, memory, ...) falls back to the CPU.
        print(
            "pdserve demo: the run on the GPU failed (see above); running on the CPU instead",
            flush=True,
        )
        rc = _run_on(args, "cpu")
    return rc


def _run_on(args: argparse.Namespace, device: str) -> int:
    """One cluster on `device`, one workload; 0 when every request succeeded. Stops every process."""
    from pdserve.server import auth
    from pdserve.server.launcher import ProcessGroup, free_port, http_json

    # the processes inherit $PDSERVE_API_KEY / $PDSERVE_CLUSTER_TOKEN when set: then so do our calls
    api_key = auth.secret_from(None, auth.API_KEY_ENV)
    internal = auth.cluster_headers(auth.secret_from(None, auth.CLUSTER_TOKEN_ENV))
    group = ProcessGroup()
    t0 = time.perf_counter()
    try:
        sched_port, p_port, d_port = free_port(), free_port(), free_port()
        sched_url = f"http://127.0.0.1:{sched_port}"
        scheduler = group.start(
            "scheduler",
            [
                "scheduler",
                "--model",
                args.model,
                "--port",
                str(sched_port),
                "--ep-policy",
                args.ep_policy,
                "--ed-policy",
                args.ed_policy,
                "--poll-interval",
                "0.25",
            ],
        )
        common = [
            "--model",
            args.model,
            "--enable-separate",
            "--enable-layer",
            "--enable-radix-caching",
            "--enable-dcache",
            "--device",
            device,
            "--scheduler",
            sched_url,
            "--heartbeat-interval",
            "0.5",
        ]
        if device == "cpu":
            common += ["--kv-cache-gb", "0.05"]
        else:  # both instances share the GPU: each takes a slice of its memory; KV moves GPU to GPU
            common += ["--gpu-memory-utilization", "0.3", "--enable-direct"]
        group.start("prefill", ["serve", "--role", "prefill", "--port", str(p_port), *common])
        group.start("decode", ["serve", "--role", "decode", "--port", str(d_port), *common])
        print(
            f"pdserve demo: scheduler {sched_url}, prefill :{p_port}, decode :{d_port} ({args.model} on {device})",
            flush=True,
        )
        group.wait_healthy(scheduler, sched_url, timeout=args.timeout, ready_key="ready")
        # wait until the scheduler linked the pair
        deadline = time.monotonic() + args.timeout
        while not http_json(f"{sched_url}/internal/v1/cluster", headers=internal)["linked"]:
            if time.monotonic() > deadline:
                raise TimeoutError("the scheduler did not link the prefill and decode instances")
            time.sleep(0.2)
        print(
            f"pdserve demo: cluster up in {time.perf_counter() - t0:.1f}s; running "
            f"{args.num_conversations} conversations x {args.turns} turns",
            flush=True,
        )

        from pdserve.client import results as client_results
        from pdserve.client.runner import run_benchmark

        config = client_results.BenchConfig(
            url=sched_url,
            dataset="random",
            input_len=args.input_len,
            output_len=args.output_len,
            request_rate=math.inf if args.request_rate == math.inf else args.request_rate,
            num_requests=args.num_conversations,
            multi_turn=True,
            max_turns=args.turns,
            seed=0,
            progress=False,
            api_key=api_key,
        )
        result = asyncio.run(run_benchmark(config))
        print(client_results.format_table(result))
        cluster = http_json(f"{sched_url}/internal/v1/cluster", headers=internal)
        for inst in cluster["instances"]:
            s = http_json(f"{inst['url']}/internal/v1/stats", headers=internal)
            print(
                f"  {inst['role']:>7}: prefill tokens computed {s.get('num_computed_prefill_tokens', 0)}, "
                f"cache-hit tokens {s.get('num_hit_tokens', 0)}, KV bytes sent {s['kv_bytes_sent']}, "
                f"received {s['kv_bytes_received']}"
            )
        num_failed = sum(1 for r in result.records if r.error)
        print(
            f"pdserve demo: done in {time.perf_counter() - t0:.1f}s"
            + (f"; {num_failed} requests failed" if num_failed else ""),
            flush=True,
        )
        if args.keep_logs:
            print(f"pdserve demo: logs in {group.log_dir}")
        return 1 if num_failed else 0
    except KeyboardInterrupt:
        print("pdserve demo: interrupted; stopping the cluster", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - one message for people, then clean up
        print(f"pdserve demo: error: {exc}", file=sys.stderr)
        print(f"pdserve demo: logs in {group.log_dir}", file=sys.stderr)
        return 1
    finally:
        group.close()
