"""The report folder of a benchmark run: a markdown table, matplotlib plots, raw JSON."""

from __future__ import annotations

import dataclasses
import json
import platform
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from flexemr.bench.suite import BenchConfig, Suite, SystemResult, summary_ratios


def machine() -> str:
    import os

    return f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"


def _fmt(value: float | None, spec: str = ",.0f") -> str:
    return "-" if value is None else format(value, spec)


def markdown(results: list[SystemResult], suite: Suite, config: BenchConfig) -> str:
    ratios = summary_ratios(results)
    common = next((r.common_load for r in results if r.common_load), None)
    lines = [
        f"# flexemr bench: {suite.name} suite",
        "",
        f"{datetime.now(UTC):%Y-%m-%d %H:%M} UTC on {machine()}. "
        f"Model `{config.preset}` x{config.row_scale}, "
        f"{config.embedding_servers} embedding servers (`--sharding {config.sharding}`), "
        f"Zipf alpha {config.alpha}, Offline batches of {config.batch_size} pairs.",
        "",
        "Throughput is LoadGen Offline (pairs/s). Latency is LoadGen Server (Poisson queries of "
        "100-700 pairs)"
        + (f" at one offered load for all, {common.target_qps:.1f} queries/s." if common else "."),
        f" Peak QPS is the highest Server load whose p99 stayed under {config.p99_target_ms:.0f} ms.",
        "",
        "| system | reached | pairs/s | x mono | x naive | p50 ms | p99 ms | p99.9 ms | bytes/pair "
        "| cache hits | CPU s / 1k pairs (per process) | peak QPS |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|",
    ]
    for r in results:
        lat = r.common_load
        p50, p99, p999 = (lat.p50_ms, lat.p99_ms, lat.p999_ms) if lat else (None, None, None)
        mono, naive = ratios[r.name].get("monolithic"), ratios[r.name].get("naive")
        cpu = ", ".join(f"{k} {v:.2f}" for k, v in r.cpu_s_per_1k.items()) or "-"
        lines.append(
            f"| {r.name} | {r.transport} | {r.offline.pairs_per_s:,.0f} | {_fmt(mono, '.2f')} "
            f"| {_fmt(naive, '.2f')} | {_fmt(p50, '.1f')} | {_fmt(p99, '.1f')} | {_fmt(p999, '.1f')} "
            f"| {_fmt(r.bytes_per_sample)} | {_fmt(r.cache_hit_rate, '.1%')} | {cpu} "
            f"| {_fmt(r.peak_qps, '.1f')} |"
        )
    lines += ["", "Systems:", ""] + [f"- **{r.name}**: {r.description}" for r in results]
    errors = {r.name: r.offline.errors for r in results if r.offline.errors}
    if errors:
        lines += ["", f"Requests that failed (counted, not scored): {errors}"]
    return "\n".join(lines) + "\n"


def plots(results: list[SystemResult], out: Path) -> list[Path]:
    names = [r.name for r in results]
    paths = []

    fig, ax = plt.subplots(figsize=(8, 4))
    ax.bar(names, [r.offline.pairs_per_s for r in results], color="tab:blue")
    ax.set_ylabel("pairs/s (LoadGen Offline)")
    ax.set_title("Throughput per system")
    ax.tick_params(axis="x", rotation=30)
    fig.tight_layout()
    paths.append(out / "throughput.png")
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4))
    for r in results:
        if r.curve:
            offered = [c.target_qps or 0.0 for c in r.curve]
            ax.plot(
                offered,
                [c.p99_ms for c in r.curve],
                marker="o",
                label=f"{r.name} p99",
            )
            ax.plot(offered, [c.p50_ms for c in r.curve], ls="--", alpha=0.6,
                    label=f"{r.name} p50")  # fmt: skip
    ax.set_xlabel("offered load (queries/s, Poisson)")
    ax.set_ylabel("latency (ms)")
    ax.set_yscale("log")
    ax.set_title("Latency against offered load")
    ax.legend(fontsize=7)
    fig.tight_layout()
    paths.append(out / "latency_vs_qps.png")
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)

    served = [r for r in results if r.bytes_per_sample is not None]
    fig, ax = plt.subplots(figsize=(8, 4))
    ax.bar([r.name for r in served], [r.bytes_per_sample or 0 for r in served], color="tab:orange")
    ax.set_yscale("log")
    ax.set_ylabel("bytes on the wire per pair")
    ax.set_title("Ranker <-> embedding tier traffic")
    ax.tick_params(axis="x", rotation=30)
    fig.tight_layout()
    paths.append(out / "bytes_per_sample.png")
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)
    return paths


def write(results: list[SystemResult], suite: Suite, config: BenchConfig, out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    report = out / "report.md"
    report.write_text(markdown(results, suite, config))
    plots(results, out)
    raw: dict[str, Any] = {
        "suite": dataclasses.asdict(suite),
        "config": dataclasses.asdict(config),
        "machine": machine(),
        "results": [dataclasses.asdict(r) for r in results],
    }
    (out / "results.json").write_text(json.dumps(raw, indent=2, default=str))
    return report
