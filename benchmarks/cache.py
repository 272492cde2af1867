"""Adaptive embedding cache (DESIGN.md technique 3, FlexEMR 3.1.1): two experiments, one run each.

The ranker runs in this process (built by `build_ranker`, as `flexemr ranker` builds it) and its
embedding servers as real processes on 127.0.0.1. The CPU stands in for the GPU: `--device-memory`
is the budget that the dense network's activations and the cache share. The memory model the ranker
calibrates at start-up for `--cache adaptive` says how big a batch fits beside a cache:

    max_batch(cache) = (budget - parameters - fixed activations - safety margin - cache) / per sample

fig7     FlexEMR Fig. 7. A fixed cache of 0, 25, 50, 75% of the budget, the largest batch that
         fits beside it, and the throughput of back-to-back batches of that size (one in flight,
         as the memory model assumes). Then `adaptive`: light load first (the cache grows), then
         batches of the no-cache maximum (the cache shrinks before the first of them runs).
diurnal  FlexEMR Fig. 5's daily load curve, compressed: Poisson arrivals of MLPerf-sized queries
         (100-700 pairs) at a rate that is low at night and peaks in the afternoon, for `off`, a
         small and a large `fixed` cache and `adaptive`, with dynamic batching on and each system's
         max batch the memory model's for its cache. Cache size, hit rate, p50/p99 latency and
         throughput over the day, and per load level.

Caches start warm: before measuring, each is filled with the workload's hottest rows (its state
after a long run); from then on the ranker's own warmer keeps it filled. Every system's scores are
checked against the monolithic model on one batch (max abs diff < 1e-4). The ranker gets one torch
thread (`--torch-threads`): it shares the cores with its embedding servers, and a parallel op that
waits for a busy core stalls (20x slower queries on a 2-core machine).

    .venv/bin/python benchmarks/cache.py fig7 --quick       # about 25 s; full: about 1 min
    .venv/bin/python benchmarks/cache.py diurnal --quick    # about 70 s; full: 4 to 5 min

Output (to --out, default reports/bench-cache/; `--out docs/bench-cache` updates the README's):
fig7.{md,png,json}, diurnal.{md,png,json}.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing, contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import torch

from flexemr.batch import SparseBatch
from flexemr.bench.report import machine
from flexemr.cache import MemoryModel
from flexemr.config import CacheMode, Endpoint, RankerConfig, format_bytes, parse_bytes
from flexemr.config.cache import CacheConfig
from flexemr.config.model import ModelSource
from flexemr.config.spec import ClusterSpec
from flexemr.entrypoints.local import LocalCluster
from flexemr.entrypoints.roles import build_ranker
from flexemr.model.dlrm import DLRM
from flexemr.model.source import load_weights
from flexemr.model.spec import DEFAULT_ZIPF_SKEW, ModelSpec
from flexemr.model.weights import build_dense, build_monolithic
from flexemr.ranker.ranker import Ranker, resolve_device
from flexemr.sharding.plan import make_plan
from flexemr.workload import MLPERF_QUERY_SIZES, QuerySizes, data_dir
from flexemr.workload.synthetic import SyntheticConfig, SyntheticWorkload

MAX_ABS_DIFF = 1e-4
CHECK_BATCH = 512
"""Samples in the batch whose scores are compared with the monolithic model's."""
MIB = 1 << 20


# -- shared set-up ----------------------------------------------------------------------------------


