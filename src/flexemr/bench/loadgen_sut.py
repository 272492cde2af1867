"""Run a scoring backend under MLPerf LoadGen: Offline (peak throughput) and Server (Poisson arrivals,
p99 latency target), plus a search for the highest Server QPS that meets the target.

Samples, as in MLPerf DLRM-v2: one LoadGen *sample* is one user's query; it carries `pairs` user-item
pairs (the rows the model scores). In Server each query is one LoadGen sample of 100-700 pairs
(MLPerf's quantiles); in Offline every LoadGen sample is usually one pair and the SUT batches them
into requests of `batch_size` pairs. All pairs come from a pre-drawn `SamplePool`:

```
pool.request   [P pairs, drawn once from a workload]
sample i    -> pairs (start[i] + 0 .. sizes[i]-1) mod P
```

LoadGen calls `issue_queries` on its own thread; the SUT only queues work there, and a small thread
pool runs the backend and reports completions, so several queries are in flight at once.
"""

from __future__ import annotations

import math
import tempfile
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np
import torch

from flexemr.batch import SparseBatch
from flexemr.extras import needs_extra
from flexemr.model.dlrm import DLRM
from flexemr.workload.query_sizes import QuerySizes

with needs_extra("bench"):
    import mlperf_loadgen as lg

Transport = Literal["in-process", "http", "grpc"]
DEFAULT_P99_MS = 60.0


class Backend(Protocol):
    """Something that scores requests: the served system over HTTP or gRPC, or an in-process baseline."""

    name: str
    transport: Transport
    """How the benchmark reaches it; reports print it, so in-process baselines say so."""

    def infer(self, request: SparseBatch) -> np.ndarray:
        """Scores, float32 [request.batch_size]."""
        ...


class TorchBackend:
    """A whole DLRM in this process, called directly (the monolithic baseline): one forward at a
    time with every core's threads, as a server's dense model runs, however many queries the
    load generator has in flight (overlapping forwards would split each op over more threads than
    there are cores)."""

    transport: Transport = "in-process"

    def __init__(self, model: DLRM, name: str = "monolithic") -> None:
        self.model = model
        self.name = name
        self._one_at_a_time = threading.Lock()

    def infer(self, request: SparseBatch) -> np.ndarray:
        with self._one_at_a_time, torch.no_grad():
            scores = self.model.forward_sparse(
                torch.from_numpy(request.dense),
                torch.from_numpy(request.indices),
                torch.from_numpy(request.lengths),
            )
        return np.asarray(scores.numpy(), dtype=np.float32)


@dataclass(frozen=True)
class SamplePool:
    """LoadGen's sample library: `len(sizes)` samples, each a run of pairs of one pre-drawn request."""

    request: SparseBatch
    sizes: np.ndarray
    """Pairs per LoadGen sample."""
    starts: np.ndarray
    """First pair of each sample in `request` (wrapping around)."""

    @classmethod
    def build(
        cls, request: SparseBatch, num_samples: int, sizes: QuerySizes | None = None, seed: int = 0
    ) -> SamplePool:
        """`num_samples` samples over `request`'s pairs: one pair each, or sizes from `sizes`."""
        rng = np.random.default_rng(seed)
        counts = sizes.sample(rng, num_samples) if sizes else np.ones(num_samples, dtype=np.int64)
        starts = (np.cumsum(counts) - counts) % request.batch_size
        return cls(request, counts, starts)

    def __len__(self) -> int:
        return len(self.sizes)

    def pairs(self, samples: Sequence[int] | np.ndarray) -> np.ndarray:
        """The pair positions of `samples`, concatenated in order."""
        idx = np.asarray(samples, dtype=np.int64)
        counts = self.sizes[idx]
        within = np.arange(int(counts.sum())) - np.repeat(np.cumsum(counts) - counts, counts)
        pairs: np.ndarray = (np.repeat(self.starts[idx], counts) + within) % self.request.batch_size
        return pairs

    def take(self, samples: Sequence[int] | np.ndarray) -> SparseBatch:
        return self.request.take(self.pairs(samples))


@dataclass(frozen=True)
class RunSettings:
    """One LoadGen run's knobs (the defaults give a short run)."""

    min_duration_s: float = 2.0
    min_query_count: int = 1
    max_duration_s: float = 0.0
    """0 = no cap."""
    batch_size: int = 2048
    """Offline: pairs per backend request."""
    offline_expected_qps: float = 1000.0
    """Offline: LoadGen issues about this many samples per second of `min_duration_s`."""
    p99_target_ms: float = DEFAULT_P99_MS
    workers: int = 4
    """Threads running backend calls, so several queries are in flight."""
    log_dir: Path | None = None
    """Where LoadGen writes its logs; a fresh temporary folder when None."""
    seed: int = 0


