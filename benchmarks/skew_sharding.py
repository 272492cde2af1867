"""Skewed traffic, 4 embedding servers: uniform R=2 vs hot-range replicas planned from measured counts.

Per Zipf exponent and per id order (`hashed`: the workload's hot rows spread over the id space by
a seeded permutation, as flexemr's generators do; `ordered`: hot rows at the low ids, as in
vocabularies numbered by frequency), three plans of the same model over the same 4 servers:

- `uniform R=2`: row-wise over 2 servers, copied onto 2 more (every row on 2 servers);
- `hot R>=2`: `plan --from-stats` with 2 copies of every row at the same memory (2.0 copies of the
  model): the ranges placed by their measured load, no room for extra copies;
- `hot R>=1`: 1 copy of every row and more of the hot ranges, at most 2.0 copies of the model
  (it stores much less: availability traded for memory).

The counts come from a profiling run of other requests (same distribution) through the uniform
cluster (`GET /v2/stats/ranges`, here read in process). Then, per plan, a closed loop of `--clients`
threads scores `--requests` batches (cache off: the servers see every lookup): throughput, p50,
p99, failed requests, and the rows each server looked up (its range counters), max/mean. Every
answer is checked against the monolithic model.

    .venv/bin/python benchmarks/skew_sharding.py --row-scale 0.02 --requests 120

`--wide DIM`: instead, a model of `--wide-tables` tables `DIM` wide (rmc2's MLPs and bags, its
tables' shape otherwise) under Zipf `--alphas`, sharded four ways over the same 4 servers at the
same memory (one copy of every row): table-wise, row-wise, column-wise (every table cut into 4
column blocks) and column-row (2 column blocks, each split by rows over 2 servers). Per server
it also reports the bytes of rows looked up (rows x the width it holds): a column block's lookup
moves a quarter of a row, so rows looked up alone would flatter no plan.

    .venv/bin/python benchmarks/skew_sharding.py --wide 256 --wide-rows 50000 --requests 60
"""

from __future__ import annotations

import argparse
import contextlib
import json
import tempfile
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from flexemr.batch import SparseBatch
from flexemr.config import Endpoint, NodeLimits
from flexemr.config.model import ModelSource
from flexemr.config.plan import ShardingPlan
from flexemr.config.spec import ClusterSpec
from flexemr.entrypoints.local import LocalCluster
from flexemr.entrypoints.roles import build_ranker
from flexemr.model.presets import preset
from flexemr.model.source import load_weights, model_spec
from flexemr.model.weights import PresetWeights, build_monolithic
from flexemr.planner.hot_ranges import RangeTraffic, hot_range_plan
from flexemr.ranker.range_stats import gather_range_counts
from flexemr.ranker.ranker import Ranker
from flexemr.sharding.plan import make_plan, replicated
from flexemr.transport.base import LookupFailed, ServerUnavailable
from flexemr.workload.synthetic import SyntheticConfig, SyntheticWorkload

HEARTBEAT_TIMEOUT_S = 10.0
"""Seconds without a heartbeat answer before a server counts as down (default 1 s)."""


def requests_for(workload: SyntheticWorkload, ordered: bool, batch: int, count: int) -> list[SparseBatch]:
    """`count` batches; `ordered`: each row id replaced by its popularity rank (hot rows first)."""
    out = []
    tables = workload.spec.num_tables
    for _ in range(count):
        r = workload.generate(batch)
        if ordered:
            bounds = np.concatenate([[0], np.cumsum(r.lengths.reshape(tables, -1).sum(axis=1))])
            indices = r.indices.copy()
            for t in range(tables):
                part = slice(bounds[t], bounds[t + 1])
                indices[part] = workload.permutations[t].inverse(indices[part])
            r = SparseBatch(r.dense, indices, r.lengths)
        out.append(r)
    return out


def server_lookups(ranker: Ranker) -> np.ndarray:
    stats = gather_range_counts(ranker)
    return np.array(stats["lookups"], dtype=np.int64) + np.array(stats["skipped"], dtype=np.int64)