@dataclass
class Bench:
    """What both experiments share: the model, its monolithic twin, the memory model, the cluster."""

    args: argparse.Namespace
    spec: ModelSpec
    mono: DLRM
    memory: MemoryModel
    cluster: ClusterSpec
    """The running cluster (servers' real ports)."""

    def __post_init__(self) -> None:
        self.rows = torch.cat([bag.weight.detach() for bag in self.mono.emb_l])  # by global key
        self.hot_keys = hottest_keys(self.workload())

    def workload(self) -> SyntheticWorkload:
        """A fresh generator: the same requests each time (and the same hot rows: the seed also
        draws which rows are hot)."""
        return SyntheticWorkload(self.spec, SyntheticConfig(alpha=self.args.alpha), self.args.seed)

    def max_batch(self, cache_bytes: int) -> int:
        """The largest batch whose activations fit beside a cache of `cache_bytes`."""
        return max(0, (self.memory.cache_budget(0) - cache_bytes) // self.memory.per_sample_bytes)

    def ranker(self, cache: str, max_batch: int, batch_window_ms: float = 0.0) -> Ranker:
        config = RankerConfig(
            cache=CacheMode.parse(cache),
            max_batch=max_batch,
            device_memory_bytes=self.args.device_memory,
            batch_window_ms=batch_window_ms,
        )
        return build_ranker(dataclasses.replace(self.cluster, ranker=config))

    def prewarm(self, ranker: Ranker) -> int:
        """Fill the cache's free room with the hottest rows not cached; returns rows written. Twice
        the room is offered, so that sets the hottest rows overfill are topped up by the next ones."""
        if ranker.cache is None:
            return 0
        cached = ranker.cache.cache.contains(torch.from_numpy(self.hot_keys)).numpy()
        keys = torch.from_numpy(self.hot_keys[~cached][: 2 * ranker.cache.free_rows()])
        return ranker.cache.admit(keys, self.rows[keys])

    def check(self, ranker: Ranker, request: SparseBatch) -> float:
        """Max abs difference between the ranker's and the monolithic model's scores."""
        scores = ranker.score(request.dense, request.indices, request.lengths)
        with torch.inference_mode():
            inputs = (torch.from_numpy(a) for a in (request.dense, request.indices, request.lengths))
            expected = self.mono.forward_sparse(*inputs).numpy()
        diff = float(np.abs(scores - expected).max())
        if not diff < MAX_ABS_DIFF:
            raise RuntimeError(f"{ranker.config.cache}: scores differ from the monolithic model's by {diff}")
        return diff

    def setup_line(self) -> str:
        a, m = self.args, self.memory
        return (
            f"{'Quick run (`--quick`), to check the script; not for quoting. ' if a.quick else ''}"
            f"{datetime.now(UTC):%Y-%m-%d %H:%M} UTC on {machine()}, ranker in this process with "
            f"{a.torch_threads} torch thread(s). Model `{a.preset}` x{a.row_scale} "
            f"({sum(self.spec.table_rows):,} rows, {self.spec.num_tables} tables, dim {self.spec.dim}), "
            f"{a.servers} embedding servers (row-wise), Zipf alpha {a.alpha}, lookups `partial`. "
            f"Device budget {format_bytes(m.device_budget_bytes)}: parameters "
            f"{format_bytes(m.parameter_bytes)}, activations {format_bytes(m.fixed_bytes)} + "
            f"{m.per_sample_bytes:,} B/sample, safety margin {format_bytes(m.safety_margin_bytes)} "
            f"(calibrated as the ranker does). A cached row costs {4 * self.spec.dim + 16} B; all rows "
            f"would take {format_bytes(sum(self.spec.table_rows) * (4 * self.spec.dim + 16))}."
        )


def hottest_keys(workload: SyntheticWorkload) -> np.ndarray:
    """Every global key, hottest first, by the workload's power law and bag sizes."""
    spec, config = workload.spec, workload.config
    alphas, means = config.alphas(spec.num_tables), config.mean_bags(spec)
    heat, keys, base = [], [], 0
    for table, rows in enumerate(spec.table_rows):
        ranks = np.arange(rows)
        share = (ranks + 1.0) ** -alphas[table]
        heat.append(means[table] * share / share.sum())
        keys.append(base + workload.permutations[table](ranks))
        base += rows
    order = np.argsort(-np.concatenate(heat), kind="stable")
    hot: np.ndarray = np.concatenate(keys)[order].astype(np.int64)
    return hot


@contextmanager
def started(args: argparse.Namespace) -> Iterator[Bench]:
    source = ModelSource(preset=args.preset, row_scale=args.row_scale, seed=args.seed)
    weights = load_weights(source)
    spec = weights.spec
    device = resolve_device("auto")
    memory = MemoryModel.calibrate(
        build_dense(weights).to(device),
        device,
        device_budget_bytes=args.device_memory,
        safety_margin_bytes=CacheConfig().safety_margin_bytes,
    )
    plan = make_plan("row", spec.table_rows, spec.dim, args.servers)
    endpoints = tuple(Endpoint() for _ in range(args.servers))
    with LocalCluster(ClusterSpec(source, plan, endpoints)) as cluster:
        yield Bench(args, spec, build_monolithic(weights), memory, cluster.spec)


def cache_counts(ranker: Ranker) -> tuple[int, int]:
    """(lookups, hits) so far; zeros without a cache."""
    if ranker.cache is None:
        return 0, 0
    stats = ranker.cache.stats()
    return stats.lookups, stats.hits


def write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=1, default=float))


