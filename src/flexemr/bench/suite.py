"""`flexemr bench`: run systems side by side on one model and workload, and write a report.

Phase 1 measures each system's peak throughput (LoadGen Offline) and what it costs (bytes on the
wire, CPU seconds per process, cache hit rate). Phase 2 offers every system the same Poisson load
(LoadGen Server, half the slowest system's peak) for comparable latencies, traces latency against
offered load, and searches the highest QPS whose p99 stays under the target.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from flexemr.bench.loadgen_sut import (
    Backend,
    LoadGenResult,
    RunSettings,
    SamplePool,
    TorchBackend,
    find_peak_server_qps,
    run_offline,
    run_server,
)
from flexemr.bench.systems import SYSTEMS, ServedSystem, cache_hit_rate, wire_bytes
from flexemr.cluster.deployment import cpu_seconds
from flexemr.config import ModelSource
from flexemr.model.weights import build_monolithic
from flexemr.workload import data_dir
from flexemr.workload.query_sizes import QuerySizes
from flexemr.workload.synthetic import DEFAULT_ALPHA, SyntheticConfig, SyntheticWorkload


@dataclass(frozen=True)
class Suite:
    name: str
    systems: tuple[str, ...]
    offline_s: float
    server_s: float
    curve_fractions: tuple[float, ...]
    """Offered loads for the latency curve, as fractions of each system's own peak."""
    curve_systems: tuple[str, ...]
    search_systems: tuple[str, ...]
    search_runs: int
    min_queries: int
    """Server runs last until `server_s` has passed and this many queries were answered."""


SUITES = {
    "quick": Suite("quick", ("monolithic", "naive", "flexemr", "redis"), 3.0, 2.5, (0.5, 0.9),
                   ("monolithic", "flexemr"), ("flexemr",), 2, 4),
    "full": Suite("full", tuple(SYSTEMS), 8.0, 4.0, (0.25, 0.5, 0.75, 1.0), tuple(SYSTEMS),
                  tuple(SYSTEMS), 4, 10),
}  # fmt: skip


@dataclass(frozen=True)
class BenchConfig:
    preset: str = "rmc2"
    row_scale: float = 0.02
    embedding_servers: int = 2
    sharding: str = "auto"
    alpha: float = DEFAULT_ALPHA
    """Zipf exponent of the synthetic workload."""
    batch_size: int = 256
    """Offline: pairs per request."""
    p99_target_ms: float = 60.0
    seed: int = 0

    def model_flags(self) -> tuple[str, ...]:
        return ("--preset", self.preset, "--row-scale", str(self.row_scale), "--seed", str(self.seed),
                "--embedding-servers", str(self.embedding_servers), "--sharding", self.sharding)  # fmt: skip


@dataclass
class SystemResult:
    name: str
    description: str
    transport: str
    offline: LoadGenResult
    bytes_per_sample: float | None = None
    cache_hit_rate: float | None = None
    cpu_s_per_1k: dict[str, float] = field(default_factory=dict)
    common_load: LoadGenResult | None = None
    curve: list[LoadGenResult] = field(default_factory=list)
    peak_qps: float | None = None


@contextmanager
def _started(name: str, config: BenchConfig, monolithic: TorchBackend) -> Iterator[Backend]:
    if name == "monolithic":
        yield monolithic
        return
    with ServedSystem(SYSTEMS[name], config.model_flags()) as served:
        yield served  # type: ignore[misc]


def run_suite(
    suite: Suite, config: BenchConfig, step: Callable[[str], None] = lambda _: None
) -> list[SystemResult]:
    source = ModelSource(preset=config.preset, row_scale=config.row_scale, seed=config.seed)
    spec = source.spec()
    monolithic = TorchBackend(build_monolithic(source.load()))
    workload = SyntheticWorkload(spec, SyntheticConfig(alpha=config.alpha), seed=config.seed)
    request = workload.generate(8192)
    offline_pool = SamplePool.build(request, 8192, seed=config.seed)
    sizes = QuerySizes.load(data_dir() / "mlperf_dlrm_v2_dist_quantile.txt")
    server_pool = SamplePool.build(request, 1024, sizes=sizes, seed=config.seed)
    settings = RunSettings(
        min_duration_s=suite.offline_s, batch_size=config.batch_size, p99_target_ms=config.p99_target_ms
    )

    results: dict[str, SystemResult] = {}
    for name in suite.systems:
        step(f"{name}: offline")
        with _started(name, config, monolithic) as backend:
            results[name] = _offline(name, backend, offline_pool, settings)

    # Phase 2: the same offered load for everyone, then each system's own latency curve and peak.
    slowest_qps = min(r.offline.pairs_per_s for r in results.values()) / sizes.mean
    common_qps = max(slowest_qps * 0.5, 0.5)
    server_settings = dataclasses.replace(
        settings, min_duration_s=suite.server_s, min_query_count=suite.min_queries
    )
    for name in suite.systems:
        step(f"{name}: server")
        result = results[name]
        own_qps = result.offline.pairs_per_s / sizes.mean
        with _started(name, config, monolithic) as backend:
            result.common_load = run_server(backend, server_pool, common_qps, server_settings)[0]
            if name in suite.curve_systems:
                result.curve = [
                    run_server(backend, server_pool, max(own_qps * f, 0.5), server_settings)[0]
                    for f in suite.curve_fractions
                ]
            if name in suite.search_systems:
                search = find_peak_server_qps(
                    backend, server_pool, max(own_qps * 0.1, 0.25), max(own_qps * 1.2, 1.0),
                    server_settings, max_runs=suite.search_runs, known=[result.common_load, *result.curve],
                )  # fmt: skip
                result.peak_qps = search.best_qps
    return list(results.values())


def _offline(name: str, backend: Backend, pool: SamplePool, settings: RunSettings) -> SystemResult:
    warm = pool.request.slice(0, settings.batch_size)
    backend.infer(warm)  # the first call pays for connections and lazy set-up
    start = time.perf_counter()
    backend.infer(warm)
    estimate = settings.batch_size / (time.perf_counter() - start)
    settings = dataclasses.replace(settings, offline_expected_qps=max(estimate, 10.0))
    served = backend if isinstance(backend, ServedSystem) else None
    pids: dict[str, int] = served.pids() if served else {}
    cpu_before = {role: cpu_seconds(pid) for role, pid in pids.items()}
    before: dict[str, Any] = served.stats() if served else {}
    offline = run_offline(backend, pool, settings)[0]
    result = SystemResult(name, SYSTEMS[name].description, backend.transport, offline)
    if served is not None:
        stats = served.stats()
        pairs = max(stats["samples"] - before["samples"], 1)  # pairs the ranker actually scored
        wire_before = wire_bytes(before)
        result.bytes_per_sample = (wire_bytes(stats) - wire_before) / pairs
        result.cache_hit_rate = cache_hit_rate(stats)
        result.cpu_s_per_1k = {
            role: (cpu_seconds(pid) - cpu_before[role]) * 1000 / pairs for role, pid in pids.items()
        }
    return result


def summary_ratios(results: list[SystemResult]) -> dict[str, dict[str, float]]:
    """Throughput of each system relative to monolithic and to naive (where they ran)."""
    by_name = {r.name: r.offline.pairs_per_s for r in results}
    return {
        r.name: {
            base: r.offline.pairs_per_s / by_name[base]
            for base in ("monolithic", "naive")
            if by_name.get(base)
        }
        for r in results
    }