def closed_loop(
    ranker: Ranker, requests: list[SparseBatch], expected: list[np.ndarray], clients: int
) -> dict[str, object]:
    latencies: list[float] = []
    wrong = failed = 0
    lock = threading.Lock()

    def one(i: int) -> None:
        nonlocal wrong, failed
        r = requests[i]
        start = time.perf_counter()
        try:
            scores = ranker.score(r.dense, r.indices, r.lengths)
        except (ServerUnavailable, LookupFailed):  # e.g. a server too busy to answer heartbeats
            with lock:
                failed += 1
            return
        with lock:
            latencies.append(time.perf_counter() - start)
            wrong += not np.allclose(scores, expected[i], atol=1e-5)

    before = server_lookups(ranker)
    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(one, range(len(requests))))
    elapsed = time.perf_counter() - start
    per_server = server_lookups(ranker) - before
    p50, p99 = np.percentile(np.array(latencies or [0.0]) * 1000, [50, 99])
    plan = ranker.router.plan
    read = per_server * np.array([4 * plan.server_width(s) for s in range(plan.num_servers)])
    return {
        "samples_per_s": sum(r.batch_size for r in requests) / elapsed,
        "failed_requests": failed,
        "p50_ms": float(p50),
        "p99_ms": float(p99),
        "max_over_mean_lookups": float(per_server.max() / per_server.mean()),
        "lookups_per_server": per_server.tolist(),
        "max_over_mean_bytes": float(read.max() / read.mean()),
        "bytes_read_per_server": read.tolist(),
        "wrong_scores": wrong,
    }


@contextlib.contextmanager
def serving(source: ModelSource, plan: ShardingPlan) -> Iterator[Ranker]:
    """A ranker in this process over `plan`'s embedding servers, as real processes."""
    endpoints = tuple(Endpoint() for _ in range(plan.num_servers))
    # A lenient heartbeat: on a loaded shared machine a busy server is slow, not dead.
    limits = NodeLimits(heartbeat_timeout_s=HEARTBEAT_TIMEOUT_S)
    cluster = LocalCluster(ClusterSpec(source, plan, endpoints, limits=limits))
    try:
        ranker = build_ranker(cluster.start())
        try:
            yield ranker
        finally:
            ranker.close()
    finally:
        cluster.stop()


def monolith_scores(source: ModelSource, work: list[SparseBatch]) -> list[np.ndarray]:
    monolithic = build_monolithic(load_weights(source))
    with torch.inference_mode():
        return [
            monolithic.forward_sparse(*(torch.from_numpy(a) for a in (r.dense, r.indices, r.lengths))).numpy()
            for r in work
        ]


def hot_ranges(args: argparse.Namespace) -> list[dict[str, object]]:
    """Uniform R=2 vs the hot-range plans, per id order and Zipf exponent."""
    source = ModelSource(preset=args.preset, row_scale=args.row_scale)
    spec = model_spec(source)
    uniform = replicated(make_plan("row", spec.table_rows, spec.dim, 2), 2)
    model_rows = sum(spec.table_rows)
    results: list[dict[str, object]] = []
    for ids in args.ids.split(","):
        for alpha in (float(a) for a in args.alphas.split(",")):
            workload = SyntheticWorkload(spec, SyntheticConfig(alpha=alpha), seed=0)
            profile = requests_for(workload, ids == "ordered", args.batch, args.profile_requests)
            work = requests_for(workload, ids == "ordered", args.batch, args.requests)
            expected = monolith_scores(source, work)
            with serving(source, uniform) as ranker:
                for r in profile:
                    ranker.score(r.dense, r.indices, r.lengths)
                traffic = RangeTraffic.from_stats(gather_range_counts(ranker))
            plans = {
                "uniform R=2": uniform,
                "hot R>=2": hot_range_plan(traffic, 4, 2, 2.0).plan,
                "hot R>=1": hot_range_plan(traffic, 4, 1, 2.0).plan,
            }
            for name, plan in plans.items():
                with serving(source, plan) as ranker:
                    measured = closed_loop(ranker, work, expected, args.clients)
                copies = [c for t in range(spec.num_tables) for *_, c in plan.copies(t)]
                row = {
                    "ids": ids,
                    "alpha": alpha,
                    "plan": name,
                    "memory_copies": sum(s.rows for s in plan.shards) / model_rows,
                    "most_copies": max(copies),
                    **measured,
                }
                results.append(row)
                print(json.dumps(row), flush=True)
    print(f"\n{'ids':8} {'zipf':>5} {'plan':12} {'mem':>5} {'max R':>5} {'samples/s':>10} {'p50 ms':>8} "
          f"{'p99 ms':>8} {'max/mean':>8}")  # fmt: skip
    for row in results:
        print(f"{row['ids']:8} {row['alpha']:5.1f} {row['plan']:12} {row['memory_copies']:5.2f} "
              f"{row['most_copies']:5d} {row['samples_per_s']:10.0f} {row['p50_ms']:8.1f} "
              f"{row['p99_ms']:8.1f} {row['max_over_mean_lookups']:8.3f}")  # fmt: skip
    return results


