"""Where table rows live: chunks of rows, each copied onto `replicas` distinct embedding servers.

Two strategies, both balanced by traffic and by bytes:

* "table": whole tables, except that a table bigger than an even share of the model is cut into
  row ranges no bigger than that share; chunks go, largest first, onto the servers whose
  max(bytes share, load share) stays lowest (longest-processing-time greedy), copies on distinct
  servers.
* "row": every table cut into `num_servers` near-equal row ranges; range i lives on servers
  i+o, i+o+1, ..., i+o+replicas-1 (mod n), with o rotating per table so remainders spread:

        n=4, replicas=2     range 0    range 1    range 2    range 3
        servers             {0, 1}     {1, 2}     {2, 3}     {3, 0}

Row ids are assumed hashed (popularity independent of the id), so a range's traffic is
proportional to its rows.
"""

from __future__ import annotations

import functools
import itertools
import math
from dataclasses import dataclass
from typing import Literal

import numpy as np

from flexemr.config.plan import Shard, ShardingPlan
from flexemr.planner.inputs import ModelProfile
from flexemr.sharding.plan import with_local_offsets

Strategy = Literal["table", "row"]
STRATEGIES: tuple[Strategy, ...] = ("table", "row")

_MAX_FAILURE_SETS = 24
"""Beyond this many k-server failure sets, the worst one is found greedily instead of enumerated."""


@dataclass(frozen=True)
class Chunk:
    table: int
    row_start: int
    row_end: int
    servers: tuple[int, ...]
    """The distinct servers holding a copy."""


@dataclass(frozen=True)
class Placement:
    num_servers: int
    replicas: int
    strategy: Strategy
    chunks: tuple[Chunk, ...]

    @functools.cached_property
    def splits_tables(self) -> bool:
        """Whether some table's rows lie on more than one server: the router then finds every
        key's shard instead of sending each table's keys whole."""
        servers: dict[int, set[int]] = {}
        for c in self.chunks:
            servers.setdefault(c.table, set()).update(c.servers)
        return any(len(held) > 1 for held in servers.values())

    @functools.cached_property
    def rows_held(self) -> np.ndarray:
        """[servers, tables]: the rows of each table each server holds. Cached: the search asks
        for every placement's memory once per ranker type it tries."""
        rows = np.zeros((self.num_servers, 1 + max(c.table for c in self.chunks)), dtype=np.int64)
        for c in self.chunks:
            rows[list(c.servers), c.table] += c.row_end - c.row_start
        rows.flags.writeable = False
        return rows

    def server_bytes(self, model: ModelProfile) -> np.ndarray:
        return self.rows_held @ np.asarray(model.table_row_bytes, dtype=np.int64)

    def load(
        self, model: ModelProfile, failed: frozenset[int] = frozenset()
    ) -> tuple[np.ndarray, np.ndarray]:
        """(shares, touches), both [servers, tables], with the servers in `failed` down and each
        chunk's traffic split evenly over its live copies. shares: the fraction of a table's
        lookups a server serves; touches: the expected pieces of one bag it pools (a bag of p rows
        reaches a chunk holding fraction f of the table with probability 1 - (1 - f)^p)."""
        table = np.array([c.table for c in self.chunks])
        holders = np.array([c.servers for c in self.chunks])  # [chunks, replicas]
        rows = np.asarray(model.spec.table_rows, dtype=np.float64)
        fraction = np.array([c.row_end - c.row_start for c in self.chunks]) / rows[table]
        reach = 1 - (1 - fraction) ** np.asarray(model.spec.bag_sizes, dtype=np.float64)[table]
        alive = ~np.isin(holders, list(failed))
        live = alive.sum(axis=1)
        if not live.all():
            raise ValueError(f"some rows have no live copy with servers {sorted(failed)} down")
        shares = np.zeros((self.num_servers, model.spec.num_tables))
        touches = np.zeros_like(shares)
        tables = np.broadcast_to(table[:, None], holders.shape)[alive]
        np.add.at(
            shares,
            (holders[alive], tables),
            np.broadcast_to((fraction / live)[:, None], holders.shape)[alive],
        )
        np.add.at(
            touches, (holders[alive], tables), np.broadcast_to((reach / live)[:, None], holders.shape)[alive]
        )
        return shares, touches

    def worst_load(self, model: ModelProfile, failures: int) -> tuple[np.ndarray, np.ndarray]:
        """`load` under the `failures`-server outage that loads the busiest survivor most. Few
        outages are all tried; with many, a greedy one: take the busiest server, then fail, one
        at a time, the co-holder of its chunks whose loss adds most to its load."""
        if failures == 0:
            return self.load(model)
        weights = np.asarray(model.spec.bag_sizes, dtype=np.float64)

        def busiest(load: tuple[np.ndarray, np.ndarray]) -> float:
            return float((load[0] @ weights).max())

        if math.comb(self.num_servers, failures) <= _MAX_FAILURE_SETS:
            sets = itertools.combinations(range(self.num_servers), failures)
            return max((self.load(model, frozenset(f)) for f in sets), key=busiest)
        victim = int(np.argmax(self.load(model)[0] @ weights))
        peers = sorted({s for c in self.chunks if victim in c.servers for s in c.servers} - {victim})
        failed: frozenset[int] = frozenset()
        for _ in range(failures):
            choices = [failed | {p} for p in peers if p not in failed] or [
                failed | {s} for s in range(self.num_servers) if s != victim and s not in failed
            ]
            failed = max(choices, key=lambda f: float(self.load(model, f)[0][victim] @ weights))
        return self.load(model, failed)

    def to_sharding_plan(self, model: ModelProfile) -> ShardingPlan:
        shards = [Shard(c.table, c.row_start, c.row_end, s) for c in self.chunks for s in sorted(c.servers)]
        return ShardingPlan(
            num_servers=self.num_servers,
            table_rows=model.spec.table_rows,
            dim=model.spec.dim,
            shards=with_local_offsets(shards),
            strategy=self.strategy,
            replicas=self.replicas,
        )


