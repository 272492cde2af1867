"""Making sharding plans (`flexemr.config.plan.ShardingPlan`): whole tables per server, every table
split in row ranges over all servers, or the one of the two that balances bytes; every table's
columns cut into blocks, placed like whole tables or each split in row ranges over a group of
servers; and copies."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from flexemr.config import flag
from flexemr.config.plan import Shard, ShardingPlan

Strategy = Literal["auto", "table", "row", "column", "column-row"]
STRATEGIES: tuple[Strategy, ...] = ("auto", "table", "row", "column", "column-row")
AUTO_IMBALANCE = 1.1
"""`auto` keeps tables whole while no server holds more than this times the mean bytes."""


def with_local_offsets(shards: list[Shard]) -> tuple[Shard, ...]:
    """Lay each server's shards back to back, in (table, column, row) order."""
    placed: list[Shard] = []
    next_free: dict[int, int] = {}
    for s in sorted(shards, key=lambda s: (s.server, s.table, s.col_start, s.row_start)):
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


def column_cuts(dim: int, blocks: int) -> list[tuple[int, int]]:
    """`blocks` near-equal column ranges of rows `dim` wide, cut at even columns where `dim` is even
    (so that int4 rows, two values a byte, can be cut too)."""
    step = 2 if dim % 2 == 0 else 1
    if not 1 <= blocks <= dim // step:
        raise ValueError(f"column shards must be between 1 and {dim // step} for dim {dim}, got {blocks}")
    cuts = (np.linspace(0, dim // step, blocks + 1).round().astype(np.int64) * step).tolist()
    return list(zip(cuts[:-1], cuts[1:], strict=True))


def column_wise(table_rows: tuple[int, ...], dim: int, num_servers: int, blocks: int) -> ShardingPlan:
    """Every table's columns cut into `blocks` blocks, each placed like a whole table (largest
    first, onto the server holding the fewest bytes so far): column-wise (CW) for one table over
    `blocks` servers, table-wise column-wise (TWCW) for several."""
    load = [0] * num_servers
    shards = []
    pieces = [(t, first, last) for t in range(len(table_rows)) for first, last in column_cuts(dim, blocks)]
    for t, first, last in sorted(pieces, key=lambda p: -table_rows[p[0]] * (p[2] - p[1])):
        server = min(range(num_servers), key=lambda s: (load[s], s))
        load[server] += table_rows[t] * (last - first)
        shards.append(Shard(t, 0, table_rows[t], server, col_start=first, col_end=last))
    return ShardingPlan(num_servers, table_rows, dim, with_local_offsets(shards), strategy="column")


def column_row_wise(table_rows: tuple[int, ...], dim: int, num_servers: int, blocks: int) -> ShardingPlan:
    """Every table's columns cut into `blocks` blocks; the servers into as many near-equal groups;
    block g of every table split in near-equal row ranges over group g (CW+RW): a bag goes to one
    server per block, and each server holds the same share of its block's rows."""
    if blocks > num_servers:
        raise ValueError(f"column-row sharding needs at least {blocks} servers (one per column shard)")
    groups = np.linspace(0, num_servers, blocks + 1).round().astype(np.int64).tolist()
    shards: list[Shard] = []
    for g, (first, last) in enumerate(column_cuts(dim, blocks)):
        servers = range(groups[g], groups[g + 1])
        for t, rows in enumerate(table_rows):
            cuts = np.linspace(0, rows, len(servers) + 1).round().astype(np.int64)
            shards.extend(
                Shard(t, int(cuts[i]), int(cuts[i + 1]), server, col_start=first, col_end=last)
                for i, server in enumerate(servers)
                if cuts[i + 1] > cuts[i]
            )
    return ShardingPlan(num_servers, table_rows, dim, with_local_offsets(shards), strategy="column-row")


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


def make_plan(
    strategy: Strategy, table_rows: tuple[int, ...], dim: int, num_servers: int, column_shards: int = 2
) -> ShardingPlan:
    """`auto`: table-wise when that balances bytes (a whole table costs the ranker no per-key
    routing and each bag one server), else row-wise. `column` and `column-row` cut every table's
    columns into `column_shards` blocks."""
    if strategy == "auto":
        plan = table_wise(table_rows, dim, num_servers)
        sizes = plan.server_bytes()
        balanced = max(sizes) <= AUTO_IMBALANCE * sum(sizes) / num_servers
        return plan if balanced else row_wise(table_rows, dim, num_servers)
    if strategy == "table":
        return table_wise(table_rows, dim, num_servers)
    if strategy == "row":
        return row_wise(table_rows, dim, num_servers)
    if strategy == "column":
        return column_wise(table_rows, dim, num_servers, column_shards)
    if strategy == "column-row":
        return column_row_wise(table_rows, dim, num_servers, column_shards)
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
            "that balances bytes within 10% of the mean, else row (auto); every table's columns cut "
            "into --column-shards blocks, each placed like a whole table (column), or block g split "
            "over the g-th group of servers (column-row)",
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

    column_shards: int = field(
        default=2,
        metadata=flag(
            "--column-shards",
            "column blocks per table with --sharding column or column-row (near-equal widths)",
        ),
    )

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise ValueError(f"sharding must be one of {', '.join(STRATEGIES)}, got {self.strategy!r}")
        if self.embedding_servers < 1 or self.replicas < 1 or self.column_shards < 1:
            raise ValueError(
                f"embedding_servers, replicas and column_shards must be at least 1, got "
                f"{self.embedding_servers}, {self.replicas}, {self.column_shards}"
            )

    def plan(self, table_rows: tuple[int, ...], dim: int) -> ShardingPlan:
        """The plan of these settings for tables of `table_rows` rows of `dim` columns."""
        base = make_plan(self.strategy, table_rows, dim, self.embedding_servers, self.column_shards)
        return replicated(base, self.replicas)
