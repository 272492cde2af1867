"""Monolithic in-process vs disaggregated (`partial` and `raw` lookups), side by side in one run.

The ranker runs in this process and its embedding servers as real processes on 127.0.0.1, so the
numbers isolate the lookup path (no HTTP). Same model, same requests for every system.

    .venv/bin/python benchmarks/serving.py --preset rmc2 --row-scale 0.02 --batch 128 --batches 40
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from flexemr.batch import SparseBatch
from flexemr.config import Endpoint, RankerConfig
from flexemr.config.model import ModelSource
from flexemr.config.spec import ClusterSpec
from flexemr.entrypoints.local import LocalCluster
from flexemr.entrypoints.roles import build_ranker
from flexemr.model.source import load_weights, model_spec
from flexemr.model.spec import DEFAULT_ZIPF_SKEW, ModelSpec
from flexemr.model.weights import build_monolithic
from flexemr.sharding.plan import make_plan
from flexemr.workload.synthetic import SyntheticConfig, SyntheticWorkload


def measure(
    score: Callable[[SparseBatch], np.ndarray], requests: list[SparseBatch], clients: int
) -> dict[str, float]:
    latencies: list[float] = []

    def one(request: SparseBatch) -> None:
        start = time.perf_counter()
        score(request)
        latencies.append(time.perf_counter() - start)

    score(requests[0])  # warm up
    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(one, requests))
    elapsed = time.perf_counter() - start
    p50, p99 = np.percentile(np.array(latencies) * 1000, [50, 99])
    samples = sum(r.batch_size for r in requests)
    return {"samples_per_s": samples / elapsed, "p50_ms": float(p50), "p99_ms": float(p99)}


def add_deployment_arguments(parser: argparse.ArgumentParser) -> None:
    """The model and its embedding servers, as the serving benchmarks take them."""
    parser.add_argument("--preset", default="rmc2")
    parser.add_argument("--row-scale", type=float, default=0.02)
    parser.add_argument("--servers", type=int, default=2)
    parser.add_argument("--sharding", choices=("table", "row"), default="row")


def add_load_arguments(parser: argparse.ArgumentParser, clients: int) -> None:
    """Closed-loop clients sending synthetic batches."""
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--batches", type=int, default=40)
    parser.add_argument("--clients", type=int, default=clients)
    parser.add_argument("--alpha", type=float, default=DEFAULT_ZIPF_SKEW)


def synthetic_batches(spec: ModelSpec, args: argparse.Namespace) -> list[SparseBatch]:
    workload = SyntheticWorkload(spec, SyntheticConfig(alpha=args.alpha), seed=0)
    return [workload.generate(args.batch) for _ in range(args.batches)]


def monolithic_scorer(source: ModelSource) -> Callable[[SparseBatch], np.ndarray]:
    """The whole model in this process, called directly: the in-process baseline."""
    monolithic = build_monolithic(load_weights(source))

    def score(r: SparseBatch) -> np.ndarray:
        with torch.inference_mode():
            out = monolithic.forward_sparse(*(torch.from_numpy(a) for a in (r.dense, r.indices, r.lengths)))
        return out.numpy()

    return score


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_deployment_arguments(parser)
    add_load_arguments(parser, clients=2)
    args = parser.parse_args()

    source = ModelSource(preset=args.preset, row_scale=args.row_scale)
    spec = model_spec(source)
    requests = synthetic_batches(spec, args)
    samples = args.batches * args.batch
    results: dict[str, dict[str, float]] = {}
    mono = monolithic_scorer(source)
    results["monolithic (in-process)"] = {**measure(mono, requests, args.clients), "bytes_per_sample": 0.0}

    plan = make_plan(args.sharding, spec.table_rows, spec.dim, args.servers)
    endpoints = tuple(Endpoint() for _ in range(args.servers))
    with LocalCluster(ClusterSpec(source, plan, endpoints)) as cluster:
        for lookup in ("partial", "raw"):
            ranker = build_ranker(dataclasses.replace(cluster.spec, ranker=RankerConfig(lookup=lookup)))
            try:
                row = measure(
                    lambda r, rk=ranker: rk.score(r.dense, r.indices, r.lengths), requests, args.clients
                )
                servers = ranker.stats()["transport"]["servers"]
                wire = sum(s["bytes_sent"] + s["bytes_received"] for s in servers)
                row["bytes_per_sample"] = wire / (samples + args.batch)  # + the warm-up batch
            finally:
                ranker.close()
            results[f"disaggregated {lookup} ({args.servers} servers, {args.sharding}-wise)"] = row

    base = results["monolithic (in-process)"]["samples_per_s"]
    setup = f"batch {args.batch}, {args.batches} batches, {args.clients} clients"
    print(f"\n{args.preset} x{args.row_scale}, {setup}")
    print("| system | samples/s | x monolithic | p50 ms | p99 ms | bytes/sample |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, r in results.items():
        print(
            f"| {name} | {r['samples_per_s']:,.0f} | {r['samples_per_s'] / base:.2f} | {r['p50_ms']:.1f} "
            f"| {r['p99_ms']:.1f} | {r['bytes_per_sample']:,.0f} |"
        )


if __name__ == "__main__":
    main()
