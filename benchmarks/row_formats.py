"""Row formats (fp32, fp16, int8 and int4 row-wise): what they cost in accuracy, memory, speed and money.

drift    The Criteo Kaggle sample (../shared/data/criteo_kaggle_sample_1000.tsv) scored by the
         monolithic model with each format's stored rows, against fp32: max and mean |score drift|,
         and the AUC and log loss of each against the labels. The weights are the seeded preset
         weights (no trained Criteo model ships with flexemr), so the AUCs sit near 0.5: the drift is
         the finding; with a trained checkpoint pass --checkpoint to measure the AUC change that
         matters. Then the same drift on `--preset` (synthetic batches, no labels).
serving  One local cluster per format (`--preset`, `--row-scale`, `--embedding-servers`): bytes of
         rows per server, each server's anonymous RSS, and rows/s and samples/s of back-to-back
         batches through the ranker (partial pooling), scores checked against the same-format
         monolithic model on the first batch.
memory   One embedding server holding all of `--memory-preset` x `--memory-row-scale` (rows big
         enough that they, not the interpreter, fill the process) per `--memory-formats`: its
         anonymous RSS, and each format's RSS over int8's.
pooling  The pooling kernels alone, one thread: rows/s summing bags of `--bag` random rows of a
         table of `--pool-rows` rows, per format and dim.
planner  `flexemr plan`'s cheapest cluster for rmc1 and dlrm-v2 with each format (--calibration, or
         the labelled defaults).

    .venv/bin/python benchmarks/row_formats.py --quick          # about a minute
    .venv/bin/python benchmarks/row_formats.py --row-scale 0.05 --seconds 20 --calibration cal.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from flexemr.batch import SparseBatch
from flexemr.config import Endpoint
from flexemr.config.model import ROW_FORMATS, ModelSource
from flexemr.config.spec import ClusterSpec
from flexemr.entrypoints.local import LocalCluster
from flexemr.entrypoints.roles import build_ranker, torch_threads
from flexemr.model import rows as stored_rows
from flexemr.model.presets import preset
from flexemr.model.source import load_weights, model_spec
from flexemr.model.weights import CheckpointWeights, PresetWeights, WeightSource, build_monolithic
from flexemr.planner import (
    Availability,
    ModelProfile,
    PlanningError,
    PlanRequest,
    Traffic,
    default_calibration,
    load_calibration,
    load_catalog,
    plan,
)
from flexemr.sharding.plan import make_plan
from flexemr.workload.criteo import CriteoReplay, criteo_spec
from flexemr.workload.synthetic import SyntheticWorkload

CRITEO = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "criteo_kaggle_sample_1000.tsv"


def auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve (Mann-Whitney U, ties counted half)."""
    pos, neg = scores[labels == 1], scores[labels == 0]
    if not pos.size or not neg.size:
        return float("nan")
    greater = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    return float(greater / (pos.size * neg.size))


def logloss(labels: np.ndarray, scores: np.ndarray) -> float:
    """Mean binary cross-entropy of click probabilities `scores` against `labels`."""
    p = np.clip(scores.astype(np.float64), 1e-7, 1 - 1e-7)
    return float(-np.mean(labels * np.log(p) + (1 - labels) * np.log(1 - p)))


def _scores_per_format(base: WeightSource, request: SparseBatch) -> dict[str, np.ndarray]:
    """The monolithic model's scores of `request` with `base`'s tables stored in each format."""
    scores: dict[str, np.ndarray] = {}
    for fmt in ROW_FORMATS:
        base.spec = base.spec.with_overrides(row_formats=(fmt,) * base.spec.num_tables)
        model = build_monolithic(base)
        with torch.no_grad():
            scores[fmt] = model.forward_sparse(
                torch.from_numpy(request.dense),
                torch.from_numpy(request.indices),
                torch.from_numpy(request.lengths),
            ).numpy()
        del model
    return scores


def drift(args: argparse.Namespace) -> list[dict[str, Any]]:
    base: WeightSource
    if args.checkpoint:
        base = CheckpointWeights(args.checkpoint)
    else:
        base = PresetWeights(criteo_spec(args.criteo_rows, dim=16), seed=args.seed)
    replay = CriteoReplay(args.criteo, base.spec)
    scores = _scores_per_format(base, replay.all)
    rows = []
    for fmt in ROW_FORMATS:
        diff = np.abs(scores[fmt] - scores["fp32"])
        rows.append({"model": "criteo sample", "format": fmt, "max_drift": float(diff.max()),
                     "mean_drift": float(diff.mean()), "auc": auc(replay.labels, scores[fmt]),
                     "logloss": logloss(replay.labels, scores[fmt])})  # fmt: skip
    spec = model_spec(ModelSource(preset=args.preset, row_scale=args.row_scale))
    workload = SyntheticWorkload(spec, seed=args.seed)
    scores = _scores_per_format(PresetWeights(spec, seed=args.seed), workload.generate(args.drift_samples))
    for fmt in ROW_FORMATS:
        diff = np.abs(scores[fmt] - scores["fp32"])
        rows.append({"model": f"{args.preset} x{args.row_scale:g}", "format": fmt,
                     "max_drift": float(diff.max()), "mean_drift": float(diff.mean()),
                     "auc": "-", "logloss": "-"})  # fmt: skip
    return rows


