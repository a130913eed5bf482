"""Per-request records and the numbers a benchmark reports: latency percentiles, throughput,
goodput and prefix-cache hits, plus the plain-text table and one-line summary printed by `bench`.

Definitions (all latencies from the moment the request was sent):
- TTFT: time to the first chunk that carries output.
- E2E: time to the end of the response.
- TPOT (per request): (E2E - TTFT) / (completion_tokens - 1); undefined with fewer than 2 tokens.
- ITL: the gaps between consecutive output chunks, pooled over all requests.
- Goodput: completed requests meeting every SLO given (TTFT and/or TPOT), per second of the run.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

PERCENTILES = (50, 90, 99)


@dataclass
class RequestRecord:
    """What happened to one request. Times are seconds; offsets are from the start of the run."""

    request_id: int
    conversation_id: int
    turn_index: int
    scheduled_offset_s: float  # when the workload wanted it sent
    start_offset_s: float = 0.0  # when it was sent
    max_tokens: int = 0
    prompt_chars: int = 0  # length of the prompt text (0 when sent as token ids)
    ok: bool = False
    http_status: int | None = None
    error: str | None = None
    ttft_s: float | None = None  # None when not streamed or failed
    e2e_s: float | None = None
    itl_s: list[float] = field(default_factory=list)
    num_chunks: int = 0
    # Token counts come from `usage` when the server reports it (`usage_reported`); otherwise the
    # prompt count is exact for token-id prompts and len(text) / chars_per_token for text, and
    # the completion count is the number of output chunks.
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    cached_tokens: int | None = None  # usage.prompt_tokens_details.cached_tokens (prefix hits)
    usage_reported: bool = False
    finish_reason: str | None = None
    output_text: str = ""  # kept in memory for multi-turn history; not written to result files

    @property
    def tpot_s(self) -> float | None:
        """Time per output token after the first, or None when undefined."""
        if not self.ok or self.ttft_s is None or self.e2e_s is None:
            return None
        if self.completion_tokens is None or self.completion_tokens < 2:
            return None
        return (self.e2e_s - self.ttft_s) / (self.completion_tokens - 1)


@dataclass
class LatencyStats:
    """Milliseconds over `count` samples; every field is None when there are none."""

    count: int
    mean: float | None
    p50: float | None
    p90: float | None
    p99: float | None
    max: float | None

    @staticmethod
    def of_seconds(values_s: list[float]) -> LatencyStats:
        """Stats in ms of samples given in seconds (percentiles by linear interpolation)."""
        if not values_s:
            return LatencyStats(0, None, None, None, None, None)
        ms = np.asarray(values_s, dtype=np.float64) * 1000.0
        p50, p90, p99 = (float(v) for v in np.percentile(ms, PERCENTILES))
        return LatencyStats(len(ms), float(ms.mean()), p50, p90, p99, float(ms.max()))


@dataclass
class Summary:
    """The aggregate numbers of a run (see the module docstring for the definitions)."""

    duration_s: float
    num_requests: int
    num_completed: int
    num_failed: int
    num_conversations: int
    request_throughput: float  # completed requests / s
    input_token_throughput: float  # prompt tokens of completed requests / s
    output_token_throughput: float  # completion tokens / s
    total_prompt_tokens: int
    total_completion_tokens: int
    num_usage_reported: int  # completed requests whose token counts came from `usage`
    prefix_hit_tokens: int | None  # sum of cached_tokens; None when no response reported it
    prefix_hit_ratio: float | None  # prefix_hit_tokens / prompt tokens of those responses
    slo_ttft_ms: float | None
    slo_tpot_ms: float | None
    num_good: int | None  # completed requests meeting every SLO; None without SLOs
    goodput: float | None  # num_good / duration_s
    ttft_ms: LatencyStats
    tpot_ms: LatencyStats
    itl_ms: LatencyStats
    e2e_ms: LatencyStats
    errors: dict[str, int] = field(default_factory=dict)  # "status: message" -> count


def meets_slo(record: RequestRecord, slo_ttft_ms: float | None, slo_tpot_ms: float | None) -> bool:
    """True when a completed request meets every given SLO (a missing TTFT or TPOT passes only
    its own SLO when that one is not set; an undefined TPOT, one output token, passes)."""
    if not record.ok:
        return False
    if slo_ttft_ms is not None:
        latency_s = record.ttft_s if record.ttft_s is not None else record.e2e_s
        if latency_s is None or latency_s * 1000.0 > slo_ttft_ms:
            return False
    if slo_tpot_ms is not None:
        tpot_s = record.tpot_s
        if tpot_s is not None and tpot_s * 1000.0 > slo_tpot_ms:
            return False
    return True


def summarize(
    records: list[RequestRecord],
    duration_s: float,
    *,
    slo_ttft_ms: float | None = None,
    slo_tpot_ms: float | None = None,
) -> Summary:
    """Aggregates `records` of a run that took `duration_s` seconds (> 0)."""
    duration_s = max(duration_s, 1e-9)
    done = [r for r in records if r.ok]
    failed = [r for r in records if not r.ok]
    errors: dict[str, int] = {}
    for r in failed:
        key = f"{r.http_status if r.http_status is not None else 'no response'}: {r.error}"
        errors[key] = errors.get(key, 0) + 1
    prompt_tokens = sum(r.prompt_tokens or 0 for r in done)
    completion_tokens = sum(r.completion_tokens or 0 for r in done)
    with_hits = [r for r in done if r.cached_tokens is not None]
    hit_tokens = sum(r.cached_tokens for r in with_hits) if with_hits else None
    hit_base = sum(r.prompt_tokens or 0 for r in with_hits)
    has_slo = slo_ttft_ms is not None or slo_tpot_ms is not None
    num_good = sum(meets_slo(r, slo_ttft_ms, slo_tpot_ms) for r in done) if has_slo else None
    return Summary(
        duration_s=duration_s,
        num_requests=len(records),
        num_completed=len(done),
        num_failed=len(failed),
        num_conversations=len({r.conversation_id for r in records}),
        request_throughput=len(done) / duration_s,
        input_token_throughput=prompt_tokens / duration_s,
        output_token_throughput=completion_tokens / duration_s,
        total_prompt_tokens=prompt_tokens,
        total_completion_tokens=completion_tokens,
        num_usage_reported=sum(r.usage_reported for r in done),
        prefix_hit_tokens=hit_tokens,
        prefix_hit_ratio=(hit_tokens / hit_base) if hit_tokens is not None and hit_base else None,
        slo_ttft_ms=slo_ttft_ms,
        slo_tpot_ms=slo_tpot_ms,
        num_good=num_good,
        goodput=None if num_good is None else num_good / duration_s,
        ttft_ms=LatencyStats.of_seconds([r.ttft_s for r in done if r.ttft_s is not None]),
        tpot_ms=LatencyStats.of_seconds([t for r in done if (t := r.tpot_s) is not None]),
        itl_ms=LatencyStats.of_seconds([gap for r in done for gap in r.itl_s]),
        e2e_ms=LatencyStats.of_seconds([r.e2e_s for r in done if r.e2e_s is not None]),
        errors=errors,
    )


def _fmt(value: float | None, digits: int = 2) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.{digits}f}"


def format_summary_table(summary: Summary, title: str = "pdserve bench") -> str:
    """The plain-text results table (what `pdserve bench` prints)."""
    width = 56
    lines = [f" {title} ".center(width, "=")]

    def row(name: str, value: str) -> None:
        lines.append(f"{name:<34}{value:>22}")

    row("Requests completed / sent", f"{summary.num_completed} / {summary.num_requests}")
    if summary.num_conversations != summary.num_requests:
        row("Conversations", str(summary.num_conversations))
    row("Failed requests", str(summary.num_failed))
    row("Duration (s)", _fmt(summary.duration_s))
    row("Request throughput (req/s)", _fmt(summary.request_throughput))
    row("Input token throughput (tok/s)", _fmt(summary.input_token_throughput))
    row("Output token throughput (tok/s)", _fmt(summary.output_token_throughput))
    row(
        "Total prompt / completion tokens",
        f"{summary.total_prompt_tokens} / {summary.total_completion_tokens}",
    )
    if summary.prefix_hit_tokens is None:
        row("Prefix-hit tokens", "not reported")
    else:
        ratio = _fmt(
            None if summary.prefix_hit_ratio is None else 100 * summary.prefix_hit_ratio, 1
        )
        row("Prefix-hit tokens", f"{summary.prefix_hit_tokens} ({ratio} %)")
    if summary.goodput is None:
        row("Goodput (req/s)", "no SLO given")
    else:
        slos = []
        if summary.slo_ttft_ms is not None:
            slos.append(f"TTFT<={summary.slo_ttft_ms:g}ms")
        if summary.slo_tpot_ms is not None:
            slos.append(f"TPOT<={summary.slo_tpot_ms:g}ms")
        row("SLOs", " ".join(slos))
        row("Goodput (req/s)", _fmt(summary.goodput))
        row("Requests meeting SLOs", f"{summary.num_good} / {summary.num_requests}")
    lines.append("-" * width)
    lines.append(f"{'latency (ms)':<14}{'mean':>9}{'p50':>9}{'p90':>9}{'p99':>9}{'n':>6}")
    for name, stats in (
        ("TTFT", summary.ttft_ms),
        ("TPOT", summary.tpot_ms),
        ("ITL", summary.itl_ms),
        ("E2E", summary.e2e_ms),
    ):
        lines.append(
            f"{name:<14}{_fmt(stats.mean):>9}{_fmt(stats.p50):>9}{_fmt(stats.p90):>9}"
            f"{_fmt(stats.p99):>9}{stats.count:>6}"
        )
    if summary.errors:
        lines.append("-" * width)
        lines.append("errors (count  status: message):")
        for key, count in sorted(summary.errors.items(), key=lambda kv: -kv[1])[:5]:
            lines.append(f"  {count:>5}  {key[:200]}")
    lines.append("=" * width)
    return "\n".join(lines)


def format_summary_line(summary: Summary) -> str:
    """One line with the headline numbers (for logs and sweeps)."""
    goodput = "-" if summary.goodput is None else f"{summary.goodput:.2f}"
    return (
        f"completed={summary.num_completed}/{summary.num_requests} "
        f"req/s={summary.request_throughput:.2f} out_tok/s={summary.output_token_throughput:.1f} "
        f"goodput={goodput} ttft_ms(mean/p99)={_fmt(summary.ttft_ms.mean)}/{_fmt(summary.ttft_ms.p99)} "
        f"tpot_ms(mean/p99)={_fmt(summary.tpot_ms.mean)}/{_fmt(summary.tpot_ms.p99)} "
        f"e2e_ms(mean)={_fmt(summary.e2e_ms.mean)} hit_tokens={summary.prefix_hit_tokens}"
    )
