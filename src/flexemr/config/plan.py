"""A sharding plan: which embedding server holds which contiguous rows of which table.

A plan is plain data (JSON round-trips it) so the CLI can print it, the planner can write it and
`flexemr serve` can run it. Each server keeps its shards back to back in one array; a shard's
`local_start` is where its first row sits in that array, which lets the ranker send server-local
row numbers and the server pool a whole subrequest with one kernel call.

    table 0: rows [0, 400) -> server 0 @ 0      table 1: rows [0, 100) -> server 0 @ 400
             rows [400, 1000) -> server 1 @ 0             rows [100, 300) -> server 1 @ 600

`flexemr.sharding.plan` makes plans (table-wise, row-wise, replicated).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Shard:
    table: int
    row_start: int
    row_end: int
    server: int
    local_start: int = 0
    """Row offset of this shard inside its server's one contiguous array."""

    @property
    def rows(self) -> int:
        return self.row_end - self.row_start


@dataclass(frozen=True)
class ShardingPlan:
    num_servers: int
    table_rows: tuple[int, ...]
    dim: int
    shards: tuple[Shard, ...]
    strategy: str = "custom"
    replicas: int = 1
    """The fewest copies of any row, each on a distinct server (availability); hot ranges may have
    more (`flexemr plan --from-stats`). The ranker asks one copy per subrequest."""

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Every row of every table is on at least `replicas` distinct servers; local ranges do not
        overlap."""
        if self.num_servers < 1:
            raise ValueError(f"a plan needs at least one server, got num_servers={self.num_servers}")
        for t, rows in enumerate(self.table_rows):
            ranges = [(s.row_start, s.row_end) for s in self.shards if s.table == t]
            for start, end in ranges:
                if not 0 <= start < end <= rows:
                    raise ValueError(f"table {t}: shard rows [{start}, {end}) outside [0, {rows})")
            # Sweep the range ends: between consecutive boundaries the coverage must be `replicas`
            # or more (hot ranges may have more copies).
            events = sorted([(start, 1) for start, _ in ranges] + [(end, -1) for _, end in ranges])
            depth, position = 0, 0
            for row, step in events:
                if row > position and depth < self.replicas:
                    raise ValueError(
                        f"table {t}: rows [{position}, {row}) are on {depth} server(s), fewer than "
                        f"replicas={self.replicas}"
                    )
                depth, position = depth + step, row
            if position != rows or not ranges:
                raise ValueError(f"table {t}: rows [{position}, {rows}) are on no server")
        for server in range(self.num_servers):
            spans = sorted((s.local_start, s.local_start + s.rows) for s in self.shards if s.server == server)
            for (_, end), (start, _) in zip(spans, spans[1:], strict=False):
                if start < end:
                    raise ValueError(f"server {server}: shards overlap in its local array")
            held = sorted((s.table, s.row_start, s.row_end) for s in self.shards if s.server == server)
            for (t, _, end), (u, start, _) in zip(held, held[1:], strict=False):
                if t == u and start < end:
                    raise ValueError(
                        f"server {server} holds table {t} rows [{start}, {end}) twice: copies of a row "
                        "must be on distinct servers"
                    )
        bad = [s for s in self.shards if not 0 <= s.server < self.num_servers]
        if bad:
            raise ValueError(f"shard {bad[0]} names a server outside 0..{self.num_servers - 1}")

    def copies(self, table: int) -> list[tuple[int, int, int]]:
        """(row_start, row_end, copies) of each run of `table`'s rows held by the same number of
        servers, in row order (a uniform plan gives one run with `replicas` copies)."""
        ranges = [(s.row_start, s.row_end) for s in self.shards if s.table == table]
        events = sorted([(start, 1) for start, _ in ranges] + [(end, -1) for _, end in ranges])
        runs: list[tuple[int, int, int]] = []
        depth, position = 0, 0
        for row, step in events:
            if row > position:
                if runs and runs[-1][2] == depth and runs[-1][1] == position:
                    runs[-1] = (runs[-1][0], row, depth)
                else:
                    runs.append((position, row, depth))
            depth, position = depth + step, row
        return runs

    def shards_of(self, server: int) -> list[Shard]:
        return sorted((s for s in self.shards if s.server == server), key=lambda s: s.local_start)

    def server_rows(self, server: int) -> int:
        """Length of a server's local array."""
        return max((s.local_start + s.rows for s in self.shards if s.server == server), default=0)

    def server_bytes(self, row_bytes: Sequence[int] | None = None) -> list[int]:
        """Bytes of rows each server stores, a row of table t taking `row_bytes[t]` (default: fp32)."""
        if row_bytes is None:
            return [self.server_rows(s) * self.dim * 4 for s in range(self.num_servers)]
        stored = [0] * self.num_servers
        for shard in self.shards:
            stored[shard.server] += shard.rows * row_bytes[shard.table]
        return stored

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ShardingPlan:
        return cls(
            num_servers=int(data["num_servers"]),
            table_rows=tuple(int(r) for r in data["table_rows"]),
            dim=int(data["dim"]),
            shards=tuple(Shard(**s) for s in data["shards"]),
            strategy=str(data.get("strategy", "custom")),
            replicas=int(data.get("replicas", 1)),
        )

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def describe(self, row_bytes: Sequence[int] | None = None, stored: str = "") -> str:
        """A human-readable table of the plan, for the CLI: bytes per server with `row_bytes` (see
        `server_bytes`), and `stored` (the row formats and where they are kept) on the first line."""
        lines = [
            f"{self.strategy}-wise plan: {len(self.table_rows)} tables over {self.num_servers} servers"
            + (f", {stored}" if stored else "")
        ]
        for server, nbytes in enumerate(self.server_bytes(row_bytes)):
            held = [f"t{s.table}[{s.row_start}:{s.row_end}]" for s in self.shards_of(server)]
            listed = ", ".join(held[:6]) + (f", ... ({len(held)} shards)" if len(held) > 6 else "")
            lines.append(f"  server {server}: {nbytes / 2**20:9.1f} MiB  {listed or '(empty)'}")
        return "\n".join(lines)