def _rss_anon(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024
    return 0


def serving(args: argparse.Namespace) -> list[dict[str, Any]]:
    torch_threads(1)
    rows = []
    for fmt in ROW_FORMATS:
        source = ModelSource(preset=args.preset, row_scale=args.row_scale, seed=args.seed, row_dtype=fmt)
        spec = model_spec(source)
        plan_ = make_plan("row", spec.table_rows, spec.dim, args.embedding_servers)
        cluster = ClusterSpec(source, plan_, tuple(Endpoint() for _ in range(args.embedding_servers)))
        workload = SyntheticWorkload(spec, seed=args.seed)
        with LocalCluster(cluster) as local:
            rss = [_rss_anon(pid) for pid in local.pids]
            ranker = build_ranker(local.spec)
            try:
                first = workload.generate(args.batch)
                reference = build_monolithic(load_weights(source))
                with torch.no_grad():
                    want = reference.forward_sparse(
                        *(torch.from_numpy(a) for a in (first.dense, first.indices, first.lengths))
                    )
                got = ranker.score(first.dense, first.indices, first.lengths)
                error = float(np.abs(got - want.numpy()).max())
                del reference
                batches = [workload.generate(args.batch) for _ in range(8)]
                done = looked_up = 0
                start = time.perf_counter()
                while time.perf_counter() - start < args.seconds:
                    request = batches[done % len(batches)]
                    ranker.score(request.dense, request.indices, request.lengths)
                    done += 1
                    looked_up += request.indices.size
                elapsed = time.perf_counter() - start
            finally:
                ranker.close()
        stored = stored_rows.row_bytes(fmt, spec.dim)
        rows.append({
            "format": fmt, "bytes_per_row": stored,
            "row_bytes_per_server": [plan_.server_rows(s) * stored for s in range(len(rss))],
            "rss_anon_per_server": rss, "rows_per_s": looked_up / elapsed,
            "samples_per_s": done * args.batch / elapsed, "max_abs_error": error,
        })  # fmt: skip
    return rows


def memory(args: argparse.Namespace) -> list[dict[str, Any]]:
    rows = []
    for fmt in args.memory_formats.split(","):
        source = ModelSource(preset=args.memory_preset, row_scale=args.memory_row_scale, seed=args.seed,
                             row_dtype=fmt)  # fmt: skip
        spec = model_spec(source)
        plan_ = make_plan("table", spec.table_rows, spec.dim, 1)
        with LocalCluster(ClusterSpec(source, plan_, (Endpoint(),))) as local:
            rss = _rss_anon(local.pids[0])
        rows.append({"format": fmt, "rows": sum(spec.table_rows), "dim": spec.dim,
                     "row_bytes": spec.embedding_bytes, "rss_anon": rss})  # fmt: skip
    int8 = next((r for r in rows if r["format"] == "int8"), None)
    for row in rows:
        row["rss_over_int8"] = row["rss_anon"] / int8["rss_anon"] if int8 else "-"
        row["row_bytes_over_int8"] = row["row_bytes"] / int8["row_bytes"] if int8 else "-"
    return rows


def pooling(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Formats take turns, `--pool-rounds` rounds of `--pool-seconds` each: on a shared machine a
    burst of other work then falls on every format alike; the median round is reported."""
    torch_threads(1)
    rng = np.random.default_rng(args.seed)
    rows = []
    for dim in (32, 128):
        values = (rng.random((args.pool_rows, dim), dtype=np.float32) * 2 - 1) / 100
        indices = torch.from_numpy(rng.integers(0, args.pool_rows, size=args.pool_bags * args.bag))
        offsets = torch.arange(0, indices.numel(), args.bag)
        tables = {}
        for fmt in ROW_FORMATS:
            dtype, width = stored_rows.storage(fmt, dim)
            table = np.empty((args.pool_rows, width), dtype=dtype)
            stored_rows.encode(values, fmt, table)
            tables[fmt] = torch.from_numpy(table)
            stored_rows.pool(tables[fmt], fmt, indices, offsets)  # warm up
        rates: dict[str, list[float]] = {fmt: [] for fmt in ROW_FORMATS}
        for _ in range(args.pool_rounds):
            for fmt in ROW_FORMATS:
                done, start = 0, time.perf_counter()
                while time.perf_counter() - start < args.pool_seconds:
                    stored_rows.pool(tables[fmt], fmt, indices, offsets)
                    done += 1
                rates[fmt].append(done * indices.numel() / (time.perf_counter() - start))
        for fmt in ROW_FORMATS:
            mib = tables[fmt].numel() * tables[fmt].element_size() / 2**20
            rate = float(np.median(rates[fmt]))
            rows.append({"dim": dim, "format": fmt, "table_mib": mib, "rows_per_s": rate,
                         "min": min(rates[fmt]), "max": max(rates[fmt])})  # fmt: skip
    return rows


def planner(args: argparse.Namespace) -> list[dict[str, Any]]:
    calibration = load_calibration(args.calibration) if args.calibration else default_calibration()
    catalog = load_catalog()
    rows = []
    for name in ("rmc1", "dlrm-v2"):
        for fmt in ROW_FORMATS:
            spec = preset(name)
            model = ModelProfile(spec.with_overrides(row_formats=(fmt,) * spec.num_tables))
            request = PlanRequest(model, Traffic(args.qps, 64.0), args.p99_ms, Availability(0, 0), True)
            try:
                result = plan(request, catalog, calibration)
                dep = result.chosen.deployment
                chosen = f"{dep.servers} x {dep.server_type.name} + {dep.rankers} x {dep.ranker_type.name}"
                cost = f"{dep.cost_per_hour:.3f}"
            except PlanningError as exc:  # a request no plan meets is a row of the table too
                chosen, cost = str(exc).splitlines()[0], "-"
            gib = model.embedding_bytes / 2**30
            rows.append(
                {
                    "model": name,
                    "format": fmt,
                    "embedding_gib": gib,
                    "usd_per_hour": cost,
                    "servers + rankers": chosen,
                }
            )
    return rows


def _table(rows: list[dict[str, Any]]) -> str:
    keys = list(rows[0])
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    for row in rows:
        cells = [f"{v:.4g}" if isinstance(v, float) else str(v) for v in row.values()]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="small settings: a smoke run")
    parser.add_argument("--criteo", type=Path, default=CRITEO)
    parser.add_argument("--criteo-rows", type=int, default=100_000, help="rows per Criteo table (hashed)")
    parser.add_argument("--checkpoint", help="a trained Criteo DLRM checkpoint for the drift (26 tables)")
    parser.add_argument("--preset", default="rmc1")
    parser.add_argument("--row-scale", type=float, default=0.05)
    parser.add_argument("--embedding-servers", type=int, default=2)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--calibration", help="file from `flexemr calibrate` (default: labelled defaults)")
    parser.add_argument("--qps", type=float, default=1000.0)
    parser.add_argument("--p99-ms", type=float, default=50.0)
    parser.add_argument(
        "--drift-samples", type=int, default=4096, help="synthetic samples for the preset's drift"
    )
    parser.add_argument("--memory-preset", default="rmc1")
    parser.add_argument("--memory-row-scale", type=float, default=1.0, help="rmc1 x1: 32 M rows of dim 32")
    parser.add_argument(
        "--memory-formats", default="int8,int4", help="comma-separated; fp32 at x1 is 3.8 GiB"
    )
    parser.add_argument("--pool-rows", type=int, default=1_000_000, help="rows of the pooling kernels' table")
    parser.add_argument("--pool-bags", type=int, default=4096)
    parser.add_argument("--bag", type=int, default=20, help="rows per bag in the pooling kernels")
    parser.add_argument("--pool-seconds", type=float, default=1.0, help="one round of one format")
    parser.add_argument("--pool-rounds", type=int, default=9)
    parser.add_argument("--sections", default="drift,serving,memory,pooling,planner")
    parser.add_argument("--out", type=Path, default=Path("docs/bench-row-formats"))
    args = parser.parse_args()
    if args.quick:
        args.row_scale, args.seconds, args.criteo_rows, args.batch = 0.005, 3.0, 10_000, 64
        args.memory_row_scale, args.pool_rows, args.pool_seconds, args.drift_samples = 0.01, 10_000, 0.1, 256
    sections = {"drift": drift, "serving": serving, "memory": memory, "pooling": pooling, "planner": planner}
    results = {name: sections[name](args) for name in args.sections.split(",")}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(
        json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, **results}, indent=2)
    )
    report = "\n\n".join(f"## {name}\n\n{_table(rows)}" for name, rows in results.items())
    (args.out / "report.md").write_text(report + "\n")
    print(report)


if __name__ == "__main__":
    main()
