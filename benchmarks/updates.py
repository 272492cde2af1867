"""Row updates while serving: update throughput, visibility latency, and what updates cost reads.

The embedding servers run as real processes on 127.0.0.1, the ranker and an `Updater` in this
process (the path HTTP pushes and the Redis consumer both end in). Three measurements:

- update throughput: `--updates` batches of `--rows-per-update` random rows applied back to back
  (each batch one version: staged on every replica, committed on every server); rows/s and the
  p50/p99 of one apply;
- visibility latency: `--trials` times, new values for one row, then a request reading only that
  row scored in a loop; the time from the start of the apply to the first score that changed;
- reads under updates: `--clients` closed-loop readers for `--seconds` at each update rate of
  `--rates` (batches per second, 0 = none): read samples/s, p50/p99, failed requests, and the
  update rate reached. `--history-mib 0` turns the servers' history off (a lookup at a version
  other than the newest is then STALE), to show what it buys.

    .venv/bin/python benchmarks/updates.py --preset rmc2 --row-scale 0.02 --rates 0,10,100,1000
"""

from __future__ import annotations

import argparse
import json
import threading
import time

import numpy as np

from flexemr.config import Endpoint, UpdatesConfig
from flexemr.config.model import ModelSource
from flexemr.config.spec import ClusterSpec
from flexemr.entrypoints.local import LocalCluster
from flexemr.entrypoints.roles import build_ranker
from flexemr.model.source import model_spec
from flexemr.model.spec import ModelSpec
from flexemr.ranker.ranker import Ranker
from flexemr.sharding.plan import make_plan
from flexemr.transport.base import LookupFailed, ServerUnavailable
from flexemr.updates import RowUpdates, Updater
from flexemr.workload.synthetic import SyntheticConfig, SyntheticWorkload
from serving import add_deployment_arguments  # benchmarks/serving.py, beside this script


def random_updates(spec: ModelSpec, rows: int, rng: np.random.Generator) -> RowUpdates:
    tables = rng.integers(0, spec.num_tables, rows)
    row = (rng.random(rows) * np.asarray(spec.table_rows)[tables]).astype(np.int64)
    values = rng.standard_normal((rows, spec.dim)).astype(np.float32)
    return RowUpdates(tables.astype(np.int64), row, values)


def percentiles_ms(seconds: list[float]) -> dict[str, float]:
    p50, p99 = np.percentile(np.array(seconds or [0.0]) * 1000, [50, 99])
    return {"p50_ms": float(p50), "p99_ms": float(p99)}


def update_throughput(updater: Updater, spec: ModelSpec, batches: int, rows: int) -> dict[str, float]:
    rng = np.random.default_rng(1)
    work = [random_updates(spec, rows, rng) for _ in range(batches)]
    took = []
    start = time.perf_counter()
    for updates in work:
        t = time.perf_counter()
        updater.apply(updates)
        took.append(time.perf_counter() - t)
    elapsed = time.perf_counter() - start
    return {
        "rows_per_s": batches * rows / elapsed,
        "versions_per_s": batches / elapsed,
        **percentiles_ms(took),
    }


def visibility(ranker: Ranker, updater: Updater, spec: ModelSpec, trials: int) -> dict[str, float]:
    """Push to the first request that sees it, per trial (the probe reads only the updated row)."""
    rng = np.random.default_rng(2)
    lengths = np.zeros(spec.num_tables, dtype=np.int32)
    lengths[0] = 1
    dense = rng.standard_normal((1, spec.num_dense)).astype(np.float32)
    seen = []
    for _ in range(trials):
        row = np.array([rng.integers(0, spec.table_rows[0])], dtype=np.int64)
        before = ranker.score(dense, row, lengths)
        values = rng.standard_normal((1, spec.dim)).astype(np.float32) * 10
        start = time.perf_counter()
        updater.apply(RowUpdates(np.zeros(1, dtype=np.int64), row, values))
        while np.array_equal(ranker.score(dense, row, lengths), before):
            if time.perf_counter() - start > 30:
                raise RuntimeError("an update was not visible after 30 s")
        seen.append(time.perf_counter() - start)
    return {"trials": trials, **percentiles_ms(seen), "max_ms": max(seen) * 1000}


