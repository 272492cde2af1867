"""`flexemr demo`: a local cluster, a short skewed load over HTTP, a printed summary.

Every response is checked against the monolithic model run in this process.
"""

from __future__ import annotations

import argparse
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from flexemr.cli.options import add_sharding_arguments, add_zipf_skew_argument, describe_plan, sharding_plan
from flexemr.client import Client
from flexemr.config import Endpoint, RankerConfig, StorageConfig
from flexemr.config.model import ModelSource
from flexemr.config.spec import ClusterSpec
from flexemr.entrypoints.local import LocalCluster
from flexemr.entrypoints.roles import RankerProcess
from flexemr.model.source import load_weights, model_spec
from flexemr.model.weights import build_monolithic
from flexemr.workload.synthetic import SyntheticConfig, SyntheticWorkload


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", default="rmc2", help="model shape (scaled by --row-scale)")
    parser.add_argument("--row-scale", type=float, default=0.01)
    add_sharding_arguments(parser)
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--batch", type=int, default=32, help="samples per request")
    parser.add_argument("--clients", type=int, default=4, help="concurrent HTTP clients")
    add_zipf_skew_argument(parser)


def run(args: argparse.Namespace) -> int:
    source = ModelSource(preset=args.preset, row_scale=args.row_scale)
    spec = model_spec(source)
    plan = sharding_plan(args, spec.table_rows, spec.dim)
    size_mib = spec.embedding_bytes / 2**20
    print(f"model {args.preset} x{args.row_scale}: {spec.num_tables} tables, {size_mib:.0f} MiB")
    print(describe_plan(plan, spec, StorageConfig()))
    workload = SyntheticWorkload(spec, SyntheticConfig(alpha=args.zipf_skew), seed=1)
    requests = [workload.generate(args.batch) for _ in range(args.requests)]
    monolithic = build_monolithic(load_weights(source))
    endpoints = tuple(Endpoint() for _ in range(plan.num_servers))
    with LocalCluster(ClusterSpec(source, plan, endpoints, RankerConfig(port=0))) as cluster:
        process = RankerProcess.build(cluster.spec)
        process.start_in_thread()
        print(f"cluster ready at {process.url}; sending {args.requests} requests of {args.batch} samples")
        latencies: list[float] = []
        try:
            with Client(process.url) as client:

                def send(i: int) -> np.ndarray:
                    start = time.perf_counter()
                    r = requests[i]
                    scores = client.infer(r.dense, r.indices, r.lengths)
                    latencies.append(time.perf_counter() - start)
                    return scores

                start = time.perf_counter()
                with ThreadPoolExecutor(args.clients) as pool:
                    served = list(pool.map(send, range(args.requests)))
                elapsed = time.perf_counter() - start
            stats = process.ranker.stats()
        finally:
            process.close()
    with torch.inference_mode():
        expected = [
            monolithic.forward_sparse(*(torch.from_numpy(a) for a in (r.dense, r.indices, r.lengths))).numpy()
            for r in requests
        ]
    error = max(float(np.abs(s - e).max()) for s, e in zip(served, expected, strict=True))
    servers = stats["transport"]["servers"]
    wire = sum(s["bytes_sent"] + s["bytes_received"] for s in servers)
    samples = args.requests * args.batch
    p50, p99 = np.percentile(np.array(latencies) * 1000, [50, 99])
    print("\nsummary")
    print(f"  requests        {args.requests} x {args.batch} samples, {args.clients} clients")
    print(f"  throughput      {samples / elapsed:,.0f} samples/s")
    print(f"  latency         p50 {p50:.1f} ms, p99 {p99:.1f} ms")
    print(f"  wire            {wire / samples:,.0f} bytes/sample between ranker and servers")
    verdict = "identical within fp32" if error < 1e-5 else "MISMATCH"
    print(f"  vs monolithic   max |score difference| {error:.2e} ({verdict})")
    return 0 if error < 1e-5 else 1
