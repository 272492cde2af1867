"""`flexemr bench`: run systems side by side on one model and workload, and write a report.

Per system, one start: LoadGen Offline measures peak throughput and what it costs (bytes on the
wire, CPU seconds per process, cache hit rate); then a bisection over LoadGen Server runs (Poisson
arrivals, MLPerf DLRM-v2 query sizes) finds the highest QPS whose p99 stays under the target.
Every run is judged by LoadGen itself (its summary's "Result is : VALID"); a Server run counts
towards the peak only when VALID, which includes LoadGen's early-stopping test that enough queries
were answered for the p99 to be under the target with confidence.
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
)
from flexemr.bench.systems import SYSTEMS, ApiProtocol, ServedSystem, cache_hit_rate, wire_bytes
from flexemr.config.model import ModelSource
from flexemr.entrypoints.deployment import cpu_seconds
from flexemr.model.source import load_weights, model_spec
from flexemr.model.spec import DEFAULT_ZIPF_SKEW
from flexemr.model.weights import build_monolithic
from flexemr.sharding.plan import ShardingConfig
from flexemr.workload import data_dir
from flexemr.workload.query_sizes import QuerySizes
from flexemr.workload.synthetic import SyntheticConfig, SyntheticWorkload

BASELINES = ("monolithic", "served-monolithic", "naive")
"""Systems every other one is compared with, where they ran."""


@dataclass(frozen=True)
class Suite:
    name: str
    systems: tuple[str, ...]
    offline_s: float
    """LoadGen's minimum duration of an Offline run."""
    server_queries: int
    """LoadGen's minimum query count of a Server run. Its early-stopping test (is the p99 under the
    target with 99% confidence?) needs about 460 queries with none over the target and allows none
    over it below ~670: a run of 600 is VALID only if its slowest query is. With 1,500 it allows 6
    (0.4%), so a VALID run is judged on about its p99.6, not on its single slowest query."""
    server_min_s: float
    """LoadGen's minimum duration of a Server run."""
    server_max_s: float
    """A Server run is cut after this (and is INVALID if it had too few queries by then): bounds
    the time a low load takes to reach `server_queries`."""
    search_runs: int
    """Server runs per system in the bisection for the peak QPS."""
    preset: str
    """The model when `flexemr bench` is not given one."""
    row_scale: float
    give_up_over: float | None = None
    """Walk a system's peak search down to the long low-load runs only when its first Server run's
    p99 is within this many times the target; farther over, the peak is 0 (`find_peak_server_qps`).
    None: always walk down. Above a VALID load the search bisects either way."""


SUITES = {
    # rmc1's small MLPs score a 100-700 pair query in milliseconds: the p99 target is reachable at
    # loads where 600 queries take seconds, not minutes.
    "quick": Suite("quick", ("monolithic", "served-monolithic", "naive", "flexemr"), offline_s=5.0,
                   server_queries=1500, server_min_s=2.0, server_max_s=90.0, search_runs=5,
                   preset="rmc1", row_scale=0.01, give_up_over=2.0),
    "full": Suite("full", tuple(SYSTEMS), offline_s=10.0, server_queries=1500, server_min_s=5.0,
                  server_max_s=180.0, search_runs=5, preset="dlrm-v2", row_scale=0.001),
}  # fmt: skip


SERVED_CLIENT_THREADS = 8
"""Server runs: requests the load generator keeps in flight. LoadGen counts a query's wait for a
free client thread as the system's latency: with 4 threads, Poisson arrivals at 80 QPS of ~20 ms
queries find all 4 busy ~9% of the time (Erlang C: nine times the p99's budget); with 8, ~0.03%.
No more than 8: the ranker's latency-sized admission may shrink to 8 requests in flight when the
machine stalls, and a generator with 32 threads then had hundreds of its queries refused (429) at
a quarter of the capacity. The in-process model runs one forward at a time whatever the threads."""


@dataclass(frozen=True)
class BenchConfig:
    preset: str = SUITES["full"].preset
    row_scale: float = SUITES["full"].row_scale
    embedding_servers: int = ShardingConfig.embedding_servers
    sharding: str = ShardingConfig.strategy
    alpha: float = DEFAULT_ZIPF_SKEW
    """Zipf exponent of the synthetic workload."""
    batch_size: int = 256
    """Offline: pairs per request."""
    p99_target_ms: float = 60.0
    protocol: ApiProtocol = "http"
    """How the load generator reaches the served systems."""
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
    server_runs: list[LoadGenResult] = field(default_factory=list)
    """The bisection's Server runs, by offered load."""
    peak_qps: float = 0.0
    """The highest offered load whose Server run was VALID with p99 under the target (0: none)."""

    @property
    def peak_run(self) -> LoadGenResult | None:
        return next((r for r in self.server_runs if r.meets_target and r.target_qps == self.peak_qps), None)