# -- fig7: cache size vs batch size vs throughput ---------------------------------------------------


@dataclass
class Fig7Row:
    name: str
    cache_bytes: int
    """The cache's capacity while measured."""
    batch: int
    samples_per_s: float
    batch_p50_ms: float
    hit_rate: float
    state: str
    """The load monitor's state after the batches ("-" without a cache)."""
    max_abs_diff: float


def closed_loop(ranker: Ranker, requests: list[SparseBatch]) -> tuple[float, float, float]:
    """(samples/s, p50 batch ms, hit rate) of `requests` scored back to back, one in flight."""
    lookups, hits = cache_counts(ranker)
    times = []
    for r in requests:
        start = time.perf_counter()
        ranker.score(r.dense, r.indices, r.lengths)
        times.append(time.perf_counter() - start)
    after_lookups, after_hits = cache_counts(ranker)
    samples = sum(r.batch_size for r in requests)
    hit_rate = (after_hits - hits) / max(after_lookups - lookups, 1)
    return samples / sum(times), float(np.median(times)) * 1000, hit_rate


def fig7(bench: Bench) -> None:
    args = bench.args
    rows: list[Fig7Row] = []
    for fraction in (0.0, 0.25, 0.5, 0.75):
        cache_bytes = int(fraction * args.device_memory)
        batch = bench.max_batch(cache_bytes)
        if batch < 1:
            print(f"{fraction:.0%}: no batch fits beside a {format_bytes(cache_bytes)} cache; skipped")
            continue
        with closing(bench.ranker(f"fixed:{cache_bytes}" if cache_bytes else "off", batch)) as ranker:
            bench.prewarm(ranker)
            workload = bench.workload()  # every configuration sees the same requests
            diff = bench.check(ranker, workload.generate(min(batch, CHECK_BATCH)))
            requests = [workload.generate(batch) for _ in range(args.batches + 1)]
            ranker.score(requests[0].dense, requests[0].indices, requests[0].lengths)  # warm up
            speed, p50, hit_rate = closed_loop(ranker, requests[1:])
            capacity = ranker.cache.cache.capacity_bytes if ranker.cache else 0
        rows.append(Fig7Row(f"{fraction:.0%} cache", capacity, batch, speed, p50, hit_rate, "-", diff))
        print(rows[-1])
    adaptive_rows, events = adaptive_phases(bench)
    report_fig7(bench, rows + adaptive_rows, events)


def adaptive_phases(bench: Bench) -> tuple[list[Fig7Row], list[dict[str, Any]]]:
    """`adaptive` under light load (batches of --light-batch), then under batches of the no-cache
    maximum: a row for each, and the cache's resizes."""
    args = bench.args
    top = bench.max_batch(0)
    workload = bench.workload()
    rows = []
    with closing(bench.ranker("adaptive", top)) as ranker:
        assert ranker.cache is not None
        light = [workload.generate(args.light_batch) for _ in range(args.batches * 4)]
        ranker.score(light[0].dense, light[0].indices, light[0].lengths)  # low load: the cache grows
        bench.prewarm(ranker)
        diff = bench.check(ranker, workload.generate(CHECK_BATCH))
        speed, p50, hit_rate = closed_loop(ranker, light)
        stats = ranker.cache.stats()
        rows.append(
            Fig7Row("adaptive, light load", stats.capacity_bytes, args.light_batch, speed, p50, hit_rate,
                    stats.state, diff)
        )  # fmt: skip
        heavy = [workload.generate(top) for _ in range(args.batches + 1)]
        closed_loop(ranker, heavy[:1])  # the cache shrinks before this one runs
        speed, p50, hit_rate = closed_loop(ranker, heavy[1:])
        stats = ranker.cache.stats()
        rows.append(
            Fig7Row("adaptive, high load", stats.capacity_bytes, top, speed, p50, hit_rate, stats.state, diff)
        )
        events = [dataclasses.asdict(e) for e in ranker.cache.events]
    print(*rows, sep="\n")
    return rows, events


