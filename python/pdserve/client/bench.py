"""`pdserve bench`: the load client (the seed's `--input-len/--output-len/--request-rate/--num-requests`
client, plus ShareGPT multi-turn, SLO goodput, a progress bar and result files).

Programmatic use (no side effects on import):

    from pdserve.client.bench import BenchConfig, run_benchmark, format_table
    result = asyncio.run(run_benchmark(BenchConfig(dataset="sharegpt", multi_turn=True)))
    print(format_table(result))

Prompts. Random, completions endpoint, single turn: the prompt is `--input-len` token ids drawn
uniformly from `--token-id-range` (exact length; `ignore_eos` and `max_tokens = --output-len` make
the output exact too). Otherwise (chat, multi-turn, `--prompt-format text`) prompts are text: random
common words, `--input-len * --chars-per-token` characters long. ShareGPT: human messages cut to
`--max-input-chars` characters; each turn asks for the dataset answer's length estimated as
characters / `--chars-per-token`, capped at `--output-len`. Pick `--max-input-chars` so the longest
prompt fits the model's context: about context_tokens * chars_per_token for a BPE tokenizer
(~4 characters per token in English), and context_tokens for a byte-level one.

Multi-turn: `--num-requests` counts conversations; they arrive as a Poisson process at
`--request-rate`. Turn k is sent after turn k-1's answer arrives, as the whole history (with the
answers the server gave) plus the new user message: chat messages, or for completions the text
"User: <msg>\\nAssistant:<answer>\\n..." ending in "Assistant:". A conversation ends early when the
next prompt would exceed `--max-input-chars` or a turn fails (counted as skipped turns).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys

from pdserve.argtypes import non_negative_int, positive_float, positive_int
from pdserve.client.results import (
    DATASETS,
    DEFAULT_URL,
    ENDPOINTS,
    PROMPT_FORMATS,
    BenchConfig,
    BenchResult,
    format_table,
    load_result_json,
    summary_line,
    write_result_json,
)
from pdserve.client.runner import build_workload, run_benchmark
from pdserve.server.auth import API_KEY_ENV, secret_from

# where `--api-key` comes from when not given: ours first, then the OpenAI clients' usual variable
API_KEY_ENVS = (API_KEY_ENV, "OPENAI_API_KEY")

__all__ = [
    "BenchConfig",
    "BenchResult",
    "add_arguments",
    "build_workload",
    "config_from_args",
    "format_table",
    "load_result_json",
    "run",
    "run_benchmark",
    "summary_line",
    "write_result_json",
]


def _json_object(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {text!r} ({exc})") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(
            f"expected a JSON object, got {type(value).__name__}: {text!r}"
        )
    return value


def _rate(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number > 0 or 'inf', got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a number > 0 or 'inf', got {text}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Adds the `pdserve bench` flags (defaults: the seed's 32/32 tokens, 12.8 req/s, 64 requests)."""
    d = BenchConfig()
    target = parser.add_argument_group("target")
    target.add_argument(
        "--url", default=d.url, help=f"server base URL (default: the scheduler, {DEFAULT_URL})"
    )
    target.add_argument(
        "--endpoint", choices=ENDPOINTS, default=d.endpoint, help="OpenAI API to call"
    )
    target.add_argument(
        "--model",
        default=None,
        help="model name sent in requests (default: first of GET /v1/models)",
    )
    target.add_argument(
        "--timeout", type=positive_float, default=d.timeout_s, help="per-request timeout in s"
    )
    target.add_argument(
        "--api-key",
        default=None,
        metavar="KEY",
        help=f"send 'Authorization: Bearer KEY' (the server's --api-key; default: ${API_KEY_ENVS[0]}, "
        f"else ${API_KEY_ENVS[1]}; never written to --result-json)",
    )
    target.add_argument(
        "--no-stream", action="store_true", help="non-streaming requests (no TTFT/ITL)"
    )
    work = parser.add_argument_group("workload")
    work.add_argument("--dataset", choices=DATASETS, default=d.dataset)
    work.add_argument(
        "--input-len", type=positive_int, default=d.input_len, help="random: prompt tokens"
    )
    work.add_argument(
        "--output-len",
        type=positive_int,
        default=d.output_len,
        help="random: output tokens; sharegpt: cap on each answer's tokens",
    )
    work.add_argument(
        "--request-rate",
        type=_rate,
        default=d.request_rate,
        help="Poisson arrivals per second (conversations with --multi-turn); inf: all at once",
    )
    work.add_argument(
        "--num-requests",
        type=positive_int,
        default=d.num_requests,
        help="requests to send (conversations with --multi-turn)",
    )
    work.add_argument(
        "--multi-turn", action="store_true", help="send whole conversations, turn after turn"
    )
    work.add_argument(
        "--max-turns", type=positive_int, default=None, help="turns per conversation at most"
    )
    work.add_argument("--seed", type=int, default=d.seed, help="seeds prompts and arrival times")
    work.add_argument(
        "--max-input-chars",
        type=positive_int,
        default=d.max_input_chars,
        help="sharegpt/multi-turn: longest prompt text in characters (fit the model's context)",
    )
    work.add_argument(
        "--chars-per-token",
        type=positive_float,
        default=d.chars_per_token,
        help="characters per token for text-length estimates",
    )
    work.add_argument(
        "--prompt-format",
        choices=PROMPT_FORMATS,
        default=d.prompt_format,
        help="random prompts as token ids (exact lengths; completions only) or text; auto: ids when possible",
    )
    work.add_argument(
        "--token-id-range",
        type=non_negative_int,
        nargs=2,
        metavar=("LO", "HI"),
        default=list(d.token_id_range),
        help="random token-id prompts draw ids from [LO, HI)",
    )
    work.add_argument(
        "--max-concurrency", type=positive_int, default=None, help="requests in flight at most"
    )
    work.add_argument("--temperature", type=float, default=d.temperature)
    work.add_argument("--no-ignore-eos", action="store_true", help="let the model stop at EOS")
    work.add_argument(
        "--sharegpt-path", default=None, help="ShareGPT JSON file (default: the packaged one)"
    )
    work.add_argument(
        "--extra-body",
        type=_json_object,
        default=None,
        metavar="JSON",
        help="a JSON object merged into every request body, e.g. "
        '\'{"logit_bias": {"50256": -100}}\' (not a field the client sets: model, prompt, '
        "messages, max_tokens, max_completion_tokens, temperature, stream, stream_options, "
        "ignore_eos, n)",
    )
    report = parser.add_argument_group("report")
    report.add_argument(
        "--slo-ttft-ms", type=positive_float, default=None, help="TTFT SLO for goodput"
    )
    report.add_argument(
        "--slo-tpot-ms", type=positive_float, default=None, help="TPOT SLO for goodput"
    )
    report.add_argument(
        "--result-json", default=None, metavar="F", help="write config, requests and summary to F"
    )
    report.add_argument(
        "--label", default="", help="series name for `pdserve plot` (e.g. the system variant)"
    )
    report.add_argument("--no-progress", action="store_true", help="no progress bar")


