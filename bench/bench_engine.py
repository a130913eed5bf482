"""Offline engine benchmark: prefill and decode throughput/latency at several batch sizes; on GPU the
same weights under transformers in the same run, as a ratio. One summary line; `--json PATH` for all numbers.

    python bench/bench_engine.py --model tiny --device cpu
    python bench/bench_engine.py --model llama-2-13b --batch-sizes 1,8,32 --json results/engine.json
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from pdserve import SamplingParams
from pdserve.engine import LLMEngine


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _prompts(batch_size: int, input_len: int, vocab: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch_size, input_len), generator=g).tolist()


def bench_ours(
    engine: LLMEngine, batch_size: int, input_len: int, output_len: int, seed: int
) -> dict:
    """Prefill: time until every prompt has its first token. Decode: time per step after that."""
    dev = engine.runner.device
    prompts = _prompts(batch_size, input_len, engine.model_config.vocab_size, seed)
    params = SamplingParams(temperature=0.0, max_tokens=output_len + 1, ignore_eos=True)
    for i, p in enumerate(prompts):
        engine.add_request(f"b{batch_size}-{i}", p, params)
    _sync(dev)
    start = time.perf_counter()
    have_first: set[str] = set()
    while len(have_first) < batch_size:
        have_first.update(o.request_id for o in engine.step() if o.new_token_ids)
    _sync(dev)
    prefill_s = time.perf_counter() - start
    start = time.perf_counter()
    num_steps = 0
    while engine.has_unfinished():
        engine.step()
        num_steps += 1
    _sync(dev)
    decode_s = time.perf_counter() - start
    return {
        "prefill_s": prefill_s,
        "prefill_tokens_per_s": batch_size * input_len / prefill_s,
        "decode_step_ms": 1e3 * decode_s / max(num_steps, 1),
        "decode_tokens_per_s": batch_size * output_len / decode_s,
    }


def hf_from_engine(engine: LLMEngine):
    """A transformers LlamaForCausalLM sharing our weight tensors (views: no extra memory)."""
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    mc = engine.model_config
    cfg = LlamaConfig(
        vocab_size=mc.vocab_size,
        hidden_size=mc.hidden_size,
        intermediate_size=mc.intermediate_size,
        num_hidden_layers=mc.num_hidden_layers,
        num_attention_heads=mc.num_attention_heads,
        num_key_value_heads=mc.num_key_value_heads,
        head_dim=mc.head_dim,
        max_position_embeddings=mc.max_position_embeddings,
        rms_norm_eps=mc.rms_norm_eps,
        rope_theta=mc.rope_theta,
        rope_scaling=mc.rope_scaling,
        tie_word_embeddings=mc.tie_word_embeddings,
    )
    ours = engine.runner.model
    dev, dtype = engine.runner.device, engine.runner.dtype
    with torch.device("meta"):
        hf = LlamaForCausalLM(cfg)
    q = mc.num_attention_heads * mc.head_dim
    kv = mc.num_key_value_heads * mc.head_dim

    def put(module: torch.nn.Module, tensor: torch.Tensor) -> None:
        module._parameters["weight"] = torch.nn.Parameter(tensor, requires_grad=False)

    put(hf.model.embed_tokens, ours.model.embed_tokens.weight)
    put(hf.model.norm, ours.model.norm.weight)
    put(hf.lm_head, ours.lm_head.weight)
    for ol, hl in zip(ours.model.layers, hf.model.layers, strict=True):
        qkv = ol.self_attn.qkv_proj.weight
        put(hl.self_attn.q_proj, qkv[:q])
        put(hl.self_attn.k_proj, qkv[q : q + kv])
        put(hl.self_attn.v_proj, qkv[q + kv :])
        put(hl.self_attn.o_proj, ol.self_attn.o_proj.weight)
        gate_up = ol.mlp.gate_up_proj.weight
        put(hl.mlp.gate_proj, gate_up[: mc.intermediate_size])
        put(hl.mlp.up_proj, gate_up[mc.intermediate_size :])
        put(hl.mlp.down_proj, ol.mlp.down_proj.weight)
        put(hl.input_layernorm, ol.input_layernorm.weight)
        put(hl.post_attention_layernorm, ol.post_attention_layernorm.weight)
    hf.model.rotary_emb = LlamaRotaryEmbedding(cfg).to(dev)
    return hf.to(dtype).eval()


@torch.inference_mode()
def bench_hf(
    hf,
    device: torch.device,
    vocab: int,
    batch_size: int,
    input_len: int,
    output_len: int,
    seed: int,
) -> dict:
    ids = torch.tensor(_prompts(batch_size, input_len, vocab, seed), device=device)
    mask = torch.ones_like(ids)
    hf(ids[:, :8], attention_mask=mask[:, :8])  # warm-up
    _sync(device)
    start = time.perf_counter()
    hf(ids, attention_mask=mask)
    _sync(device)
    prefill_s = time.perf_counter() - start
    kw = dict(attention_mask=mask, do_sample=False, pad_token_id=0, eos_token_id=None)
    start = time.perf_counter()
    hf.generate(ids, max_new_tokens=output_len + 1, min_new_tokens=output_len + 1, **kw)
    _sync(device)
    decode_s = max(time.perf_counter() - start - prefill_s, 1e-9)
    return {
        "prefill_s": prefill_s,
        "prefill_tokens_per_s": batch_size * input_len / prefill_s,
        "decode_step_ms": 1e3 * decode_s / output_len,
        "decode_tokens_per_s": batch_size * output_len / decode_s,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="tiny", help="preset name or HF directory")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--load-format", default="auto")
    parser.add_argument("--batch-sizes", default="1,4,16")
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=32)
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.6)
    parser.add_argument("--kv-cache-gb", type=float, default=0.25)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--hf",
        choices=["auto", "on", "off"],
        default="auto",
        help="transformers baseline (auto: on GPU)",
    )
    parser.add_argument("--json", dest="json_path", default=None)
    args = parser.parse_args(argv)
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    engine = LLMEngine(
        model=args.model,
        device=args.device,
        dtype=args.dtype,
        load_format=args.load_format,
        seed=args.seed,
        gpu_memory_utilization=args.gpu_memory_utilization,
        kv_cache_gb=args.kv_cache_gb,
        max_num_seqs=max(batch_sizes),
        max_num_batched_tokens=max(2048, args.input_len),
        max_model_len=args.input_len + args.output_len + 8,
    )
    device = engine.runner.device
    bench_ours(engine, 1, 16, 2, args.seed)  # warm-up
    results: dict = {
        "model": args.model,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "dtype": str(engine.runner.dtype),
        "input_len": args.input_len,
        "output_len": args.output_len,
        "num_kv_blocks": engine.runner.num_blocks,
        "runs": [],
    }
    use_hf = args.hf == "on" or (args.hf == "auto" and device.type == "cuda")
    hf = hf_from_engine(engine) if use_hf else None
    for b in batch_sizes:
        bench_ours(engine, b, args.input_len, 2, args.seed + 1)  # warm-up at this shape
        if hf is not None:
            bench_hf(
                hf, device, engine.model_config.vocab_size, b, args.input_len, 2, args.seed + 1
            )
        row = {
            "batch_size": b,
            "ours": bench_ours(engine, b, args.input_len, args.output_len, args.seed),
        }
        if hf is not None:
            row["hf"] = bench_hf(
                hf,
                device,
                engine.model_config.vocab_size,
                b,
                args.input_len,
                args.output_len,
                args.seed,
            )
            row["decode_speedup_vs_hf"] = (
                row["hf"]["decode_step_ms"] / row["ours"]["decode_step_ms"]
            )
            row["prefill_speedup_vs_hf"] = row["hf"]["prefill_s"] / row["ours"]["prefill_s"]
        results["runs"].append(row)
        line = f"  batch {b:4d}: prefill {row['ours']['prefill_tokens_per_s']:10.0f} tok/s, decode {row['ours']['decode_step_ms']:8.2f} ms/step {row['ours']['decode_tokens_per_s']:10.0f} tok/s"
        if hf is not None:
            line += f" | hf decode {row['hf']['decode_step_ms']:8.2f} ms/step (x{row['decode_speedup_vs_hf']:.2f}), prefill x{row['prefill_speedup_vs_hf']:.2f}"
        print(line, flush=True)
    if args.json_path:
        with open(args.json_path, "w", encoding="utf-8") as f:
            json.dump(results, f, indent=2)
    first, last = results["runs"][0], results["runs"][-1]
    summary = (
        f"bench_engine {args.model} on {results['device']} {results['dtype']}: decode b={first['batch_size']} "
        f"{first['ours']['decode_step_ms']:.2f} ms/step, b={last['batch_size']} {last['ours']['decode_tokens_per_s']:.0f} tok/s; "
        f"prefill {last['ours']['prefill_tokens_per_s']:.0f} tok/s"
    )
    if hf is not None:
        summary += f"; vs transformers decode x{first['decode_speedup_vs_hf']:.2f} (b={first['batch_size']})"
    print(summary)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