def report_fig7(bench: Bench, rows: list[Fig7Row], events: list[dict[str, Any]]) -> None:
    out = Path(bench.args.out)
    out.mkdir(parents=True, exist_ok=True)
    budget = bench.args.device_memory
    lines = [
        "# Adaptive cache: cache size vs batch size vs throughput (FlexEMR Fig. 7)",
        "",
        bench.setup_line(),
        "",
        "Each configuration: the largest batch the memory model lets run beside its cache (adaptive "
        "under light load: batches of --light-batch), scored "
        f"back to back ({bench.args.batches} timed batches after one warm-up, one in flight); caches "
        "pre-filled with the hottest rows, then kept warm by the ranker's warmer. Hit rate over the "
        "timed batches. Scores of one batch per configuration equal the monolithic model's (max abs "
        f"diff < {MAX_ABS_DIFF:g}).",
        "",
        "| configuration | cache | % of budget | batch | samples/s | p50 batch ms | hit rate "
        "| load state | max abs diff |",
        "|---|---:|---:|---:|---:|---:|---:|---|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r.name} | {format_bytes(r.cache_bytes)} | {r.cache_bytes / budget:.0%} | {r.batch:,} "
            f"| {r.samples_per_s:,.0f} | {r.batch_p50_ms:,.1f} | {r.hit_rate:.1%} | {r.state} "
            f"| {r.max_abs_diff:.1e} |"
        )
    none, high = rows[0], rows[-1]
    lines += [
        "",
        f"Under high load `adaptive` ran batches of {high.batch:,} beside a "
        f"{format_bytes(high.cache_bytes)} cache: {high.batch / none.batch:.0%} of the no-cache batch "
        f"size, at {high.samples_per_s / none.samples_per_s:.0%} of its throughput.",
        "",
        "Resizes of the adaptive cache (time from the first):",
        "",
        "| t s | from | to | rows evicted | state | planned batch |",
        "|---:|---:|---:|---:|---|---:|",
    ]
    start = events[0]["now"] if events else 0.0
    lines += [
        f"| {e['now'] - start:.2f} | {format_bytes(e['old_bytes'])} | {format_bytes(e['new_bytes'])} "
        f"| {e['evicted']:,} | {e['state']} | {e['plan_batch']:,} |"
        for e in events
    ]
    (out / "fig7.md").write_text("\n".join(lines) + "\n")
    write_json(out / "fig7.json", {"args": vars(bench.args), "rows": [dataclasses.asdict(r) for r in rows],
                                   "events": events})  # fmt: skip

    fig, ax = plt.subplots(figsize=(8, 4.5))
    names = [r.name.replace(", ", "\n") for r in rows]
    bars = ax.bar(names, [r.samples_per_s for r in rows], color="tab:blue")
    for bar, r in zip(bars, rows, strict=True):
        ax.annotate(f"{r.hit_rate:.0%} hits", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                    ha="center", va="bottom", fontsize=8)  # fmt: skip
    ax.set_ylabel("samples/s", color="tab:blue")
    twin = ax.twinx()
    twin.plot(names, [r.batch for r in rows], "o-", color="tab:red")
    twin.set_ylabel("batch (samples)", color="tab:red")
    twin.set_ylim(bottom=0)
    ax.set_title(f"Cache share of a {format_bytes(budget)} budget vs batch size and throughput")
    fig.tight_layout()
    fig.savefig(out / "fig7.png", dpi=120)
    plt.close(fig)
    print(f"wrote {out / 'fig7.md'}, fig7.png, fig7.json")


# -- diurnal: a compressed day of open-loop load ----------------------------------------------------


def day_curve(levels: int) -> np.ndarray:
    """Offered load per level as a fraction of the peak: a day sampled at `levels` even hours,
    lowest (0.1) at 2:00, highest (1.0) at 14:00, like the Alibaba PAI curve of FlexEMR Fig. 5."""
    hours = (np.arange(levels) + 0.5) * 24 / levels
    curve: np.ndarray = 0.55 - 0.45 * np.cos(2 * np.pi * (hours - 2) / 24)
    return curve