def config_from_args(args: argparse.Namespace) -> BenchConfig:
    """The `BenchConfig` that parsed `pdserve bench` flags describe."""
    return BenchConfig(
        url=args.url,
        endpoint=args.endpoint,
        model=args.model,
        dataset=args.dataset,
        input_len=args.input_len,
        output_len=args.output_len,
        request_rate=args.request_rate,
        num_requests=args.num_requests,
        multi_turn=args.multi_turn,
        max_turns=args.max_turns,
        seed=args.seed,
        slo_ttft_ms=args.slo_ttft_ms,
        slo_tpot_ms=args.slo_tpot_ms,
        timeout_s=args.timeout,
        stream=not args.no_stream,
        max_concurrency=args.max_concurrency,
        max_input_chars=args.max_input_chars,
        chars_per_token=args.chars_per_token,
        prompt_format=args.prompt_format,
        token_id_range=tuple(args.token_id_range),
        ignore_eos=not args.no_ignore_eos,
        temperature=args.temperature,
        progress=not args.no_progress,
        label=args.label,
        sharegpt_path=args.sharegpt_path,
        extra_body=args.extra_body,
        api_key=secret_from(args.api_key, *API_KEY_ENVS),
    )


def run(args: argparse.Namespace) -> int:
    """Runs `pdserve bench`: prints the table and a summary line. Returns 0 when every request
    completed, 1 when some failed or the server could not be asked, 2 for a bad configuration."""
    config = config_from_args(args)
    try:
        config.validate()
    except ValueError as exc:
        print(f"pdserve bench: {exc}", file=sys.stderr)
        return 2
    try:
        result = asyncio.run(run_benchmark(config))
    except (RuntimeError, FileNotFoundError) as exc:
        print(f"pdserve bench: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("pdserve bench: interrupted", file=sys.stderr)
        return 130
    print(format_table(result))
    if result.num_turns_skipped:
        print(
            f"turns not sent (history over --max-input-chars, or an earlier turn failed): {result.num_turns_skipped}"
        )
    print(summary_line(result))
    if args.result_json:
        write_result_json(result, args.result_json)
        print(f"results written to {args.result_json}")
    return 0 if result.summary.num_failed == 0 else 1
