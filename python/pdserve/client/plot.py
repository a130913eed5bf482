"""`pdserve plot RESULTS... -o DIR`: pictures of `pdserve bench` result files (PNG, Agg backend).

- `latency_cdf.png`: CDFs of TTFT, TPOT and E2E, one curve per result file.
- `latency_vs_rate.png`: mean (solid) and p99 (dashed) TTFT, TPOT and E2E, plus request throughput
  and goodput, against the request rate: one curve per series (the files' `--label`, else "default")
  that has results at two or more finite rates.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np

from pdserve.client.results import BenchResult, load_result_json

_METRICS = (("ttft", "TTFT"), ("tpot", "TPOT"), ("e2e", "E2E"))


def _samples_ms(result: BenchResult, metric: str) -> list[float]:
    values = []
    for record in result.records:
        if not record.ok:
            continue
        value = {"ttft": record.ttft_s, "tpot": record.tpot_s, "e2e": record.e2e_s}[metric]
        if value is not None:
            values.append(value * 1000.0)
    return values


def _names(paths: list[Path], results: list[BenchResult]) -> list[str]:
    """Curve names: label + rate when that is unique, else the file name."""
    names = []
    for result in results:
        rate = result.config.request_rate
        rate_text = "inf" if math.isinf(rate) else f"{rate:g}"
        names.append(f"{result.config.label or 'default'} @ {rate_text} req/s")
    if len(set(names)) < len(names):
        return [p.stem for p in paths]
    return names


def plot_cdfs(paths: list[Path], results: list[BenchResult], out_dir: Path) -> Path:
    """Writes latency_cdf.png (one panel per metric, one curve per file) and returns its path."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    for ax, (metric, title) in zip(axes, _METRICS, strict=True):
        all_values: list[float] = []
        for name, result in zip(_names(paths, results), results, strict=True):
            values = np.sort(np.asarray(_samples_ms(result, metric)))
            if values.size == 0:
                continue
            all_values.extend(values.tolist())
            fraction = np.arange(1, values.size + 1) / values.size
            ax.step(values, fraction, where="post", label=name)
        ax.set_title(f"{title} CDF")
        ax.set_xlabel(f"{title} (ms)")
        ax.set_ylabel("fraction of requests")
        ax.set_ylim(0, 1.02)
        ax.grid(True, alpha=0.3)
        positive = [v for v in all_values if v > 0]
        if positive and max(positive) / min(positive) > 100:
            ax.set_xscale("log")
        if not all_values:
            ax.text(0.5, 0.5, "no samples", ha="center", va="center", transform=ax.transAxes)
    handles, labels = axes[0].get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="lower center", ncol=min(4, len(labels)), fontsize="small")
    fig.tight_layout(rect=(0, 0.08 if handles else 0, 1, 1))
    path = out_dir / "latency_cdf.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def rate_series(results: list[BenchResult]) -> dict[str, list[BenchResult]]:
    """Results grouped by label, sorted by rate, keeping only finite rates and only groups with
    at least two distinct rates (the ones a latency-vs-rate curve can be drawn for)."""
    groups: dict[str, list[BenchResult]] = defaultdict(list)
    for result in results:
        if not math.isinf(result.config.request_rate):
            groups[result.config.label or "default"].append(result)
    series = {}
    for label, members in groups.items():
        members.sort(key=lambda r: r.config.request_rate)
        if len({r.config.request_rate for r in members}) >= 2:
            series[label] = members
    return series


def plot_rate_curves(series: dict[str, list[BenchResult]], out_dir: Path) -> Path:
    """Writes latency_vs_rate.png and returns its path."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(12, 8.5))
    panels = [
        (axes[0][0], "ttft_ms", "TTFT"),
        (axes[0][1], "tpot_ms", "TPOT"),
        (axes[1][0], "e2e_ms", "E2E"),
    ]
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for index, (label, members) in enumerate(sorted(series.items())):
        color = colors[index % len(colors)]
        rates = [r.config.request_rate for r in members]
        for ax, key, _ in panels:
            stats = [getattr(r.summary, key) for r in members]
            means = [np.nan if s.mean is None else s.mean for s in stats]
            p99s = [np.nan if s.p99 is None else s.p99 for s in stats]
            ax.plot(rates, means, "o-", color=color, label=f"{label} mean")
            ax.plot(rates, p99s, "s--", color=color, label=f"{label} p99")
        ax = axes[1][1]
        ax.plot(
            rates,
            [r.summary.request_throughput for r in members],
            "o-",
            color=color,
            label=f"{label} throughput",
        )
        goodput = [np.nan if r.summary.goodput is None else r.summary.goodput for r in members]
        if not all(math.isnan(g) for g in goodput):
            ax.plot(rates, goodput, "^:", color=color, label=f"{label} goodput")
    for ax, _, title in panels:
        ax.set_title(f"{title} vs request rate")
        ax.set_ylabel(f"{title} (ms)")
    axes[1][1].set_title("throughput and goodput vs request rate")
    axes[1][1].set_ylabel("requests / s")
    for ax in axes.flat:
        ax.set_xlabel("request rate (req/s)")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize="small")
    fig.tight_layout()
    path = out_dir / "latency_vs_rate.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_results(paths: list[Path], out_dir: Path) -> list[Path]:
    """Reads result files and writes the PNGs into `out_dir` (created); returns their paths.
    Raises `ValueError` naming a file that is not a result file."""
    import matplotlib

    matplotlib.use("Agg")
    results = []
    for path in paths:
        try:
            results.append(load_result_json(path))
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"{path}: cannot read as a pdserve bench result ({exc})") from exc
    out_dir.mkdir(parents=True, exist_ok=True)
    written = [plot_cdfs(paths, results, out_dir)]
    series = rate_series(results)
    if series:
        written.append(plot_rate_curves(series, out_dir))
    return written


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Adds the `pdserve plot` arguments."""
    parser.add_argument(
        "results", nargs="+", type=Path, metavar="RESULTS", help="bench result JSON files"
    )
    parser.add_argument(
        "-o", "--out-dir", type=Path, required=True, metavar="DIR", help="folder for the PNGs"
    )


def run(args: argparse.Namespace) -> int:
    """Runs `pdserve plot`; returns 0, or 1 when a file cannot be read."""
    try:
        written = plot_results(list(args.results), args.out_dir)
    except ValueError as exc:
        print(f"pdserve plot: {exc}", file=sys.stderr)
        return 1
    for path in written:
        print(f"wrote {path}")
    if len(written) == 1 and len(args.results) > 1:
        print("no latency-vs-rate plot: no label has results at two or more finite request rates")
    return 0