@dataclass
class Day:
    """One system's day: per query its arrival and answer (s from the start; NaN: dropped or
    failed) and size; and the cache sampled every `SAMPLE_S`."""

    name: str
    cache: str
    max_batch: int
    arrival: np.ndarray
    finish: np.ndarray
    size: np.ndarray
    dropped: int
    failed: int
    samples: np.ndarray
    """[k, 4]: time, capacity bytes, lookups, hits."""
    max_abs_diff: float
    shrinks: int = 0
    grows: int = 0
    batches: int = 0
    """Batches the ranker scored (queries merged by dynamic batching count once)."""
    bypassed: int = 0
    """Batches that did not consult the cache (`adaptive`'s cost gate, or no capacity)."""
    ns_per_key: tuple[float, float] = (0.0, 0.0)
    """The cost gate's lookup phase per key, with and without the cache (0: not measured)."""
    events: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    """The cache's resizes (`ResizeEvent`s)."""

    @property
    def latency(self) -> np.ndarray:
        latency: np.ndarray = self.finish - self.arrival
        return latency


SAMPLE_S = 0.25
MAX_OUTSTANDING = 256
"""Queries in flight at most; arrivals beyond are dropped (counted), so an overloaded system's
backlog stays bounded and the day ends on time."""


def run_day(
    ranker: Ranker, pool: list[SparseBatch], arrival: np.ndarray
) -> tuple[np.ndarray, int, int, np.ndarray]:
    """Send `pool[i % len(pool)]` at `arrival[i]` s (open loop). Returns (finish times, NaN where
    dropped or failed; dropped; failed; cache samples)."""
    finish = np.full(arrival.size, np.nan)
    failures: list[BaseException] = []
    free = threading.Semaphore(MAX_OUTSTANDING)
    stop = threading.Event()
    samples: list[tuple[float, int, int, int]] = []
    start = time.perf_counter()

    def one(i: int) -> None:
        r = pool[i % len(pool)]
        try:
            ranker.score(r.dense, r.indices, r.lengths)
            finish[i] = time.perf_counter() - start
        except Exception as exc:  # counted and reported; the day goes on
            failures.append(exc)
        finally:
            free.release()

    def sample() -> None:
        while True:
            capacity = ranker.cache.cache.capacity_bytes if ranker.cache else 0
            samples.append((time.perf_counter() - start, capacity, *cache_counts(ranker)))
            if stop.wait(SAMPLE_S):
                return

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    dropped = 0
    with ThreadPoolExecutor(MAX_OUTSTANDING) as clients:
        for i, at in enumerate(arrival):
            time.sleep(max(start + at - time.perf_counter(), 0.0))
            if free.acquire(blocking=False):
                clients.submit(one, i)
            else:
                dropped += 1
    stop.set()
    sampler.join()
    if failures:
        print(f"  {len(failures)} queries failed, e.g. {failures[0]!r}")
    return finish, dropped, len(failures), np.array(samples)


def diurnal(bench: Bench) -> None:
    args = bench.args
    sizes = QuerySizes.load(data_dir() / MLPERF_QUERY_SIZES)
    rng = np.random.default_rng(args.seed)
    workload = bench.workload()
    pool = [workload.generate(int(s)) for s in sizes.sample(rng, args.pool)]
    check = workload.generate(CHECK_BATCH)
    top = bench.max_batch(0)
    small, large = int(args.small * args.device_memory), int(args.large * args.device_memory)
    systems = [
        ("off", "off", top),
        (f"fixed {format_bytes(small)}", f"fixed:{small}", bench.max_batch(small)),
        (f"fixed {format_bytes(large)}", f"fixed:{large}", bench.max_batch(large)),
        ("adaptive", "adaptive", top),
    ]
    peak_qps = args.peak_qps or args.peak_load * probe_capacity(bench, pool, top) / sizes.mean
    curve = day_curve(args.levels)
    rates = peak_qps * curve
    # one arrival sequence for every system: a Poisson process at each level's rate, i.e. a
    # Poisson count per level, placed uniformly within it
    level = np.repeat(np.arange(rates.size), rng.poisson(rates * args.level_s))
    arrival = np.sort((level + rng.random(level.size)) * args.level_s)
    size = np.array([r.batch_size for r in pool])[np.arange(arrival.size) % len(pool)]
    print(f"peak {peak_qps:.1f} queries/s, {arrival.size} queries over {args.levels * args.level_s:.0f} s")
    days = []
    for name, cache, max_batch in systems:
        with closing(bench.ranker(cache, max_batch, args.batch_window_ms)) as ranker:
            ranker.score(pool[0].dense, pool[0].indices, pool[0].lengths)  # adaptive: grows for night
            bench.prewarm(ranker)
            diff = bench.check(ranker, check)
            finish, dropped, failed, samples = run_day(ranker, pool, arrival)
            stats = ranker.cache.stats() if ranker.cache else None
            batches = ranker.requests
        days.append(Day(name, cache, max_batch, arrival, finish, size, dropped, failed, samples, diff))
        days[-1].batches = batches
        if stats:
            days[-1].shrinks, days[-1].grows = stats.shrinks, stats.grows
            days[-1].bypassed = stats.bypassed_batches
            days[-1].ns_per_key = (
                1e9 * stats.seconds_per_key_with_cache,
                1e9 * stats.seconds_per_key_without_cache,
            )
            assert ranker.cache is not None
            days[-1].events = [dataclasses.asdict(e) for e in ranker.cache.events]
        print(f"{name}: max batch {max_batch:,}, dropped {dropped}, failed {failed}")
    report_diurnal(bench, days, rates, sizes.mean)


