"""Flags shared by the commands that build a model, a plan and a ranker config."""

from __future__ import annotations

import argparse
import dataclasses
from collections import Counter

from flexemr.cli.flags import add_flags, given, over
from flexemr.config import (
    Endpoint,
    EngineConfig,
    NodeLimits,
    RankerConfig,
    SecurityConfig,
    StorageConfig,
    UpdatesConfig,
)
from flexemr.config.model import ModelSource
from flexemr.config.plan import ShardingPlan
from flexemr.config.spec import ClusterSpec
from flexemr.model.presets import PRESET_NAMES
from flexemr.model.rows import row_bytes
from flexemr.model.source import model_spec
from flexemr.model.spec import DEFAULT_ZIPF_SKEW, ModelSpec
from flexemr.sharding.plan import ShardingConfig, replicated


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--checkpoint",
        help="Meta's reference DLRM_Net state_dict or --save-model file, or a TorchRec DLRM state_dict",
    )
    source.add_argument("--preset", choices=PRESET_NAMES, help="a named model with seeded random weights")
    add_flags(parser, ModelSource)


def add_sharding_arguments(parser: argparse.ArgumentParser) -> None:
    add_flags(parser, ShardingConfig)


def sharding_plan(args: argparse.Namespace, table_rows: tuple[int, ...], dim: int) -> ShardingPlan:
    """The plan the sharding flags ask for, for tables of `table_rows` rows of `dim` columns."""
    return over(ShardingConfig(), args).plan(table_rows, dim)


def add_zipf_skew_argument(parser: argparse.ArgumentParser) -> None:
    """The workload's Zipf exponent, one flag under `plan`'s name and `bench`'s and `demo`'s."""
    parser.add_argument(
        "--zipf-skew", "--alpha", dest="zipf_skew", type=float, default=DEFAULT_ZIPF_SKEW,
        help="Zipf exponent of row popularity, 0: uniform (--alpha and --zipf-skew are the same)",
    )  # fmt: skip


def add_cluster_arguments(parser: argparse.ArgumentParser) -> None:
    add_sharding_arguments(parser)
    parser.add_argument(
        "--plan",
        help="a sharding plan file (from `flexemr plan`), instead of --sharding (--replicas still apply)",
    )
    parser.add_argument(
        "--server-host", default="127.0.0.1", help="address the embedding servers listen on (never --host)"
    )
    for family in (RankerConfig, EngineConfig, StorageConfig, UpdatesConfig, SecurityConfig, NodeLimits):
        add_flags(parser, family)


def add_secret_argument(parser: argparse.ArgumentParser) -> None:
    add_flags(parser, SecurityConfig)


def with_secret_file(spec: ClusterSpec, args: argparse.Namespace) -> ClusterSpec:
    """`spec` with `--secret-file` (when given) in place of its own."""
    return dataclasses.replace(spec, security=over(spec.security, args))


def model_source(args: argparse.Namespace) -> ModelSource:
    return ModelSource(preset=args.preset, checkpoint=args.checkpoint, **given(args, ModelSource))


def check_plan_model(plan: ShardingPlan, table_rows: tuple[int, ...], dim: int, path: str) -> None:
    """Refuse a plan made for another model, saying exactly what differs."""
    differences = []
    if plan.dim != dim:
        differences.append(f"embedding dim {plan.dim} in the plan, {dim} in this model")
    if len(plan.table_rows) != len(table_rows):
        differences.append(f"{len(plan.table_rows)} tables in the plan, {len(table_rows)} in this model")
    else:
        differ = [t for t, (a, b) in enumerate(zip(plan.table_rows, table_rows, strict=True)) if a != b]
        if differ:
            t = differ[0]
            ratio = table_rows[t] / plan.table_rows[t]
            differences.append(
                f"rows of {len(differ)} table(s) differ, e.g. table {t}: {plan.table_rows[t]} in the plan, "
                f"{table_rows[t]} in this model (x{ratio:.4g}: plan and serve with the same --row-scale)"
            )
    if differences:
        raise ValueError(f"the plan in {path} was made for another model: " + "; ".join(differences))


def cluster_spec(args: argparse.Namespace) -> ClusterSpec:
    source = model_source(args)
    spec = model_spec(source)
    if args.plan:
        from flexemr.planner import load_sharding

        plan: ShardingPlan = load_sharding(args.plan)
        check_plan_model(plan, spec.table_rows, spec.dim, args.plan)
        plan = replicated(plan, over(ShardingConfig(), args).replicas)
    else:
        plan = sharding_plan(args, spec.table_rows, spec.dim)
    endpoints = tuple(Endpoint(args.server_host, 0) for _ in range(plan.num_servers))
    return ClusterSpec(
        model=source,
        sharding=plan,
        embedding_servers=endpoints,
        ranker=over(RankerConfig(), args),
        engine=over(EngineConfig(), args),
        security=over(SecurityConfig(), args),
        storage=over(StorageConfig(), args),
        updates=over(UpdatesConfig(), args),
        limits=over(NodeLimits(), args),
    )


def describe_plan(plan: ShardingPlan, model: ModelSpec, storage: StorageConfig | None = None) -> str:
    """The plan with the bytes each server stores, rows in the model's formats, and where (`storage`:
    in DRAM or in files the servers memory-map; None: not said)."""
    counts = Counter(model.formats)
    formats = next(iter(counts)) if len(counts) == 1 else ", ".join(f"{f} x{n}" for f, n in counts.items())
    stored = f"rows stored as {formats}"
    if storage is not None:
        stored += " in DRAM" if storage.kind == "dram" else f" in mmap files under {storage.directory}"
    return plan.describe(lambda table, width: row_bytes(model.formats[table], width), stored)