@dataclass(frozen=True)
class LoadGenResult:
    backend: str
    transport: Transport
    scenario: Literal["Offline", "Server"]
    target_qps: float | None
    """Server: the Poisson arrival rate asked for."""
    queries: int
    """LoadGen samples answered (in Server, one per query)."""
    pairs: int
    """User-item pairs scored."""
    errors: int
    duration_s: float
    queries_per_s: float
    pairs_per_s: float
    p50_ms: float
    p99_ms: float
    p999_ms: float
    """Per-sample latency as LoadGen measured it (from the query's scheduled time to its completion,
    so a late issue counts) and judged the run by; ours (from the issue call) where its summary has
    none."""
    p99_target_ms: float
    loadgen_valid: bool | None
    """LoadGen's own verdict from its summary ("Result is : VALID"); None if not found."""
    invalid_reasons: tuple[str, ...]
    """Why LoadGen judged the run INVALID: the checks its summary marks unsatisfied."""
    log_dir: Path

    @property
    def verdict(self) -> str:
        if self.loadgen_valid is None:
            return "no verdict"
        return "VALID" if self.loadgen_valid else f"INVALID ({', '.join(self.invalid_reasons) or '?'})"

    @property
    def meets_target(self) -> bool:
        """No errors, p99 under the target, and a run LoadGen judged VALID: in Server that also
        means enough queries for its early-stopping estimate of the p99 to be under the target."""
        return self.errors == 0 and self.p99_ms <= self.p99_target_ms and self.loadgen_valid is True


@dataclass
class _Recorder:
    """What the worker threads write: latencies, pair counts, errors and (optionally) scores."""

    capture: bool
    lock: threading.Lock = field(default_factory=threading.Lock)
    latencies: list[float] = field(default_factory=list)
    pairs: int = 0
    errors: int = 0
    first: float = float("inf")
    last: float = 0.0
    answered: list[int] = field(default_factory=list)
    scores: dict[int, np.ndarray] = field(default_factory=dict)