def probe_capacity(bench: Bench, pool: list[SparseBatch], max_batch: int) -> float:
    """Samples/s of `off` with dynamic batching, saturated by closed-loop clients."""
    args = bench.args
    done = 0
    lock = threading.Lock()
    with closing(bench.ranker("off", max_batch, args.batch_window_ms)) as ranker:
        deadline = time.perf_counter() + args.probe_s

        def client(offset: int) -> None:
            nonlocal done
            i = offset
            while time.perf_counter() < deadline:
                r = pool[i % len(pool)]
                ranker.score(r.dense, r.indices, r.lengths)
                with lock:
                    done += r.batch_size
                i += args.probe_clients

        start = time.perf_counter()
        with ThreadPoolExecutor(args.probe_clients) as clients:
            list(clients.map(client, range(args.probe_clients)))
        speed = done / (time.perf_counter() - start)
    print(f"capacity of `off`: {speed:,.0f} samples/s")
    return speed


@dataclass
class Level:
    offered_qps: float
    offered_sps: float
    done_sps: float
    p50_ms: float
    p99_ms: float
    hit_rate: float
    cache_mib: float
    unanswered: int
    """Queries of the level dropped or failed."""


def levels(day: Day, level_s: float, rates: np.ndarray) -> list[Level]:
    t, capacity, lookups, hits = day.samples.T
    edges = np.arange(rates.size + 1) * level_s
    looked, found = np.diff(np.interp(edges, t, lookups)), np.diff(np.interp(edges, t, hits))
    result = []
    for i, rate in enumerate(rates):
        lo, hi = edges[i], edges[i + 1]
        arrived = (day.arrival >= lo) & (day.arrival < hi)
        ok = arrived & ~np.isnan(day.latency)
        p50, p99 = np.percentile(day.latency[ok] * 1000, [50, 99]) if ok.any() else (np.nan, np.nan)
        finished = (day.finish >= lo) & (day.finish < hi)
        inside = (t >= lo) & (t < hi)
        result.append(
            Level(
                offered_qps=float(rate),
                offered_sps=float(day.size[arrived].sum() / level_s),
                done_sps=float(day.size[finished].sum() / level_s),
                p50_ms=float(p50),
                p99_ms=float(p99),
                hit_rate=float(found[i] / looked[i]) if looked[i] else 0.0,
                cache_mib=float(capacity[inside].mean() / MIB) if inside.any() else 0.0,
                unanswered=int(arrived.sum() - ok.sum()),
            )
        )
    return result


