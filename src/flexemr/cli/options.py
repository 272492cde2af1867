"""Flags shared by the commands that build a model, a plan and a ranker config."""

from __future__ import annotations

import argparse
import dataclasses

from flexemr.cache.sizes import parse_bytes
from flexemr.config import (
    ClusterSpec,
    Endpoint,
    EngineConfig,
    ModelSource,
    RankerConfig,
    SecurityConfig,
    StorageConfig,
)
from flexemr.model.presets import PRESET_NAMES
from flexemr.sharding.plan import STRATEGIES, ShardingPlan, make_plan, replicated


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--checkpoint",
        help="Meta's reference DLRM_Net state_dict or --save-model file, or a TorchRec DLRM state_dict",
    )
    source.add_argument("--preset", choices=PRESET_NAMES, help="a named model with seeded random weights")
    parser.add_argument(
        "--row-scale", type=float, default=ModelSource.row_scale, help="scale a preset's table rows (0, 1]"
    )
    parser.add_argument("--seed", type=int, default=ModelSource.seed, help="seed of a preset's weights")
    parser.add_argument("--interaction", choices=("dot", "cat"), help="default: the preset's, or dot")
    parser.add_argument(
        "--interaction-itself", action="store_true", default=None, help="dot: include self-interactions"
    )
    parser.add_argument("--pooling", choices=("sum", "mean"), help="default: the preset's, or sum")
    parser.add_argument(
        "--row-dtype",
        help="how rows are stored: fp32, fp16 or int8 (row-wise quantised), or one per table "
        "comma-separated (default fp32; a checkpoint's fp16 tables stay fp16)",
    )


def add_cluster_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--embedding-servers", type=int, default=2, help="number of embedding servers")
    parser.add_argument(
        "--sharding",
        choices=STRATEGIES,
        default="auto",
        help="whole tables per server (table), every table split over all servers (row), or table "
        "when that balances bytes within 10%%, else row (auto)",
    )
    parser.add_argument("--plan", help="a sharding plan file (from `flexemr plan`), instead of --sharding")
    parser.add_argument(
        "--replicas", type=int, default=1,
        help="copies of each server's shards, each on its own server (R x the servers); the ranker "
        "balances over them and fails over between them",
    )  # fmt: skip
    parser.add_argument("--lookup", choices=("partial", "raw"), default="partial", help="server-side pooling")
    parser.add_argument("--host", default="127.0.0.1", help="the ranker's HTTP address")
    parser.add_argument(
        "--server-host", default="127.0.0.1", help="address the embedding servers listen on (never --host)"
    )
    add_secret_argument(parser)
    parser.add_argument("--port", type=int, default=8000, help="HTTP port (0: any free port)")
    parser.add_argument(
        "--grpc-port", type=int, default=None, help="also serve KServe v2 gRPC here (0: any free port)"
    )
    parser.add_argument("--model-name", default="dlrm")
    parser.add_argument("--max-batch", type=int, default=RankerConfig.max_batch)
    parser.add_argument("--device", default="auto", help="dense model device: auto, cpu, cuda, cuda:1")
    parser.add_argument(
        "--cache",
        default="off",
        help="embedding cache on the ranker: off, fixed:BYTES (fixed:64MiB), adaptive",
    )
    parser.add_argument(
        "--device-memory", type=parse_bytes, default=None,
        help="bytes the dense model and cache share (default: GPU free memory, or 1/4 of RAM on CPU)",
    )  # fmt: skip
    parser.add_argument("--batch-window-ms", type=float, default=0.0, help="dynamic batching window (0: off)")
    parser.add_argument(
        "--max-in-flight", type=int, default=None,
        help="admission bound: samples in flight before requests get 429 (default: 2 x --max-batch)",
    )  # fmt: skip
    parser.add_argument(
        "--deadline-ms", type=float, default=RankerConfig.deadline_s * 1000,
        help="a request's default deadline (header Flexemr-Timeout-Ms overrides); expired work is dropped",
    )  # fmt: skip
    parser.add_argument(
        "--max-body", type=parse_bytes, default=RankerConfig.max_body_bytes,
        help="largest request body, chunked too (413 beyond it)",
    )  # fmt: skip
    parser.add_argument(
        "--storage", choices=("dram", "mmap"), default="dram",
        help="embedding servers keep rows in memory, or in a file they memory-map (SSD tier)",
    )  # fmt: skip
    parser.add_argument("--storage-dir", help="--storage mmap: folder of the row files (reused on restart)")
    add_engine_arguments(parser)


