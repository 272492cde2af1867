"""A sharding plan: which embedding server holds which contiguous rows of which table.

A plan is plain data (JSON round-trips it) so the CLI can print it, the planner can write it and
`flexemr serve` can run it. Each server keeps its shards back to back in one array; a shard's
`local_start` is where its first row sits in that array, which lets the ranker send server-local
row numbers and the server pool a whole subrequest with one kernel call.

    table 0: rows [0, 400) -> server 0 @ 0      table 1: rows [0, 100) -> server 0 @ 400
             rows [400, 1000) -> server 1 @ 0             rows [100, 300) -> server 1 @ 600

A shard may also hold only some columns of its rows, `[col_start, col_end)` (column-wise
sharding): a table's columns are then cut into blocks the same way for all its rows, each block
held like a table of its own, and the ranker puts the blocks' pooled slices side by side.

    table 0, dim 64: rows [0, 1000) cols [0, 32) -> server 0    rows [0, 1000) cols [32, 64) -> server 1

`flexemr.sharding.plan` makes plans (table-wise, row-wise, column-wise, replicated).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
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
    col_start: int = 0
    """First column of the rows this shard holds."""
    col_end: int | None = None
    """One past its last column (None: the table's last, the whole width)."""

    @property
    def rows(self) -> int:
        return self.row_end - self.row_start

    def columns(self, dim: int) -> tuple[int, int]:
        """The columns `[start, end)` this shard holds of rows `dim` wide."""
        return self.col_start, dim if self.col_end is None else self.col_end


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
        """Every (row, column) of every table is on at least `replicas` distinct servers (hot ranges
        may have more copies); a table's shards cut its columns the same way (each holds one block
        of them); local ranges do not overlap."""
        if self.num_servers < 1:
            raise ValueError(f"a plan needs at least one server, got num_servers={self.num_servers}")
        for t, first, last in self.column_blocks():
            rows, cols = self.table_rows[t], self._columns_text(first, last)
            ranges = [(s.row_start, s.row_end) for s in self.shards if (s.table, s.col_start) == (t, first)]
            for start, end in ranges:
                if not 0 <= start < end <= rows:
                    raise ValueError(f"table {t}{cols}: shard rows [{start}, {end}) outside [0, {rows})")
            # Sweep the range ends: between consecutive boundaries the coverage must be `replicas`
            # or more (hot ranges may have more copies).
            events = sorted([(start, 1) for start, _ in ranges] + [(end, -1) for _, end in ranges])
            depth, position = 0, 0
            for row, step in events:
                if row > position and depth < self.replicas:
                    raise ValueError(
                        f"table {t}{cols}: rows [{position}, {row}) are on {depth} server(s), fewer than "
                        f"replicas={self.replicas}"
                    )
                depth, position = depth + step, row
            if position != rows or not ranges:
                raise ValueError(f"table {t}{cols}: rows [{position}, {rows}) are on no server")
        for server in range(self.num_servers):
            spans = sorted((s.local_start, s.local_start + s.rows) for s in self.shards if s.server == server)
            for (_, end), (start, _) in zip(spans, spans[1:], strict=False):
                if start < end:
                    raise ValueError(f"server {server}: shards overlap in its local array")
            held = sorted(
                (s.table, s.columns(self.dim), s.row_start, s.row_end)
                for s in self.shards
                if s.server == server
            )
            for (t, block, _, end), (u, other, start, _) in zip(held, held[1:], strict=False):
                if (t, block) == (u, other) and start < end:
                    raise ValueError(
                        f"server {server} holds table {t} rows [{start}, {end}) twice: copies of a row "
                        "must be on distinct servers"
                    )
        bad = [s for s in self.shards if not 0 <= s.server < self.num_servers]
        if bad:
            raise ValueError(f"shard {bad[0]} names a server outside 0..{self.num_servers - 1}")

    def _column_blocks(self, table: int) -> list[tuple[int, int]]:
        """The blocks `[start, end)` a table's shards cut its columns into; raises ValueError where
        a shard's columns are outside the width or span a cut another shard makes."""
        spans = {s.columns(self.dim) for s in self.shards if s.table == table}
        bad = [(a, b) for a, b in spans if not 0 <= a < b <= self.dim]
        if bad:
            raise ValueError(
                f"table {table}: shard columns [{bad[0][0]}, {bad[0][1]}) outside [0, {self.dim})"
            )
        cuts = sorted({edge for span in spans for edge in span} | {0, self.dim})
        for a, b in spans:
            inside = [c for c in cuts if a < c < b]
            if inside:
                raise ValueError(
                    f"table {table}: a shard holds columns [{a}, {b}) across the cut at column {inside[0]} "
                    "another shard makes: a table's shards must cut its columns the same way"
                )
        return list(zip(cuts[:-1], cuts[1:], strict=True))

    def column_blocks(self) -> list[tuple[int, int, int]]:
        """(table, first column, one past the last) of every column block, in table order; a table
        not split by column is one block of the whole width."""
        return [(t, a, b) for t in range(len(self.table_rows)) for a, b in self._column_blocks(t)]

    def server_width(self, server: int) -> int:
        """Columns of the widest shard a server holds (the width of its lookup answers)."""
        return max(
            (b - a for a, b in (s.columns(self.dim) for s in self.shards if s.server == server)),
            default=self.dim,
        )

    def copies(self, table: int) -> list[tuple[int, int, int]]:
        """(row_start, row_end, copies) of each run of `table`'s rows held by the same number of
        servers, in row order (a uniform plan gives one run with `replicas` copies)."""
        first = self._column_blocks(table)[0][0]  # each column block has the same row copies
        ranges = [(s.row_start, s.row_end) for s in self.shards if (s.table, s.col_start) == (table, first)]
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

    def server_bytes(self, row_bytes: Callable[[int, int], int] | None = None) -> list[int]:
        """Bytes of rows each server stores, a row of table t cut to w columns taking
        `row_bytes(t, w)` (default: fp32, 4 * w)."""
        stored = [0] * self.num_servers
        for shard in self.shards:
            start, end = shard.columns(self.dim)
            width = end - start
            stored[shard.server] += shard.rows * (
                4 * width if row_bytes is None else row_bytes(shard.table, width)
            )
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

    def describe(self, row_bytes: Callable[[int, int], int] | None = None, stored: str = "") -> str:
        """A human-readable table of the plan, for the CLI: bytes per server with `row_bytes` (see
        `server_bytes`), and `stored` (the row formats and where they are kept) on the first line."""
        lines = [
            f"{self.strategy}-wise plan: {len(self.table_rows)} tables over {self.num_servers} servers"
            + (f", {stored}" if stored else "")
        ]
        for server, nbytes in enumerate(self.server_bytes(row_bytes)):
            held = [
                f"t{s.table}[{s.row_start}:{s.row_end}"
                + ("]" if s.col_end is None else f", {s.col_start}:{s.col_end}]")
                for s in self.shards_of(server)
            ]
            listed = ", ".join(held[:6]) + (f", ... ({len(held)} shards)" if len(held) > 6 else "")
            lines.append(f"  server {server}: {nbytes / 2**20:9.1f} MiB  {listed or '(empty)'}")
        return "\n".join(lines)

    def _columns_text(self, start: int, end: int) -> str:
        """How messages name a column block: by its columns, or not at all for a whole table."""
        return "" if (start, end) == (0, self.dim) else f" columns [{start}, {end})"