def report_diurnal(bench: Bench, days: list[Day], rates: np.ndarray, mean_size: float) -> None:
    args = bench.args
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    per_level = {d.name: levels(d, args.level_s, rates) for d in days}
    lines = [
        "# Adaptive cache over a compressed day (FlexEMR Fig. 5 load curve)",
        "",
        bench.setup_line(),
        "",
        f"{args.levels} load levels of {args.level_s:g} s; offered load follows a daily curve "
        f"(fractions of the peak: {', '.join(f'{c:.2f}' for c in rates / rates.max())}), peak "
        f"{rates.max():.1f} queries/s"
        + ("" if args.peak_qps else f" ({args.peak_load:g} x the capacity of `off` found by a probe)")
        + f" of MLPerf DLRM-v2 sizes (mean {mean_size:.0f} samples), "
        "Poisson arrivals, the same sequence for every system. Dynamic batching window "
        f"{args.batch_window_ms:g} ms; at most {MAX_OUTSTANDING} queries in flight (more are dropped). "
        "Latency is from the scheduled arrival to the answer, by arrival level; throughput is samples "
        "answered per second, by completion time.",
        "",
        "| system | cache | max batch | queries | dropped | failed | shrinks | grows | batches "
        "| not consulting the cache | lookup ns/key with / without cache | max abs diff |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    lines += [
        f"| {d.name} | `{d.cache}` | {d.max_batch:,} | {d.arrival.size:,} | {d.dropped} | {d.failed} "
        f"| {d.shrinks} | {d.grows} | {d.batches:,} | {d.bypassed:,} "
        f"| {' / '.join(f'{ns:.0f}' if ns else '-' for ns in d.ns_per_key)} | {d.max_abs_diff:.1e} |"
        for d in days
    ]
    for i, rate in enumerate(rates):
        offered = per_level[days[0].name][i].offered_sps
        lines += [
            "",
            f"Level {i + 1}: {rate:.1f} queries/s offered ({offered:,.0f} samples/s)",
            "",
            "| system | p50 ms | p99 ms | samples/s | hit rate | cache MiB | not answered |",
            "|---|---:|---:|---:|---:|---:|---:|",
        ]
        for d in days:
            lv = per_level[d.name][i]
            lines.append(
                f"| {d.name} | {lv.p50_ms:,.1f} | {lv.p99_ms:,.1f} | {lv.done_sps:,.0f} | {lv.hit_rate:.1%} "
                f"| {lv.cache_mib:,.1f} | {lv.unanswered} |"
            )
    lines += ["", *verdict(days, per_level, rates)]
    (out / "diurnal.md").write_text("\n".join(lines) + "\n")
    write_json(out / "diurnal.json", {
        "args": vars(args), "rates_qps": rates.tolist(),
        "levels": {k: [dataclasses.asdict(lv) for lv in v] for k, v in per_level.items()},
        "days": [{k: v.tolist() if isinstance(v, np.ndarray) else v for k, v in dataclasses.asdict(d).items()}
                 for d in days],
    })  # fmt: skip
    plot_diurnal(days, args.level_s, rates, out / "diurnal.png")
    print(f"wrote {out / 'diurnal.md'}, diurnal.png, diurnal.json")


def verdict(days: list[Day], per_level: dict[str, list[Level]], rates: np.ndarray) -> list[str]:
    """The issue's two goals, checked level by level on the measured numbers."""
    fixed = [d.name for d in days if d.cache.startswith("fixed")]
    lines = ["Goals (measured):", ""]
    worse = []
    for i in range(rates.size):
        adaptive = per_level["adaptive"][i]
        best = min(per_level[name][i].p99_ms for name in fixed)
        best_p50 = min(per_level[name][i].p50_ms for name in fixed)
        if adaptive.p99_ms > best or adaptive.p50_ms > best_p50:
            worse.append(
                f"level {i + 1} (p50 {adaptive.p50_ms:.1f} vs {best_p50:.1f} ms, "
                f"p99 {adaptive.p99_ms:.1f} vs {best:.1f} ms)"
            )
    lines.append(
        "- adaptive never worse than the best fixed size (p50 and p99, every level): "
        + ("**met**" if not worse else f"**not met** at {'; '.join(worse)}")
    )
    light = int(np.argmin(rates))
    a, off = per_level["adaptive"][light], per_level["off"][light]
    lines.append(
        f"- adaptive p50 below `off` at the lightest level ({light + 1}): "
        f"{'**met**' if a.p50_ms < off.p50_ms else '**not met**'} "
        f"({a.p50_ms:.1f} vs {off.p50_ms:.1f} ms)"
    )
    return lines


