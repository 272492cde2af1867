"""The report folder of a benchmark run: a markdown table, matplotlib plots, raw JSON."""

from __future__ import annotations

import dataclasses
import json
import platform
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from flexemr.bench.suite import BASELINES, BenchConfig, Suite, SystemResult, ratios
from flexemr.extras import needs_extra

with needs_extra("bench"):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt


def machine() -> str:
    import os

    return f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"


def _fmt(value: float | None, spec: str = ",.0f") -> str:
    return "-" if value is None else format(value, spec)


def _ratio(value: float | None, valid: bool) -> str:
    return "-" if value is None else f"{value:.2f}" + ("" if valid else " (INVALID)")


def markdown(results: list[SystemResult], suite: Suite, config: BenchConfig) -> str:
    table = ratios(results)
    bases = [b for b in BASELINES if any(r.name == b for r in results)]
    valid = {r.name: r.offline.loadgen_valid is True for r in results}
    target = config.p99_target_ms
    lines = [
        f"# flexemr bench: {suite.name} suite",
        "",
        f"{datetime.now(UTC):%Y-%m-%d %H:%M} UTC on {machine()}. "
        f"Model `{config.preset}` x{config.row_scale}, "
        f"{config.embedding_servers} embedding servers (`--sharding {config.sharding}`), "
        f"Zipf alpha {config.alpha}; served systems reached over {config.protocol}.",
        "",
        f"LoadGen judges every run (its own `Result is : VALID/INVALID`, in each run's log folder). "
        f"Offline: at least {suite.offline_s:g} s, requests of {config.batch_size} pairs. Server: Poisson "
        f"queries of 100-700 pairs (MLPerf DLRM-v2's sizes), at least {suite.server_queries} queries "
        f"and {suite.server_min_s:g} s, cut at {suite.server_max_s:g} s; VALID needs p99 <= {target:g} ms "
        "and LoadGen's early-stopping test. These minimums are scaled down from an MLPerf submission's "
        "(600 s, 270,336 queries). A ratio from an INVALID run is marked so; quote only VALID ones.",
        "",
        "## Throughput (LoadGen Offline)",
        "",
        "| system | reached | pairs/s | pairs | s | LoadGen | "
        + " | ".join(f"x {b}" for b in bases)
        + " | bytes/pair | cache hits | CPU s / 1k pairs (per process) |",
        "|---|---|---:|---:|---:|---|" + "---:|" * len(bases) + "---:|---:|---|",
    ]
    for r in results:
        o = r.offline
        cells = [_ratio(table[r.name][b][0], valid[r.name] and valid[b]) for b in bases]
        cpu = ", ".join(f"{k} {v:.2f}" for k, v in r.cpu_s_per_1k.items()) or "-"
        lines.append(
            f"| {r.name} | {r.transport} | {o.pairs_per_s:,.0f} | {o.pairs:,} | {o.duration_s:.1f} "
            f"| {o.verdict} | " + " | ".join(cells) + f" | {_fmt(r.bytes_per_sample)} "
            f"| {_fmt(r.cache_hit_rate, '.1%')} | {cpu} |"
        )
    lines += [
        "",
        f"## Peak Server QPS with p99 <= {target:g} ms (bisection over VALID LoadGen Server runs)",
        "",
        "| system | peak QPS | "
        + " | ".join(f"x {b}" for b in bases)
        + " | queries | s | p50 ms | p99 ms | p99.9 ms |",
        "|---|---:|" + "---:|" * len(bases) + "---:|---:|---:|---:|---:|",
    ]
    for r in results:
        peak = r.peak_run
        cells = [_fmt(table[r.name][b][1], ".2f") for b in bases]
        at = "- | - | - | - | -"
        if peak:
            at = f"{peak.queries:,} | {peak.duration_s:.1f} | {peak.p50_ms:.1f} | {peak.p99_ms:.1f} "
            at += f"| {peak.p999_ms:.1f}"
        lines.append(f"| {r.name} | {r.peak_qps:.1f} | " + " | ".join(cells) + f" | {at} |")
    lines += [
        "",
        "A peak of 0 means no Server run in the search was VALID under the target; a system with no "
        f"Server run at all could not reach {suite.server_queries} queries in {suite.server_max_s:g} s "
        "even at its Offline rate."
        + (
            " This suite's search does not walk down below a first run with the p99 over "
            f"{suite.give_up_over:g}x the target (the peak is then 0); above a VALID load it bisects as "
            "the full suite's does."
            if suite.give_up_over is not None
            else ""
        ),
        "",
        "## Every LoadGen run",
        "",
        "| system | scenario | offered QPS | queries | pairs | s | p50 ms | p99 ms | errors | LoadGen |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in results:
        for run in [r.offline, *r.server_runs]:
            offered = "-" if run.target_qps is None else f"{run.target_qps:.1f}"
            lines.append(
                f"| {r.name} | {run.scenario} | {offered} | {run.queries:,} | {run.pairs:,} "
                f"| {run.duration_s:.1f} | {run.p50_ms:.1f} | {run.p99_ms:.1f} | {run.errors} "
                f"| {run.verdict} |"
            )
    lines += ["", "Systems:", ""] + [f"- **{r.name}** ({r.transport}): {r.description}" for r in results]
    return "\n".join(lines) + "\n"


def plots(results: list[SystemResult], out: Path, p99_target_ms: float) -> list[Path]:
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
        if r.server_runs:
            offered = [c.target_qps or 0.0 for c in r.server_runs]
            line = ax.plot(offered, [c.p99_ms for c in r.server_runs], marker="o", label=f"{r.name} p99")
            valid = [c for c in r.server_runs if c.loadgen_valid]
            ax.scatter([c.target_qps or 0.0 for c in valid], [c.p99_ms for c in valid], s=80,
                       facecolors="none", edgecolors=line[0].get_color())  # fmt: skip
    ax.axhline(p99_target_ms, color="grey", ls=":", label="p99 target")
    ax.set_xlabel("offered load (queries/s, Poisson; ringed: LoadGen VALID)")
    ax.set_ylabel("p99 latency (ms)")
    ax.set_yscale("log")
    ax.set_title("Server runs of the peak-QPS search")
    ax.legend(fontsize=7)
    fig.tight_layout()
    paths.append(out / "latency_vs_qps.png")
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)

    served = [r for r in results if r.bytes_per_sample]
    if served:
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
    plots(results, out, config.p99_target_ms)
    raw: dict[str, Any] = {
        "suite": dataclasses.asdict(suite),
        "config": dataclasses.asdict(config),
        "machine": machine(),
        "results": [dataclasses.asdict(r) for r in results],
    }
    (out / "results.json").write_text(json.dumps(raw, indent=2, default=str))
    return report
