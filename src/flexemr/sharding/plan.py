"""Making sharding plans (`flexemr.config.plan.ShardingPlan`): whole tables per server, every table
split in row ranges over all servers, or the one of the two that balances bytes; and copies."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from flexemr.config import flag
from flexemr.config.plan import Shard, ShardingPlan

Strategy = Literal["auto", "table", "row"]
STRATEGIES: tuple[Strategy, ...] = ("auto", "table", "row")
AUTO_IMBALANCE = 1.1
"""`auto` keeps tables whole while no server holds more than this times the mean bytes."""


def with_local_offsets(shards: list[Shard]) -> tuple[Shard, ...]:
    """Lay each server's shards back to back, in (table, row) order."""
    placed: list[Shard] = []
    next_free: dict[int, int] = {}
    for s in sorted(shards, key=lambda s: (s.server, s.table, s.row_start)):
        placed.append(dataclasses.replace(s, local_start=next_free.get(s.server, 0)))
        next_free[s.server] = next_free.get(s.server, 0) + s.rows
    return tuple(placed)


def table_wise(table_rows: tuple[int, ...], dim: int, num_servers: int) -> ShardingPlan:
    """Whole tables, largest first, each onto the server holding the fewest bytes so far."""
    load = [0] * num_servers
    shards = []
    for t in sorted(range(len(table_rows)), key=lambda t: -table_rows[t]):
        server = min(range(num_servers), key=lambda s: (load[s], s))
        load[server] += table_rows[t]
        shards.append(Shard(t, 0, table_rows[t], server))
    return ShardingPlan(num_servers, table_rows, dim, with_local_offsets(shards), strategy="table")


def row_wise(table_rows: tuple[int, ...], dim: int, num_servers: int) -> ShardingPlan:
    """Every table cut into `num_servers` contiguous, near-equal row ranges (equal bytes, since all
    rows have one size), so each server holds the same share of every table and of its traffic."""
    shards: list[Shard] = []
    for t, rows in enumerate(table_rows):
        cuts = np.linspace(0, rows, num_servers + 1).round().astype(np.int64)
        shards.extend(
            Shard(t, int(cuts[s]), int(cuts[s + 1]), s) for s in range(num_servers) if cuts[s + 1] > cuts[s]
        )
    return ShardingPlan(num_servers, table_rows, dim, with_local_offsets(shards), strategy="row")


def replicated(plan: ShardingPlan, copies: int) -> ShardingPlan:
    """`copies` replica sets of `plan`: set r holds, on servers r*n .. r*n+n-1, what servers
    0 .. n-1 hold in `plan`, at the same local offsets."""
    if copies < 1:
        raise ValueError(f"replicas must be at least 1, got {copies}")
    n = plan.num_servers
    shards = tuple(
        dataclasses.replace(s, server=s.server + r * n) for r in range(copies) for s in plan.shards
    )
    return dataclasses.replace(plan, num_servers=n * copies, shards=shards, replicas=plan.replicas * copies)


def make_plan(strategy: Strategy, table_rows: tuple[int, ...], dim: int, num_servers: int) -> ShardingPlan:
    """`auto`: table-wise when that balances bytes (a whole table costs the ranker no per-key
    routing and each bag one server), else row-wise."""
    if strategy == "auto":
        plan = table_wise(table_rows, dim, num_servers)
        sizes = plan.server_bytes()
        balanced = max(sizes) <= AUTO_IMBALANCE * sum(sizes) / num_servers
        return plan if balanced else row_wise(table_rows, dim, num_servers)
    if strategy == "table":
        return table_wise(table_rows, dim, num_servers)
    if strategy == "row":
        return row_wise(table_rows, dim, num_servers)
    raise ValueError(f"sharding must be one of {', '.join(STRATEGIES)}, got {strategy!r}")


@dataclass(frozen=True)
class ShardingConfig:
    """How a model is sharded when no plan file is given (`make_plan`), and its copies."""

    embedding_servers: int = field(
        default=2, metadata=flag("--embedding-servers", "number of embedding servers (per copy)")
    )
    strategy: Strategy = field(
        default="auto",
        metadata=flag(
            "--sharding",
            "whole tables per server (table), every table split over all servers (row), or table when "
            "that balances bytes within 10% of the mean, else row (auto)",
        ),
    )
    replicas: int = field(
        default=1,
        metadata=flag(
            "--replicas",
            "copies of each server's shards, each on its own server (R x the servers); the ranker "
            "balances over them and fails over between them",
        ),
    )

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise ValueError(f"sharding must be one of {', '.join(STRATEGIES)}, got {self.strategy!r}")
        if self.embedding_servers < 1 or self.replicas < 1:
            raise ValueError(
                f"embedding_servers and replicas must be at least 1, got {self.embedding_servers}, "
                f"{self.replicas}"
            )

    def plan(self, table_rows: tuple[int, ...], dim: int) -> ShardingPlan:
        """The plan of these settings for tables of `table_rows` rows of `dim` columns."""
        return replicated(make_plan(self.strategy, table_rows, dim, self.embedding_servers), self.replicas)
