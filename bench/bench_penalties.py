"""Presence/frequency penalties for a batch of sampling rows: the engine's batched count (generated ids
read in place from each sequence's array('q'), one scatter for all rows) against a per-row version
(one list-to-tensor conversion, bincount and update per row each step), side by side in one run.

    python bench/bench_penalties.py --device cpu --batch-sizes 1,16 --output-lens 256
    python bench/bench_penalties.py --json out.json       # on the GPU: 32,000-token vocabulary
"""

from __future__ import annotations

import argparse
import json
import time
from array import array

import torch
from pdserve import SamplingParams
from pdserve.engine.sampler import apply_penalties


def per_row(logits: torch.Tensor, params: list[SamplingParams], outputs: list[list[int]]):
    """The baseline: each penalised row on its own, from a Python list of ids."""
    out = logits.clone()
    vocab = logits.shape[-1]
    for row, p in enumerate(params):
        ids = torch.tensor(outputs[row], dtype=torch.long).to(logits.device, non_blocking=True)
        counts = torch.bincount(ids, minlength=vocab)[:vocab].to(logits.dtype)
        out[row] -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).to(
            logits.dtype
        )
    return out


def _time_ms(fn, fn_args: tuple, device: torch.device, repeats: int) -> float:
    """Median wall time of fn(*fn_args) in ms (synchronised on the GPU)."""
    fn(*fn_args)  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn(*fn_args)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    times.sort()
    return 1e3 * times[len(times) // 2]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--batch-sizes", default="1,16,64,256")
    parser.add_argument("--output-lens", default="256,2048")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", dest="json_path", default=None)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    g = torch.Generator().manual_seed(args.seed)
    rows = []
    for batch in (int(b) for b in args.batch_sizes.split(",")):
        for length in (int(n) for n in args.output_lens.split(",")):
            logits = torch.randn(batch, args.vocab, generator=g).to(device)
            params = [SamplingParams(presence_penalty=0.5, frequency_penalty=0.3)] * batch
            outputs = torch.randint(0, args.vocab, (batch, length), generator=g).tolist()
            arrays = [array("q", o) for o in outputs]
            assert torch.allclose(
                apply_penalties(logits, params, arrays), per_row(logits, params, outputs)
            )
            ours = _time_ms(apply_penalties, (logits, params, arrays), device, args.repeats)
            base = _time_ms(per_row, (logits, params, outputs), device, args.repeats)
            rows.append({"batch": batch, "output_len": length, "ours_ms": ours, "per_row_ms": base})
            print(
                f"batch {batch:4d} x {length:5d} generated: batched {ours:8.3f} ms, "
                f"per row {base:8.3f} ms ({base / ours:.1f} x)"
            )
    result = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "vocab": args.vocab,
        "rows": rows,
    }
    if args.json_path:
        with open(args.json_path, "w") as f:
            json.dump(result, f, indent=1)
    worst = max(rows, key=lambda r: r["batch"] * r["output_len"])
    print(
        f"penalties, batch {worst['batch']} x {worst['output_len']}: batched "
        f"{worst['ours_ms']:.3f} ms vs per row {worst['per_row_ms']:.3f} ms"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
