"""Metric math on known timings, seeded Poisson arrivals, and the result JSON round trip."""

from __future__ import annotations

import math
import random
import statistics

import pytest
from pdserve.client.metrics import RequestRecord, format_summary_line, summarize
from pdserve.client.results import (
    BenchConfig,
    BenchResult,
    format_table,
    load_result_json,
    write_result_json,
)
from pdserve.client.workloads import poisson_arrival_times


def _record(i: int, ttft_s: float, e2e_s: float, tokens: int, **kw) -> RequestRecord:
    itl = [(e2e_s - ttft_s) / (tokens - 1)] * (tokens - 1) if tokens > 1 else []
    fields = dict(
        ok=True,
        http_status=200,
        ttft_s=ttft_s,
        e2e_s=e2e_s,
        itl_s=itl,
        num_chunks=tokens,
        prompt_tokens=100,
        completion_tokens=tokens,
        cached_tokens=40,
        usage_reported=True,
    )
    fields.update(kw)
    return RequestRecord(
        request_id=i, conversation_id=i, turn_index=0, scheduled_offset_s=0.0, **fields
    )


def test_tpot_from_ttft_e2e_and_tokens() -> None:
    assert _record(0, 0.1, 1.0, 10).tpot_s == pytest.approx(0.1)
    assert _record(0, 0.1, 0.1, 1).tpot_s is None
    assert _record(0, 0.1, 1.0, 10, ok=False).tpot_s is None


def test_summary_numbers_on_known_timings() -> None:
    records = [
        _record(0, 0.1, 1.0, 10),  # tpot 100 ms
        _record(1, 0.2, 2.2, 11),  # tpot 200 ms
        _record(2, 0.3, 0.9, 4),  # tpot 200 ms
        _record(3, 0.4, 3.4, 11),  # tpot 300 ms
        _record(4, None, None, 0, ok=False, http_status=503, error="busy", completion_tokens=None),
    ]
    s = summarize(records, duration_s=4.0, slo_ttft_ms=250, slo_tpot_ms=250)
    assert (s.num_requests, s.num_completed, s.num_failed) == (5, 4, 1)
    assert s.errors == {"503: busy": 1}
    assert s.ttft_ms.mean == pytest.approx(250.0) and s.ttft_ms.p50 == pytest.approx(250.0)
    assert s.ttft_ms.p90 == pytest.approx(370.0) and s.ttft_ms.p99 == pytest.approx(397.0)
    assert s.tpot_ms.mean == pytest.approx(200.0) and s.tpot_ms.p50 == pytest.approx(200.0)
    assert s.e2e_ms.max == pytest.approx(3400.0)
    assert s.itl_ms.count == 9 + 10 + 3 + 10 and s.itl_ms.mean == pytest.approx(
        statistics.mean([100] * 9 + [200] * 13 + [300] * 10)
    )
    assert s.request_throughput == pytest.approx(1.0)
    assert s.total_completion_tokens == 36 and s.output_token_throughput == pytest.approx(9.0)
    assert s.total_prompt_tokens == 400 and s.input_token_throughput == pytest.approx(100.0)
    assert s.num_good == 2 and s.goodput == pytest.approx(0.5)  # requests 0 and 1
    assert s.prefix_hit_tokens == 160 and s.prefix_hit_ratio == pytest.approx(0.4)
    assert "completed=4/5" in format_summary_line(s)


def test_no_slo_means_no_goodput_and_no_samples_means_no_stats() -> None:
    s = summarize([_record(0, None, None, 0, ok=False, error="x")], duration_s=1.0)
    assert s.goodput is None and s.num_good is None
    assert s.ttft_ms.count == 0 and s.ttft_ms.mean is None
    s = summarize([_record(0, 0.1, 0.2, 2, cached_tokens=None)], duration_s=1.0, slo_ttft_ms=50)
    assert s.goodput == 0.0 and s.prefix_hit_tokens is None


def test_poisson_arrivals_are_seeded_and_have_the_rate() -> None:
    a = poisson_arrival_times(2000, 8.0, random.Random(7))
    assert a == poisson_arrival_times(2000, 8.0, random.Random(7))
    assert a != poisson_arrival_times(2000, 8.0, random.Random(8))
    assert a[0] == 0.0 and all(x <= y for x, y in zip(a, a[1:], strict=False))
    assert statistics.mean(y - x for x, y in zip(a, a[1:], strict=False)) == pytest.approx(
        1 / 8, rel=0.1
    )
    assert poisson_arrival_times(3, math.inf, random.Random(0)) == [0.0, 0.0, 0.0]
    with pytest.raises(ValueError, match="request rate must be > 0"):
        poisson_arrival_times(3, 0.0, random.Random(0))


def test_result_json_round_trip(tmp_path) -> None:
    records = [
        _record(0, 0.1, 1.0, 10),
        _record(1, None, None, 0, ok=False, http_status=400, error="bad"),
    ]
    config = BenchConfig(request_rate=math.inf, dataset="sharegpt", multi_turn=True, label="disagg")
    result = BenchResult(
        config=config,
        model="tiny",
        started_at="2026-01-01T00:00:00+00:00",
        records=records,
        summary=summarize(records, 2.0, slo_ttft_ms=500),
        num_turns_skipped=3,
    )
    path = tmp_path / "sub" / "result.json"
    write_result_json(result, path)
    loaded = load_result_json(path)
    assert loaded.config == config and loaded.summary == result.summary
    assert loaded.records[0].itl_s == records[0].itl_s and loaded.records[1].error == "bad"
    assert loaded.num_turns_skipped == 3 and loaded.model == "tiny"
    assert '"request_rate": "inf"' in path.read_text()
    assert "sharegpt multi-turn, rate inf/s" in format_table(loaded)