class LoadGenSUT:
    """The system under test: queues LoadGen's queries and answers them from worker threads."""

    def __init__(
        self, backend: Backend, pool: SamplePool, batch_size: int, workers: int, capture: bool = False
    ) -> None:
        self.backend = backend
        self.pool = pool
        self.batch_size = batch_size
        self.record = _Recorder(capture)
        self._executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="flexemr-sut")

    def issue_queries(self, samples: list[Any]) -> None:
        now = time.perf_counter()
        ids = np.array([s.id for s in samples], dtype=np.uint64)
        indices = np.array([s.index for s in samples], dtype=np.int64)
        # Group consecutive samples until they hold `batch_size` pairs (Server: one query = one group).
        batch_of = np.cumsum(self.pool.sizes[indices]) - 1
        bounds = np.flatnonzero(np.diff(batch_of // self.batch_size)) + 1
        for chunk_ids, chunk_idx in zip(np.split(ids, bounds), np.split(indices, bounds), strict=True):
            self._executor.submit(self._answer, chunk_ids, chunk_idx, now)

    def flush_queries(self) -> None:
        pass

    def close(self) -> None:
        self._executor.shutdown(wait=True)

    def _answer(self, ids: np.ndarray, indices: np.ndarray, issued: float) -> None:
        counts = self.pool.sizes[indices]
        try:
            scores = np.ascontiguousarray(self.backend.infer(self.pool.take(indices)), dtype=np.float32)
            if scores.shape != (int(counts.sum()),):
                raise ValueError(f"backend returned {scores.shape} scores for {int(counts.sum())} pairs")
            parts = np.split(scores, np.cumsum(counts)[:-1])
            failed = False
        except Exception:
            parts = [np.zeros(0, dtype=np.float32)] * len(ids)
            failed = True
        responses = [
            lg.QuerySampleResponse(int(i), part.ctypes.data, part.nbytes)
            for i, part in zip(ids, parts, strict=True)
        ]
        lg.QuerySamplesComplete(responses)
        done = time.perf_counter()
        with self.record.lock:
            rec = self.record
            rec.first, rec.last = min(rec.first, issued), max(rec.last, done)
            rec.latencies.extend([done - issued] * len(ids))
            rec.answered.extend(int(i) for i in ids)
            if failed:
                rec.errors += len(ids)
            else:
                rec.pairs += int(counts.sum())
            if rec.capture and not failed:
                rec.scores.update(zip(indices.tolist(), parts, strict=True))


def run_offline(
    backend: Backend, pool: SamplePool, settings: RunSettings | None = None, capture: bool = False
) -> tuple[LoadGenResult, LoadGenSUT]:
    """Peak throughput: LoadGen hands over all samples at once; the SUT batches them."""
    s = settings or RunSettings()
    test = _test_settings(lg.TestScenario.Offline, s, len(pool))
    test.offline_expected_qps = s.offline_expected_qps
    return _run(backend, pool, test, s, "Offline", None, capture)


def run_server(
    backend: Backend,
    pool: SamplePool,
    target_qps: float,
    settings: RunSettings | None = None,
    capture: bool = False,
) -> tuple[LoadGenResult, LoadGenSUT]:
    """Poisson arrivals at `target_qps` queries per second, one LoadGen sample per query."""
    s = settings or RunSettings()
    test = _test_settings(lg.TestScenario.Server, s, len(pool))
    test.server_target_qps = target_qps
    test.server_target_latency_ns = int(s.p99_target_ms * 1e6)
    test.server_target_latency_percentile = 0.99
    return _run(backend, pool, test, s, "Server", target_qps, capture)


@dataclass(frozen=True)
class QpsSearch:
    best_qps: float
    """The highest QPS a run (this search's or a known one) measured meeting the target (0 if
    none did)."""
    runs: tuple[LoadGenResult, ...]


def find_peak_server_qps(
    backend: Backend,
    pool: SamplePool,
    low_qps: float,
    high_qps: float,
    settings: RunSettings | None = None,
    max_runs: int = 6,
    tolerance: float = 0.05,
    known: Sequence[LoadGenResult] = (),
    give_up_over: float | None = None,
) -> QpsSearch:
    """Bisection for the highest Server QPS whose run meets the target (`meets_target`: VALID by
    LoadGen, p99 under `settings.p99_target_ms`).

    Server runs already made (`known`) bracket the search first: the highest load that met the
    target is a lower bound, the lowest load above it that missed an upper bound. Without a
    bracket the first run is at the geometric middle of [low_qps, high_qps]; then the load doubles
    (up to `high_qps`) while runs meet the target and halves (down to `low_qps`) while they miss,
    until a bracket exists; then midpoints. At most `max_runs` runs, stopping once the bracket is
    within `tolerance` (relative). The answer is a load a run measured meeting the target, never
    assumed. Low loads are tried last because a run needs a fixed number of queries: the lower
    the load, the longer it lasts.

    `give_up_over`: walk down to the long low-load runs only when it may pay: a run whose p99 is
    over `give_up_over` x the target (not one INVALID only for too few queries to be confident of a
    p99 under it), with no load below it known to meet the target, ends the search at 0. A p99 just
    over the target still walks down: the peak is likely just below. Once a load met the target,
    the bracket above it is bisected with the runs left, as without it.
    """
    if not 0 < low_qps < high_qps:
        raise ValueError(f"need 0 < low_qps < high_qps, got {low_qps}, {high_qps}")
    loads = [(r.target_qps, r.meets_target) for r in known if r.target_qps]
    best = max((q for q, ok in loads if ok), default=0.0)
    hi = min((q for q, ok in loads if not ok and q > best), default=None)
    runs: list[LoadGenResult] = []
    while len(runs) < max_runs:
        if best == 0.0 and hi is None:
            qps = math.sqrt(low_qps * high_qps)
        elif best == 0.0:
            assert hi is not None
            if hi <= low_qps * (1 + tolerance):  # missed at about the lowest load allowed
                break
            qps = max(hi / 2, low_qps)
        elif hi is None:
            if best >= high_qps:  # met the target at the highest load asked about
                break
            qps = min(best * 2, high_qps)
        elif hi - best <= tolerance * hi:
            break
        else:
            qps = (best + hi) / 2
        result, _ = run_server(backend, pool, qps, settings)
        runs.append(result)
        if result.meets_target:
            best = max(best, qps)
        else:
            hi = qps if hi is None else min(hi, qps)
            far_over = give_up_over is not None and result.p99_ms > give_up_over * result.p99_target_ms
            if far_over and best == 0.0:
                break
    return QpsSearch(best, tuple(runs))


def _test_settings(scenario: Any, s: RunSettings, pool_size: int) -> Any:
    test = lg.TestSettings()
    test.scenario = scenario
    test.mode = lg.TestMode.PerformanceOnly
    test.min_duration_ms = int(s.min_duration_s * 1000)
    test.max_duration_ms = int(s.max_duration_s * 1000)
    test.min_query_count = s.min_query_count
    test.performance_sample_count_override = pool_size
    test.qsl_rng_seed = test.sample_index_rng_seed = test.schedule_rng_seed = s.seed
    return test


def _run(
    backend: Backend,
    pool: SamplePool,
    test: Any,
    s: RunSettings,
    scenario: Literal["Offline", "Server"],
    target_qps: float | None,
    capture: bool,
) -> tuple[LoadGenResult, LoadGenSUT]:
    log_dir = s.log_dir or Path(tempfile.mkdtemp(prefix=f"flexemr-loadgen-{scenario.lower()}-"))
    log_dir.mkdir(parents=True, exist_ok=True)
    logs = lg.LogSettings()
    logs.log_output.outdir = str(log_dir)
    logs.log_output.copy_summary_to_stdout = False
    logs.enable_trace = False

    sut = LoadGenSUT(backend, pool, s.batch_size, s.workers, capture)
    sut_handle = lg.ConstructSUT(sut.issue_queries, sut.flush_queries)
    qsl_handle = lg.ConstructQSL(len(pool), len(pool), lambda _: None, lambda _: None)
    try:
        lg.StartTestWithLogSettings(sut_handle, qsl_handle, test, logs)
    finally:
        sut.close()
        lg.DestroyQSL(qsl_handle)
        lg.DestroySUT(sut_handle)
    return _result(backend, sut.record, scenario, target_qps, s.p99_target_ms, log_dir), sut


def _result(
    backend: Backend,
    rec: _Recorder,
    scenario: Literal["Offline", "Server"],
    target_qps: float | None,
    p99_target_ms: float,
    log_dir: Path,
) -> LoadGenResult:
    valid, reasons = loadgen_verdict(log_dir)
    latencies_ms = np.asarray(rec.latencies) * 1e3 if rec.latencies else np.zeros(1)
    p50, p99, p999 = loadgen_percentiles_ms(log_dir) or np.percentile(latencies_ms, [50, 99, 99.9])
    duration = max(rec.last - rec.first, 1e-9)
    return LoadGenResult(
        backend=backend.name,
        transport=backend.transport,
        scenario=scenario,
        target_qps=target_qps,
        queries=len(rec.answered),
        pairs=rec.pairs,
        errors=rec.errors,
        duration_s=duration,
        queries_per_s=len(rec.answered) / duration,
        pairs_per_s=rec.pairs / duration,
        p50_ms=float(p50),
        p99_ms=float(p99),
        p999_ms=float(p999),
        p99_target_ms=p99_target_ms,
        loadgen_valid=valid,
        invalid_reasons=reasons,
        log_dir=log_dir,
    )


_CHECKS = {
    "Min duration satisfied": "too short",
    "Min queries satisfied": "too few queries",
    "Early stopping satisfied": "early stopping: too few queries for this p99",
    "Performance constraints satisfied": "p99 over target",
}
"""LoadGen summary checks, and how a report names a failed one."""


_PERCENTILES = ("50.00", "99.00", "99.90")


def loadgen_percentiles_ms(log_dir: Path) -> tuple[float, float, float] | None:
    """p50, p99 and p99.9 latency (ms) from LoadGen's summary ("99.00 percentile latency (ns) :
    ..."); None if it has not all three."""
    summary = log_dir / "mlperf_log_summary.txt"
    if not summary.exists():
        return None
    found: dict[str, float] = {}
    for line in summary.read_text().splitlines():
        key, _, value = (part.strip() for part in line.partition(":"))
        percentile = key.split(" ")[0]
        if key.endswith("percentile latency (ns)") and percentile in _PERCENTILES:
            found[percentile] = int(value) / 1e6
    if len(found) < len(_PERCENTILES):
        return None
    return found["50.00"], found["99.00"], found["99.90"]


def loadgen_verdict(log_dir: Path) -> tuple[bool | None, tuple[str, ...]]:
    """LoadGen's verdict from its summary ("Result is : VALID"; None if absent) and the checks it
    marks unsatisfied ("Min duration satisfied : NO", ...)."""
    summary = log_dir / "mlperf_log_summary.txt"
    if not summary.exists():
        return None, ()
    valid = None
    failed = []
    for line in summary.read_text().splitlines():
        key, _, value = (part.strip() for part in line.partition(":"))
        if key == "Result is":
            valid = value == "VALID"
        elif key in _CHECKS and value.upper() == "NO":
            failed.append(_CHECKS[key])
    return valid, tuple(failed)