def plot_diurnal(days: list[Day], level_s: float, rates: np.ndarray, path: Path) -> None:
    bucket = level_s / 2
    edges = np.arange(0, rates.size * level_s + bucket / 2, bucket)
    mids = (edges[:-1] + edges[1:]) / 2
    fig, axes = plt.subplots(4, 1, figsize=(9, 11), sharex=True)
    for d in days:
        t, capacity, lookups, hits = d.samples.T
        axes[0].step(t, capacity / MIB, where="post", label=d.name)
        looked = np.diff(np.interp(edges, t, lookups))
        found = np.diff(np.interp(edges, t, hits))
        axes[1].plot(mids, np.divide(found, looked, out=np.full(mids.size, np.nan), where=looked > 0))
        ok = ~np.isnan(d.latency)
        which = np.digitize(d.arrival, edges) - 1
        p50 = [np.percentile(d.latency[ok & (which == b)] * 1000, 50) if (ok & (which == b)).any()
               else np.nan for b in range(mids.size)]  # fmt: skip
        p99 = [np.percentile(d.latency[ok & (which == b)] * 1000, 99) if (ok & (which == b)).any()
               else np.nan for b in range(mids.size)]  # fmt: skip
        (line,) = axes[2].plot(mids, p50, label=f"{d.name} p50")
        axes[2].plot(mids, p99, "--", color=line.get_color(), label=f"{d.name} p99")
        done = np.histogram(d.finish[ok], edges, weights=d.size[ok])[0] / bucket
        axes[3].plot(mids, done, label=d.name)
    offered = np.histogram(days[0].arrival, edges, weights=days[0].size)[0] / bucket
    axes[3].plot(mids, offered, "k:", label="offered")
    titles = ["cache capacity (MiB)", "hit rate", "latency (ms; solid p50, dashed p99)", "samples/s"]
    for ax, title in zip(axes, titles, strict=True):
        ax.set_ylabel(title)
        ax.grid(alpha=0.3, axis="y")
        for edge in np.arange(rates.size + 1) * level_s:
            ax.axvline(edge, color="0.85", linewidth=0.8)
        ax.set_xlim(0, rates.size * level_s)
    axes[2].set_yscale("log")
    axes[0].legend(fontsize=8)
    axes[3].legend(fontsize=8)
    axes[3].set_xlabel("time in the compressed day (s); grey lines: load levels")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# -- command line -----------------------------------------------------------------------------------


def main() -> None:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--quick", action="store_true", help="a short run to check the script")
    common.add_argument("--preset", default="rmc1")
    common.add_argument("--row-scale", type=float, default=0.05)
    common.add_argument("--servers", type=int, default=2)
    common.add_argument(
        "--alpha", type=float, default=DEFAULT_ZIPF_SKEW, help="Zipf exponent of row popularity"
    )
    common.add_argument("--device-memory", type=parse_bytes, default=parse_bytes("320MiB"))
    common.add_argument("--seed", type=int, default=0)
    common.add_argument("--out", default="reports/bench-cache")
    common.add_argument(
        "--torch-threads", type=int, default=1, help="intra-op threads of the ranker (this process)"
    )
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    experiments = parser.add_subparsers(dest="experiment", required=True)
    f7 = experiments.add_parser("fig7", parents=[common], help="cache size vs batch vs throughput")
    f7.add_argument("--batches", type=int, help="timed batches per configuration (6; quick 2)")
    f7.add_argument("--light-batch", type=int, default=256, help="adaptive's light-load batch")
    day = experiments.add_parser("diurnal", parents=[common], help="a compressed day of load")
    day.add_argument("--levels", type=int, help="load levels in the day (8; quick 6)")
    day.add_argument("--level-s", type=float, help="seconds per level (6; quick 2)")
    day.add_argument("--peak-load", type=float, default=0.6, help="peak offered load / capacity of off")
    day.add_argument("--peak-qps", type=float, help="peak queries/s (skips the capacity probe)")
    day.add_argument("--small", type=float, default=0.1, help="small fixed cache, fraction of budget")
    day.add_argument("--large", type=float, default=0.5, help="large fixed cache, fraction of budget")
    day.add_argument("--batch-window-ms", type=float, default=2.0)
    day.add_argument("--pool", type=int, help="distinct queries, sent in turn (160; quick 64)")
    day.add_argument("--probe-s", type=float, help="capacity probe seconds (5; quick 3)")
    day.add_argument("--probe-clients", type=int, default=16)
    args = parser.parse_args()
    defaults = {"batches": (6, 2), "levels": (8, 6), "level_s": (6.0, 2.0), "pool": (160, 64),
                "probe_s": (5.0, 3.0)}  # fmt: skip
    for name, (full, quick) in defaults.items():
        if getattr(args, name, 0) is None:
            setattr(args, name, quick if args.quick else full)
    # With 2 threads, every parallel op waits for a second core that the embedding servers (or
    # anyone else) may hold: a 270-sample query took 180 ms instead of 8 on a 2-core machine.
    torch.set_num_threads(args.torch_threads)
    with started(args) as bench:
        fig7(bench) if args.experiment == "fig7" else diurnal(bench)


if __name__ == "__main__":
    main()