@contextmanager
def _started(name: str, config: BenchConfig, monolithic: TorchBackend) -> Iterator[Backend]:
    if name == "monolithic":
        yield monolithic
        return
    with ServedSystem(SYSTEMS[name], config.model_flags(), config.protocol) as served:
        yield served


def run_suite(
    suite: Suite, config: BenchConfig, step: Callable[[str], None] = lambda _: None
) -> list[SystemResult]:
    source = ModelSource(preset=config.preset, row_scale=config.row_scale, seed=config.seed)
    spec = model_spec(source)
    monolithic = TorchBackend(build_monolithic(load_weights(source)))
    workload = SyntheticWorkload(spec, SyntheticConfig(alpha=config.alpha), seed=config.seed)
    request = workload.generate(8192)
    offline_pool = SamplePool.build(request, 8192, seed=config.seed)
    sizes = QuerySizes.load(data_dir() / "mlperf_dlrm_v2_dist_quantile.txt")
    server_pool = SamplePool.build(request, 1024, sizes=sizes, seed=config.seed)
    settings = RunSettings(
        min_duration_s=suite.offline_s, batch_size=config.batch_size, p99_target_ms=config.p99_target_ms
    )
    server_settings = dataclasses.replace(
        settings,
        workers=SERVED_CLIENT_THREADS,
        min_duration_s=suite.server_min_s,
        min_query_count=suite.server_queries,
        max_duration_s=suite.server_max_s,
    )
    results = []
    for name in suite.systems:
        step(name)
        with _started(name, config, monolithic) as backend:
            result = _offline(name, backend, offline_pool, settings)
            own_qps = max(result.offline.pairs_per_s / sizes.mean, 1.0)
            if own_qps >= finishing_qps(suite):  # else every Server run would be cut, INVALID
                search = find_peak_server_qps(
                    backend, server_pool, lowest_qps(suite, own_qps), own_qps, server_settings,
                    max_runs=suite.search_runs, give_up_over=suite.give_up_over,
                )  # fmt: skip
                result.server_runs = sorted(search.runs, key=lambda r: r.target_qps or 0.0)
                result.peak_qps = search.best_qps
        results.append(result)
    return results


def finishing_qps(suite: Suite) -> float:
    """The lowest load whose Server run reaches the suite's minimum query count before it is cut
    (with 20% to spare): a run below it is INVALID whatever its latencies."""
    return 1.2 * suite.server_queries / suite.server_max_s


def lowest_qps(suite: Suite, own_qps: float) -> float:
    """The lowest load the peak search tries: own/16, but no lower than `finishing_qps` (the report
    then says no load in range met the target). A system whose own Offline rate is below that gets
    no Server run at all."""
    return min(max(own_qps / 16, finishing_qps(suite)), own_qps / 2)


def _offline(name: str, backend: Backend, pool: SamplePool, settings: RunSettings) -> SystemResult:
    """A valid Offline run: LoadGen issues `offline_expected_qps` x its minimum duration samples at
    once, so a run that finishes early is INVALID (too short); it is run again, expecting what it
    measured."""
    warm = pool.request.slice(0, settings.batch_size)
    backend.infer(warm)  # the first call pays for connections and lazy set-up
    start = time.perf_counter()
    for _ in range(3):
        backend.infer(warm)
    estimate = 3 * settings.batch_size / (time.perf_counter() - start)
    settings = dataclasses.replace(settings, offline_expected_qps=max(2 * estimate, 10.0))
    result = _measured_offline(name, backend, pool, settings)
    for _ in range(2):
        if "too short" not in result.offline.invalid_reasons:
            break
        expected = max(2 * result.offline.pairs_per_s, 2 * settings.offline_expected_qps)
        settings = dataclasses.replace(settings, offline_expected_qps=expected)
        result = _measured_offline(name, backend, pool, settings)
    return result


def _measured_offline(name: str, backend: Backend, pool: SamplePool, settings: RunSettings) -> SystemResult:
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


def ratios(results: list[SystemResult]) -> dict[str, dict[str, tuple[float | None, float | None]]]:
    """Per system and baseline that ran: (Offline throughput ratio, peak Server QPS ratio); None
    where the baseline's figure is zero."""
    by_name = {r.name: r for r in results}
    table: dict[str, dict[str, tuple[float | None, float | None]]] = {}
    for r in results:
        table[r.name] = {}
        for base in BASELINES:
            b = by_name.get(base)
            if b is None:
                continue
            offline = r.offline.pairs_per_s / b.offline.pairs_per_s if b.offline.pairs_per_s else None
            peak = r.peak_qps / b.peak_qps if b.peak_qps else None
            table[r.name][base] = (offline, peak)
    return table
