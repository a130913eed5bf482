"""Tensor parallelism: decode step time at TP=N against TP=1 on the same weights in the same run, and
whether greedy outputs agree on a short run. One summary line; `--json PATH` for all numbers.

    python bench/bench_tp.py --model tiny --device cpu --tp 2
    python bench/bench_tp.py --model llama-2-13b --tp 2 --batch-sizes 1,8,32 --json results/tp.json
    python bench/bench_tp.py --commands     # host cost of handing a step to a worker: pipe vs gloo

Issue 5's target on two GPUs: decode step at TP=2 <= 0.6 x the TP=1 step, greedy outputs identical.
"""

from __future__ import annotations

import argparse
import gc
import json
import multiprocessing
import pickle
import time

import torch
from pdserve import SamplingParams
from pdserve.engine import LLMEngine


def _prompts(batch_size: int, input_len: int, vocab: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch_size, input_len), generator=g).tolist()


def _sync(engine: LLMEngine) -> None:
    if engine.runner.device.type == "cuda":
        torch.cuda.synchronize(engine.runner.device)


def decode_step_ms(engine: LLMEngine, batch_size: int, args) -> float:
    """Median step time once every sequence of the batch decodes (prefill excluded)."""
    vocab = engine.model_config.vocab_size
    params = SamplingParams(temperature=0.0, max_tokens=args.output_len + 1, ignore_eos=True)
    for i, p in enumerate(_prompts(batch_size, args.input_len, vocab, args.seed)):
        engine.add_request(f"b{batch_size}-{i}", p, params)
    started: set[str] = set()
    while len(started) < batch_size:
        started.update(o.request_id for o in engine.step() if o.new_token_ids)
    times = []
    while engine.has_unfinished():
        _sync(engine)
        t0 = time.perf_counter()
        engine.step()
        _sync(engine)
        times.append(time.perf_counter() - t0)
    times.sort()
    return 1e3 * times[len(times) // 2]


def greedy_tokens(engine: LLMEngine, args) -> list[list[int]]:
    params = SamplingParams(temperature=0.0, max_tokens=args.greedy_tokens, ignore_eos=True)
    prompts = _prompts(4, args.input_len, engine.model_config.vocab_size, args.seed + 1)
    for i, p in enumerate(prompts):
        engine.add_request(f"g{i}", p, params)
    out: dict[str, list[int]] = {}
    while engine.has_unfinished():
        for o in engine.step():
            out.setdefault(o.request_id, []).extend(o.new_token_ids)
    return [out[f"g{i}"] for i in range(len(prompts))]


# ---- --commands: what the driver pays to hand one step to a worker ----------------------------------
def _step_inputs(batch_size: int, context_len: int):
    from pdserve.engine.model_runner import StepInputs

    blocks = -(-context_len // 16)
    b = batch_size
    return StepInputs(
        input_ids=[5] * b, positions=[context_len - 1] * b, slot_blocks=[3] * b,
        slot_offsets=[2] * b, context_lens=[context_len] * b, query_start_loc=list(range(b + 1)),
        block_tables=[list(range(blocks))] * b, sample_seq_indices=list(range(b)),
        sample_rows=list(range(b)), sampling_params=[SamplingParams(temperature=0)] * b,
        output_positions=[7] * b, is_decode_only=True, use_graph=True,
    )  # fmt: skip


def _command_worker(port: int, reader) -> None:
    from pdserve.engine import distributed

    group = distributed.init_group(distributed.connect_store(port, 2), 1, 2, torch.device("cpu"))
    while (message := group.broadcast_object()) != "stop":
        if message == "ping":
            group.gather_objects(None)
    while (message := pickle.loads(reader.recv_bytes())) != "stop":
        if message == "ping":
            reader.send_bytes(b"pong")


def command_costs(repeats: int = 500) -> dict:
    """µs the driver spends per step command (pipelined sends) and per round trip, over the gloo
    control group and over an OS pipe (what multiprocessing workers use), for decode batches."""
    from pdserve.engine import distributed

    store = distributed.create_store(2)
    ctx = multiprocessing.get_context("spawn")
    ours, theirs = ctx.Pipe()
    proc = ctx.Process(target=_command_worker, args=(store.port, theirs))
    proc.start()
    group = distributed.init_group(store, 0, 2, torch.device("cpu"))
    channels = {
        "gloo": (group.broadcast_object, lambda: group.gather_objects(None)),
        "pipe": (
            lambda m: ours.send_bytes(pickle.dumps(m, protocol=pickle.HIGHEST_PROTOCOL)),
            ours.recv_bytes,
        ),
    }
    results: dict = {}
    for name, (send, reply) in channels.items():
        for b in (1, 32, 128):
            message = ("execute", (_step_inputs(b, 300),))
            t0 = time.perf_counter()
            for _ in range(repeats):
                send(message)
            send("ping")
            reply()
            t1 = time.perf_counter()
            for _ in range(50):
                send("ping")
                reply()
            results[f"{name} b={b}"] = {
                "send_us": 1e6 * (t1 - t0) / repeats,
                "round_trip_us": 1e6 * (time.perf_counter() - t1) / 50,
            }
        send("stop")
    proc.join(30)
    group.shutdown()
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--tp", type=int, default=2)
    ap.add_argument("--batch-sizes", default="1,8")
    ap.add_argument("--input-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=64)
    ap.add_argument("--greedy-tokens", type=int, default=32)
    ap.add_argument("--num-kv-blocks", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None)
    ap.add_argument("--commands", action="store_true", help="only the step-command host costs")
    args = ap.parse_args()
    if args.commands:
        costs = command_costs()
        if args.json:
            with open(args.json, "w", encoding="utf-8") as f:
                json.dump(costs, f, indent=2)
        for name, c in costs.items():
            print(
                f"{name:12s} send {c['send_us']:7.1f} us   round trip {c['round_trip_us']:7.1f} us"
            )
        return
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    results: dict = {"args": vars(args), "runs": {}}
    for tp in (1, args.tp):
        engine = LLMEngine(
            model=args.model, device=args.device, dtype=args.dtype, seed=args.seed,
            tensor_parallel_size=tp, num_kv_blocks=args.num_kv_blocks,
        )  # fmt: skip
        decode_step_ms(engine, batch_sizes[0], args)  # warm-up
        runner = getattr(engine.runner, "runner", engine.runner)  # rank 0's ModelRunner
        run = {
            "device": str(engine.runner.device),
            "cuda_graphs": runner.decode_graphs is not None,
            "ipc_collectives": getattr(getattr(engine.runner, "group", None), "ipc", None)
            is not None,
            "decode_step_ms": {},
        }
        for b in batch_sizes:
            run["decode_step_ms"][b] = decode_step_ms(engine, b, args)
        run["greedy"] = greedy_tokens(engine, args)
        results["runs"][tp] = run
        engine.shutdown()
        del engine
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    one, many = results["runs"][1], results["runs"][args.tp]
    ratios = {b: many["decode_step_ms"][b] / one["decode_step_ms"][b] for b in batch_sizes}
    same = sum(a == b for a, b in zip(one["greedy"], many["greedy"], strict=True))
    results["ratios"], results["greedy_identical_prompts"] = ratios, same
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(results, f, indent=2)
    steps = ", ".join(
        f"b{b} {many['decode_step_ms'][b]:.2f}/{one['decode_step_ms'][b]:.2f} ms ({ratios[b]:.2f}x)"
        for b in batch_sizes
    )
    print(
        f"bench_tp {args.model} on {one['device']}: TP={args.tp}/TP=1 decode step {steps}; "
        f"greedy identical on {same}/{len(one['greedy'])} prompts; TP={args.tp} graphs "
        f"{many['cuda_graphs']}, IPC collectives {many['ipc_collectives']}"
    )


if __name__ == "__main__":
    main()