def _cuts(rows: int, parts: int) -> list[tuple[int, int]]:
    edges = np.linspace(0, rows, parts + 1).round().astype(np.int64)
    return [(int(a), int(b)) for a, b in itertools.pairwise(edges) if b > a]


def _row_wise(model: ModelProfile, n: int, replicas: int) -> list[Chunk]:
    chunks = []
    for t, rows in enumerate(model.spec.table_rows):
        for i, (start, end) in enumerate(_cuts(rows, n)):
            first = i + t
            chunks.append(Chunk(t, start, end, tuple((first + j) % n for j in range(replicas))))
    return chunks


def _table_wise(model: ModelProfile, n: int, replicas: int) -> list[Chunk]:
    spec = model.spec
    share = sum(spec.table_rows) / n
    pieces = [
        (t, start, end)
        for t, rows in enumerate(spec.table_rows)
        for start, end in _cuts(rows, max(1, math.ceil(rows / share)))
    ]
    total_rows = float(sum(spec.table_rows))
    total_load = float(sum(spec.bag_sizes))

    def load(t: int, start: int, end: int) -> float:
        return spec.bag_sizes[t] * (end - start) / spec.table_rows[t] / total_load

    def size(start: int, end: int) -> float:
        return (end - start) / total_rows

    rows_on = np.zeros(n)
    load_on = np.zeros(n)
    chunks = []
    for t, start, end in sorted(pieces, key=lambda p: -max(load(*p), size(p[1], p[2]))):
        servers: list[int] = []
        for _ in range(replicas):
            score = np.maximum(rows_on + size(start, end), load_on + load(t, start, end))
            score[servers] = np.inf
            s = int(np.argmin(score))
            servers.append(s)
            rows_on[s] += size(start, end)
            load_on[s] += load(t, start, end)
        chunks.append(Chunk(t, start, end, tuple(servers)))
    return chunks


def place(model: ModelProfile, num_servers: int, replicas: int, strategy: Strategy) -> Placement:
    """Shard `model` over `num_servers` servers with `replicas` copies of every row."""
    if not 1 <= replicas <= num_servers:
        raise ValueError(f"{replicas} replicas need at least as many servers, got {num_servers}")
    if strategy == "row":
        chunks = _row_wise(model, num_servers, replicas)
    elif strategy == "table":
        chunks = _table_wise(model, num_servers, replicas)
    else:
        raise ValueError(f"strategy must be 'table' or 'row', got {strategy!r}")
    return Placement(num_servers, replicas, strategy, tuple(chunks))