def reads_under_updates(
    ranker: Ranker, updater: Updater, spec: ModelSpec, rate: float, seconds: float, clients: int,
    batch: int, rows_per_update: int,
) -> dict[str, float]:  # fmt: skip
    workload = SyntheticWorkload(spec, SyntheticConfig(), seed=3)
    requests = [workload.generate(batch) for _ in range(64)]
    stop = threading.Event()
    latencies: list[float] = []
    failed = applied = 0
    lock = threading.Lock()

    def read(which: int) -> None:
        nonlocal failed
        i = which
        while not stop.is_set():
            r = requests[i % len(requests)]
            i += clients
            t = time.perf_counter()
            try:
                ranker.score(r.dense, r.indices, r.lengths)
            except (ServerUnavailable, LookupFailed):
                with lock:
                    failed += 1
                continue
            with lock:
                latencies.append(time.perf_counter() - t)

    def update() -> None:
        nonlocal applied
        rng = np.random.default_rng(4)
        start = time.perf_counter()
        while not stop.is_set():
            due = start + applied / rate
            if stop.wait(max(due - time.perf_counter(), 0)):
                return
            updater.apply(random_updates(spec, rows_per_update, rng))
            applied += 1

    threads = [threading.Thread(target=read, args=(i,)) for i in range(clients)]
    if rate > 0:
        threads.append(threading.Thread(target=update))
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    time.sleep(seconds)
    stop.set()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - start
    return {
        "update_rate_target": rate,
        "update_rate_reached": applied / elapsed,
        "read_samples_per_s": len(latencies) * batch / elapsed,
        **percentiles_ms(latencies),
        "failed_requests": failed,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_deployment_arguments(parser)
    parser.add_argument("--updates", type=int, default=200, help="batches for the throughput run")
    parser.add_argument("--rows-per-update", type=int, default=256)
    parser.add_argument("--trials", type=int, default=50, help="visibility trials")
    parser.add_argument("--rates", default="0,10,100,1000", help="update batches per second while reading")
    parser.add_argument("--seconds", type=float, default=20.0, help="per rate")
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument(
        "--history-mib",
        type=float,
        default=UpdatesConfig().max_history_bytes / 2**20,
        help="servers' updates.max_history_bytes in MiB (0: only the newest version is answered)",
    )
    args = parser.parse_args()

    source = ModelSource(preset=args.preset, row_scale=args.row_scale)
    spec = model_spec(source)
    plan = make_plan(args.sharding, spec.table_rows, spec.dim, args.servers)
    updates = UpdatesConfig(max_history_bytes=int(args.history_mib * 2**20))
    endpoints = tuple(Endpoint() for _ in range(plan.num_servers))
    cluster = LocalCluster(ClusterSpec(source, plan, endpoints, updates=updates))
    results: dict[str, object] = {}
    try:
        started = cluster.start()
        ranker = build_ranker(started)
        updater = Updater(started)
        try:
            results["update_throughput"] = update_throughput(
                updater, spec, args.updates, args.rows_per_update
            )
            print(json.dumps(results), flush=True)
            results["visibility"] = visibility(ranker, updater, spec, args.trials)
            print(json.dumps(results), flush=True)
            loop = (args.seconds, args.clients, args.batch, args.rows_per_update)
            results["reads_under_updates"] = [
                reads_under_updates(ranker, updater, spec, float(rate), *loop)
                for rate in args.rates.split(",")
            ]
        finally:
            updater.close()
            ranker.close()
    finally:
        cluster.stop()
    print(json.dumps({"config": vars(args), "results": results}, indent=2))


if __name__ == "__main__":
    main()
