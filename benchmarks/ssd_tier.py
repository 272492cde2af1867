"""The SSD tier (`--storage mmap`): lookups/s and p99 with the working set in and out of memory.

One embedding server holds every table; the ranker in this process sends back-to-back batches whose
rows are drawn uniformly from the first `--hot-fraction` of each table (a working set that fits in
memory) or from all of it (one that does not, when the server's memory is limited). Each is run
with the rows in DRAM and in a memory-mapped file (`--storage-dir`, on the SSD to measure).

The server's memory is limited with a memory cgroup (`--memory-max`: v2 `memory.max` or v1
`memory.limit_in_bytes`, needs root); where none can be made the run says so, and the out-of-memory case
only measures the page cache (the file stays cached). The DRAM run is skipped when the rows do not
fit under the limit. Scores are checked against the monolithic model on the first batch.

    .venv/bin/python benchmarks/ssd_tier.py --quick --storage-dir /tmp/flexemr-ssd
    sudo .venv/bin/python benchmarks/ssd_tier.py --row-scale 0.5 --memory-max 2GiB \
        --storage-dir /mnt/nvme/flexemr
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from flexemr.batch import SparseBatch
from flexemr.bench.cgroup import memory_cgroup
from flexemr.config import Endpoint, NodeLimits, RankerConfig, StorageConfig, parse_bytes
from flexemr.config.model import ModelSource
from flexemr.config.spec import ClusterSpec
from flexemr.entrypoints.local import LocalCluster
from flexemr.entrypoints.roles import build_ranker, torch_threads
from flexemr.model.source import load_weights, model_spec
from flexemr.model.spec import ModelSpec
from flexemr.model.weights import build_monolithic
from flexemr.sharding.plan import make_plan


def batch(spec: ModelSpec, size: int, fraction: float, rng: np.random.Generator) -> SparseBatch:
    """Bags of each table's pooling factor, rows uniform over the table's first `fraction`."""
    lengths = np.repeat(np.asarray(spec.bag_sizes, dtype=np.int32), size)
    per_table = np.maximum((np.asarray(spec.table_rows) * fraction).astype(np.int64), 1)
    limits = np.repeat(per_table, np.asarray(spec.bag_sizes) * size)
    indices = (rng.random(limits.size) * limits).astype(np.int64)
    return SparseBatch(rng.standard_normal((size, spec.num_dense), dtype=np.float32), indices, lengths)


def measure(cluster: ClusterSpec, args: argparse.Namespace, group: Path | None) -> list[dict[str, Any]]:
    spec = model_spec(cluster.model)
    rows = []
    with LocalCluster(cluster, progress=True, cgroup=group) as local:
        ranker = build_ranker(local.spec)
        try:
            rng = np.random.default_rng(args.seed)
            first = batch(spec, args.batch, 1.0, rng)
            got = ranker.score(first.dense, first.indices, first.lengths)
            with torch.no_grad():
                tensors = (torch.from_numpy(a) for a in (first.dense, first.indices, first.lengths))
                want = build_monolithic(load_weights(cluster.model)).forward_sparse(*tensors).numpy()
            error = float(np.abs(got - want).max())
            for working_set, fraction in (("in memory", args.hot_fraction), ("all rows", 1.0)):
                latencies, looked_up = [], 0
                start = time.perf_counter()
                while time.perf_counter() - start < args.seconds:
                    request = batch(spec, args.batch, fraction, rng)
                    t0 = time.perf_counter()
                    ranker.score(request.dense, request.indices, request.lengths)
                    latencies.append(time.perf_counter() - t0)
                    looked_up += request.indices.size
                elapsed = time.perf_counter() - start
                rows.append({
                    "storage": cluster.storage.kind, "working set": f"{working_set} ({fraction:g})",
                    "lookups_per_s": looked_up / elapsed, "p50_ms": 1e3 * float(np.percentile(latencies, 50)),
                    "p99_ms": 1e3 * float(np.percentile(latencies, 99)), "max_abs_error": error,
                })  # fmt: skip
        finally:
            ranker.close()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="small settings: a smoke run")
    parser.add_argument("--preset", default="rmc1")
    parser.add_argument("--row-scale", type=float, default=0.25)
    parser.add_argument("--row-dtype", default="fp32")
    parser.add_argument("--storage-dir", required=True, help="folder for the row file (on the SSD)")
    parser.add_argument(
        "--memory-max", type=parse_bytes, help="memory cgroup limit of the server (e.g. 2GiB)"
    )
    parser.add_argument("--hot-fraction", type=float, default=0.01)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("docs/bench-ssd-tier"))
    args = parser.parse_args()
    if args.quick:
        args.row_scale, args.seconds, args.batch = 0.01, 3.0, 64
    torch_threads(1)
    source = ModelSource(
        preset=args.preset, row_scale=args.row_scale, seed=args.seed, row_dtype=args.row_dtype
    )
    spec = model_spec(source)
    plan = make_plan("table", spec.table_rows, spec.dim, 1)
    # Out of memory a batch may wait on the SSD for seconds: measure it rather than fail it.
    patient = RankerConfig(port=0, request_timeout_s=300.0)
    dram = ClusterSpec(source, plan, (Endpoint(),), patient, limits=NodeLimits(heartbeat_timeout_s=60.0))
    mmap = dataclasses.replace(dram, storage=StorageConfig("mmap", args.storage_dir))
    print(f"rows: {spec.embedding_bytes / 2**30:.2f} GiB; memory limit: {args.memory_max or 'none'}")
    results: list[dict[str, Any]] = []
    with memory_cgroup(args.memory_max) if args.memory_max else contextlib.nullcontext() as group:
        if args.memory_max and group is None:
            print("no memory cgroup can be made here: running unlimited (the file stays in the page cache)")
        if not args.memory_max or spec.embedding_bytes < args.memory_max:
            results += measure(dram, args, group)
        results += measure(mmap, args, group)
    keys = list(results[0])
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += [
        "| " + " | ".join(f"{v:.4g}" if isinstance(v, float) else str(v) for v in r.values()) + " |"
        for r in results
    ]
    report = f"rows {spec.embedding_bytes / 2**30:.2f} GiB, memory limit {args.memory_max}\n\n" + "\n".join(
        lines
    )
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "report.md").write_text(report + "\n")
    (args.out / "results.json").write_text(json.dumps(results, indent=2))
    print(report)


if __name__ == "__main__":
    main()
