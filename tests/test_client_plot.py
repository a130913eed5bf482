"""`pdserve plot` writes readable PNGs from result files (CDFs always, rate curves for sweeps)."""

from __future__ import annotations

import math
import random

import pytest
from pdserve.cli import main
from pdserve.client.metrics import RequestRecord, summarize
from pdserve.client.results import BenchConfig, BenchResult, write_result_json


def _result(rate: float, label: str, seed: int) -> BenchResult:
    rng = random.Random(seed)
    records = []
    for i in range(40):
        ttft = rng.uniform(0.02, 0.2) * (1 + min(rate, 10.0) / 10)
        tokens = rng.randint(2, 30)
        e2e = ttft + tokens * rng.uniform(0.01, 0.03)
        records.append(
            RequestRecord(
                request_id=i,
                conversation_id=i,
                turn_index=0,
                scheduled_offset_s=0.0,
                ok=True,
                ttft_s=ttft,
                e2e_s=e2e,
                completion_tokens=tokens,
            )
        )
    records.append(
        RequestRecord(
            request_id=40,
            conversation_id=40,
            turn_index=0,
            scheduled_offset_s=0,
            error="boom",
            http_status=500,
        )
    )
    summary = summarize(records, 40 / rate if not math.isinf(rate) else 1.0, slo_ttft_ms=150)
    return BenchResult(BenchConfig(request_rate=rate, label=label), "m", "t", records, summary)


def _is_png(path) -> bool:
    return path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 10_000


def test_plot_writes_cdfs_and_rate_curves(tmp_path, capsys) -> None:
    files = []
    for label in ("colocated", "disagg"):
        for rate in (1.0, 2.0, 4.0):
            path = tmp_path / f"{label}_{rate}.json"
            write_result_json(_result(rate, label, seed=int(rate)), path)
            files.append(str(path))
    out = tmp_path / "plots"
    assert main(["plot", *files, "-o", str(out)]) == 0
    assert _is_png(out / "latency_cdf.png") and _is_png(out / "latency_vs_rate.png")
    assert "latency_vs_rate.png" in capsys.readouterr().out


def test_plot_single_file_has_only_cdfs_and_bad_file_is_named(tmp_path, capsys) -> None:
    path = tmp_path / "one.json"
    write_result_json(_result(math.inf, "", seed=0), path)
    assert main(["plot", str(path), "-o", str(tmp_path / "p")]) == 0
    assert _is_png(tmp_path / "p" / "latency_cdf.png")
    assert not (tmp_path / "p" / "latency_vs_rate.png").exists()
    bad = tmp_path / "bad.json"
    bad.write_text("{}")
    assert main(["plot", str(bad), "-o", str(tmp_path / "q")]) == 1
    assert "bad.json" in capsys.readouterr().err


def test_plot_requires_out_dir(capsys) -> None:
    with pytest.raises(SystemExit):
        main(["plot", "x.json"])
    assert "-o/--out-dir" in capsys.readouterr().err