def add_secret_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--secret-file",
        help="file holding the shared secret of node links (default: $FLEXEMR_SECRET; serve makes one)",
    )


def with_secret_file(spec: ClusterSpec, path: str | None) -> ClusterSpec:
    """`spec` with `--secret-file` (when given) in place of its own."""
    if path is None:
        return spec
    return dataclasses.replace(spec, security=dataclasses.replace(spec.security, secret_file=path))


def add_engine_arguments(parser: argparse.ArgumentParser) -> None:
    """The ranker's I/O engine (`flexemr.engine`); the defaults are the best measured combination.

    The flags default to absent (SUPPRESS), so only flags actually given override a base config,
    e.g. a spec file's engine section (`flexemr ranker --spec`)."""
    defaults = EngineConfig()
    absent = argparse.SUPPRESS
    parser.add_argument(
        "--engine",
        choices=("mapped", "shared", "single"),
        default=absent,
        help="I/O engine: mapped (thread-owned connections), shared (locked), single (one thread)"
        f"{_default(defaults.mode)}",
    )
    parser.add_argument(
        "--io-threads", type=int, default=absent, help=f"I/O threads{_default(defaults.io_threads)}"
    )
    parser.add_argument(
        "--connections-per-server",
        type=int,
        default=absent,
        help=f"data connections per embedding server (0: auto){_default(defaults.connections_per_server)}",
    )
    parser.add_argument(
        "--credits",
        choices=("priority", "piggyback", "off"),
        default=absent,
        help="flow control: credits on a priority control channel, piggybacked on lookups, or off"
        f"{_default(defaults.credits)}",
    )
    parser.add_argument(
        "--migration",
        choices=("on", "off"),
        default=absent,
        help="move connections between I/O threads under skew"
        f"{_default('on' if defaults.migration else 'off')}",
    )


def _default(value: object) -> str:
    return f" (default: {value}, or a spec file's)"


def engine_config(args: argparse.Namespace, base: EngineConfig | None = None) -> EngineConfig:
    """The engine config from the flags given, over `base` (e.g. a spec file's) for the others."""
    base = base or EngineConfig()
    return dataclasses.replace(
        base,
        mode=getattr(args, "engine", base.mode),
        io_threads=getattr(args, "io_threads", base.io_threads),
        connections_per_server=getattr(args, "connections_per_server", base.connections_per_server),
        credits=getattr(args, "credits", base.credits),
        migration=getattr(args, "migration", "on" if base.migration else "off") == "on",
    )


def model_source(args: argparse.Namespace) -> ModelSource:
    return ModelSource(
        preset=args.preset,
        row_scale=args.row_scale,
        seed=args.seed,
        checkpoint=args.checkpoint,
        interaction=args.interaction,
        interaction_itself=args.interaction_itself,
        pooling=args.pooling,
        row_dtype=args.row_dtype,
    )


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
    spec = source.spec()
    if args.plan:
        from flexemr.planner import load_sharding

        plan: ShardingPlan = load_sharding(args.plan)
        check_plan_model(plan, spec.table_rows, spec.dim, args.plan)
    else:
        plan = make_plan(args.sharding, spec.table_rows, spec.dim, args.embedding_servers)
    plan = replicated(plan, args.replicas)
    ranker = RankerConfig(
        host=args.host,
        port=args.port,
        grpc_port=args.grpc_port,
        model_name=args.model_name,
        lookup=args.lookup,
        max_batch=args.max_batch,
        device=args.device,
        batch_window_ms=args.batch_window_ms,
        cache=args.cache,
        device_memory_bytes=args.device_memory,
        max_in_flight_samples=args.max_in_flight,
        deadline_s=args.deadline_ms / 1000,
        max_body_bytes=args.max_body,
    )
    endpoints = tuple(Endpoint(args.server_host, 0) for _ in range(plan.num_servers))
    return ClusterSpec(
        model=source,
        sharding=plan,
        embedding_servers=endpoints,
        ranker=ranker,
        engine=engine_config(args),
        security=SecurityConfig(secret_file=args.secret_file),
        storage=StorageConfig(args.storage, args.storage_dir),
    )