def wide_tables(args: argparse.Namespace, folder: Path) -> list[dict[str, object]]:
    """Table-, row-, column- and column-row-wise plans of a model with wide tables, per id order
    and Zipf exponent. No preset is wide, so the model is written as a checkpoint in `folder`."""
    base = preset(args.preset)
    mlps = {"bottom_mlp": (*base.bottom_mlp[:-1], args.wide)} if base.interaction == "dot" else {}
    spec = base.with_overrides(
        table_rows=(args.wide_rows,) * args.wide_tables,
        dim=args.wide,
        pooling_factors=base.pooling_factors[: args.wide_tables],
        **mlps,
    )
    checkpoint = folder / "wide.pt"
    torch.save(build_monolithic(PresetWeights(spec)).state_dict(), checkpoint)
    source = ModelSource(checkpoint=str(checkpoint), interaction=spec.interaction, pooling=spec.pooling)
    rows, dim = spec.table_rows, spec.dim
    plans = {
        "table": make_plan("table", rows, dim, 4),
        "row": make_plan("row", rows, dim, 4),
        "column x4": make_plan("column", rows, dim, 4, column_shards=4),
        "column-row x2": make_plan("column-row", rows, dim, 4, column_shards=2),
    }
    results: list[dict[str, object]] = []
    for ids in args.ids.split(","):
        for alpha in (float(a) for a in args.alphas.split(",")):
            workload = SyntheticWorkload(spec, SyntheticConfig(alpha=alpha), seed=0)
            work = requests_for(workload, ids == "ordered", args.batch, args.requests)
            expected = monolith_scores(source, work)
            for name, plan in plans.items():
                with serving(source, plan) as ranker:
                    measured = closed_loop(ranker, work, expected, args.clients)
                row = {"ids": ids, "alpha": alpha, "dim": dim, "plan": name, **measured}
                results.append(row)
                print(json.dumps(row), flush=True)
    print(f"\n{'ids':8} {'zipf':>5} {'plan':14} {'samples/s':>10} {'p50 ms':>8} {'p99 ms':>8} "
          f"{'rows max/mean':>13} {'bytes max/mean':>14}")  # fmt: skip
    for row in results:
        print(f"{row['ids']:8} {row['alpha']:5.1f} {row['plan']:14} {row['samples_per_s']:10.0f} "
              f"{row['p50_ms']:8.1f} {row['p99_ms']:8.1f} {row['max_over_mean_lookups']:13.3f} "
              f"{row['max_over_mean_bytes']:14.3f}")  # fmt: skip
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="rmc2")
    parser.add_argument("--row-scale", type=float, default=0.02)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--requests", type=int, default=120)
    parser.add_argument("--profile-requests", type=int, default=40)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--alphas", default="0.8,1.0,1.2")
    parser.add_argument("--ids", default="hashed,ordered", help="id orders to run: hashed, ordered")
    parser.add_argument("--wide", type=int, help="compare table/row/column plans of tables this wide")
    parser.add_argument("--wide-tables", type=int, default=2, help="--wide: number of tables")
    parser.add_argument("--wide-rows", type=int, default=50_000, help="--wide: rows per table")
    parser.add_argument("--out", help="also write the results as JSON here")
    args = parser.parse_args()
    if args.wide is None:
        results = hot_ranges(args)
    else:
        with tempfile.TemporaryDirectory() as folder:
            results = wide_tables(args, Path(folder))
    if args.out:
        with open(args.out, "w") as out:
            json.dump({"config": vars(args), "results": results}, out, indent=2)


if __name__ == "__main__":
    main()
