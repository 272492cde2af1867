"""A sharding plan from measured traffic: hot row ranges get more copies, load is balanced per range.

Input: the lookups per row range the embedding servers counted (`GET /v2/stats/ranges` on a
ranker, or a saved copy: `flexemr.ranker.range_stats`), the number of servers, the fewest copies
of any row (`replicas`, for availability) and a memory budget (rows stored in all, in copies of
the model). Three steps:

1. **Copies.** Every grid range starts with `replicas` copies. While the budget lasts, the range
   with the most lookups per copy gets one more copy (on one more server, at most all of them),
   until no range takes more than `HOT_SHARE` of a server's fair share of lookups per copy: beyond
   that a single range is fine enough for the placement to balance.
2. **Units.** Per table, each range with extra copies is a unit of its own; the rows between them
   are cut into units of at most `HOT_SHARE` of a server's lookups per copy and `1/servers` of the
   table's rows, so no unit is too big to place evenly.
3. **Placement.** Units go, the heaviest first, each copy onto the distinct server whose larger
   of (lookups share, bytes share) stays lowest (longest-processing-time greedy, as the
   provisioning planner's table-wise placement).

    table t grid:  | 9 | 1 | 1 | 0 | 1 | 30 | 1 | 1 | ...   lookups per range
    copies:          2   2   2   2   2   4    2   2          (replicas=2; range 5 is hot)
    units:         [ 0..1 ][ 1 ..... 5 )[5][ 6 ......       (a hot range alone; cold runs cut)

Column splits: a table with a range still over `HOT_SHARE` per copy after step 1 (the budget or
the servers ran out of copies) and rows at least `2 * MIN_BLOCK_COLUMNS` wide has its columns cut
into blocks (up to one per server, each at least `MIN_BLOCK_COLUMNS` wide), and every block of
every unit is placed as a unit of its own, with its share of the lookups and bytes (a block lookup
moves its columns only): the hot range's copies of each block go to other servers, so the hot
load spreads over more servers at the same memory. Loads are then counted in whole-row lookups
(a lookup in a quarter-width block counts a quarter). A unit still too hot with every block on
every server is reported (`HotRangePlan.too_hot`).
"""

from __future__ import annotations

import heapq
import json
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from flexemr.config.plan import Shard, ShardingPlan
from flexemr.planner.inputs import InputError
from flexemr.sharding.plan import column_cuts, with_local_offsets

HOT_SHARE = 1 / 32
"""A range (or unit) may take at most this fraction of a server's fair share of lookups per copy."""

MIN_BLOCK_COLUMNS = 32
"""Narrowest column block of a split table: a block lookup still costs an index lookup and a
message, so narrower blocks would move too few bytes for what they cost."""

MAX_STATS_BYTES = 64 * 2**20
"""Largest stats document read from a URL or a file."""


@dataclass(frozen=True)
class RangeTraffic:
    """Lookups per grid range of every table (counts of all servers, replicas' added up)."""

    table_rows: tuple[int, ...]
    dim: int
    grid_rows: tuple[int, ...]
    """Rows per grid range, per table."""
    lookups: tuple[np.ndarray, ...]
    """Per table, float64 [ranges]: lookups of each grid range."""
    sample: int = 1
    """The servers counted one lookup subrequest in this many (the most of any server), each as
    this many: the lookups are estimates unless it is 1."""

    @property
    def total(self) -> int:
        return round(sum(float(counts.sum()) for counts in self.lookups))

    @classmethod
    def from_stats(cls, stats: dict[str, Any]) -> RangeTraffic:
        """From `GET /v2/stats/ranges` (parts of the grid may come split at shard boundaries and
        once per replica: they are added up per grid range)."""
        try:
            table_rows = tuple(int(r) for r in stats["table_rows"])
            dim = int(stats["dim"])
            grid = tuple(int(r) for r in stats["range_rows"])
            parts = np.asarray(stats["ranges"], dtype=np.int64).reshape(-1, 4)
        except (KeyError, TypeError, ValueError) as exc:
            raise InputError(
                "range stats need table_rows, dim, range_rows and ranges "
                f"[[table, row_start, row_end, lookups]]: {exc!r}"
            ) from None
        if len(grid) != len(table_rows) or min(grid, default=1) < 1:
            raise InputError(f"range stats: range_rows {grid} do not fit {len(table_rows)} tables")
        table, start, end, count = parts.T
        bad = (table < 0) | (table >= len(table_rows)) | (count < 0) | (start < 0) | (end <= start)
        if not bad.any() and parts.size:
            bad |= end > np.asarray(table_rows)[table]
        if bad.any():
            raise InputError(
                f"range stats: a part outside the model's tables: {parts[np.argmax(bad)].tolist()}"
            )
        # A part spanning several grid ranges (a server's buckets outgrow a small table's grid)
        # shares its count among them by overlap.
        g = np.asarray(grid, dtype=np.int64)[table] if parts.size else start
        spans = (end - 1) // g - start // g + 1
        part = np.repeat(np.arange(start.size), spans)
        cell = start[part] // g[part] + np.arange(part.size) - np.repeat(np.cumsum(spans) - spans, spans)
        overlap = np.minimum(end[part], (cell + 1) * g[part]) - np.maximum(start[part], cell * g[part])
        share = count[part] * overlap / (end - start)[part]
        lookups = tuple(
            np.bincount(cell[table[part] == t], share[table[part] == t], minlength=-(-rows // grid[t]))
            for t, rows in enumerate(table_rows)
        )
        samples = stats.get("sample", 1)  # per server from a ranker, one number from a server
        sample = max((int(n) for n in (samples if isinstance(samples, list) else [samples]) if n), default=1)
        return cls(table_rows, dim, grid, lookups, sample)


def load_range_stats(source: str) -> RangeTraffic:
    """Range stats from a ranker's URL (`http://host:port/v2/stats/ranges`) or a JSON file."""
    try:
        if source.startswith(("http://", "https://")):
            with urllib.request.urlopen(source, timeout=30) as response:
                text = response.read(MAX_STATS_BYTES + 1)
        else:
            text = Path(source).read_bytes()[: MAX_STATS_BYTES + 1]
    except OSError as exc:
        raise InputError(f"cannot read range stats from {source}: {exc}") from None
    if len(text) > MAX_STATS_BYTES:
        raise InputError(f"range stats from {source} exceed {MAX_STATS_BYTES} bytes")
    try:
        stats = json.loads(text)
    except ValueError as exc:
        raise InputError(f"range stats from {source} are not JSON: {exc}") from None
    if not isinstance(stats, dict):
        raise InputError(f"range stats from {source} are not a JSON object")
    if stats.get("missing"):
        raise InputError(
            f"range stats from {source} lack embedding servers {stats['missing']} (down when asked): "
            "plan from counts of every server"
        )
    return RangeTraffic.from_stats(stats)


@dataclass(frozen=True)
class HotRangePlan:
    plan: ShardingPlan
    server_load: np.ndarray
    """float [servers]: the measured lookups each server would have taken, copies sharing equally."""
    too_hot: tuple[tuple[int, int, int], ...]
    """(table, row_start, row_end) of ranges above `HOT_SHARE` per copy even on every server."""
    sample: int = 1
    """`RangeTraffic.sample` of the counts it was planned from."""

    def describe(self) -> str:
        runs = [
            (t, start, end, copies)
            for t in range(len(self.plan.table_rows))
            for start, end, copies in self.plan.copies(t)
            if copies > self.plan.replicas
        ]
        hot_rows = sum(end - start for _, start, end, _ in runs)
        load = self.server_load
        lines = [
            f"hot-range plan: {len(runs)} row ranges ({hot_rows} rows) with more than "
            f"{self.plan.replicas} copies (up to {max((c for *_, c in runs), default=self.plan.replicas)}); "
            f"measured lookups per server max/mean {load.max() / max(load.mean(), 1e-12):.3f}"
            + (f" (estimated: the servers counted one lookup in {self.sample})" if self.sample > 1 else ""),
            self.plan.describe(),
        ]
        split = sorted({s.table for s in self.plan.shards if s.col_end is not None})
        if split:
            lines.append(f"tables {split} cut into column blocks to spread their hot ranges")
        if self.too_hot:
            lines.append(
                f"{len(self.too_hot)} range(s) stay hot with a copy on every server, "
                f"e.g. table {self.too_hot[0][0]} rows {self.too_hot[0][1:]}"
            )
        return "\n".join(lines)


def hot_range_plan(
    traffic: RangeTraffic, num_servers: int, replicas: int, memory_budget: float
) -> HotRangePlan:
    """The plan of the module docstring; `memory_budget`: rows stored in all, in copies of the
    model's rows (at least `replicas`)."""
    if not 1 <= replicas <= num_servers:
        raise InputError(f"replicas must be in 1..{num_servers} (the servers), got {replicas}")
    if memory_budget < replicas:
        raise InputError(
            f"a memory budget of {memory_budget} copies of the model cannot hold replicas={replicas} copies"
        )
    total = max(traffic.total, 1)
    cap = HOT_SHARE * total / num_servers
    copies = _copies(traffic, num_servers, replicas, memory_budget, cap)
    blocks = min(num_servers, traffic.dim // MIN_BLOCK_COLUMNS)
    units = [
        (*unit[:4], unit[4] * (last - first) / traffic.dim, first, last)
        for t in range(len(traffic.table_rows))
        for unit in _units(traffic, t, copies[t], replicas, cap, num_servers)
        for first, last in (
            column_cuts(traffic.dim, blocks)
            if blocks > 1 and np.any(traffic.lookups[t] / copies[t] > cap)
            else [(0, traffic.dim)]
        )
    ]
    shards, load, too_hot = _place(traffic, units, num_servers, cap)
    plan = ShardingPlan(
        num_servers=num_servers,
        table_rows=traffic.table_rows,
        dim=traffic.dim,
        shards=with_local_offsets(shards),
        strategy="hot-range",
        replicas=replicas,
    )
    return HotRangePlan(plan, load, tuple(too_hot), traffic.sample)


def _copies(
    traffic: RangeTraffic, num_servers: int, replicas: int, memory_budget: float, cap: float
) -> list[np.ndarray]:
    """Per table, the copies of each grid range: `replicas`, plus one at a time for the range with
    the most lookups per copy while it is over `cap` and the budget has room."""
    copies = [np.full(counts.size, replicas, dtype=np.int64) for counts in traffic.lookups]
    spare = int((memory_budget - replicas) * sum(traffic.table_rows))
    heap = [
        (-float(counts[i]) / replicas, t, int(i))
        for t, counts in enumerate(traffic.lookups)
        for i in np.flatnonzero(counts > cap * replicas)
    ]
    heapq.heapify(heap)
    while heap:
        per_copy, t, i = heapq.heappop(heap)
        rows = min(traffic.grid_rows[t], traffic.table_rows[t] - i * traffic.grid_rows[t])
        if -per_copy <= cap or copies[t][i] >= num_servers or rows > spare:
            continue
        copies[t][i] += 1
        spare -= rows
        heapq.heappush(heap, (-float(traffic.lookups[t][i]) / copies[t][i], t, i))
    return copies


_Unit = tuple[int, int, int, int, float]
"""(table, row_start, row_end, copies, lookups)."""

_Piece = tuple[int, int, int, int, float, int, int]
"""A unit's column block: (table, row_start, row_end, copies, lookups in whole rows, col_start, col_end)."""


def _units(
    traffic: RangeTraffic, t: int, copies: np.ndarray, replicas: int, cap: float, num_servers: int
) -> list[_Unit]:
    """Table `t` as units: each range with more than `replicas` copies alone; the runs between them
    cut where the lookups per copy pass a multiple of `cap` or the rows a multiple of 1/servers of
    the table."""
    grid, rows, counts = traffic.grid_rows[t], traffic.table_rows[t], traffic.lookups[t]
    cells_per_unit = max(1, -(-counts.size // num_servers))
    per_copy = counts / copies
    before = np.cumsum(per_copy) - per_copy  # lookups per copy before each range in the table
    index = np.arange(counts.size)
    # A new unit starts at a hot range, right after one, or where a cut falls (index 0 always).
    hot = copies > replicas
    starts = (
        (index == 0)
        | hot
        | np.roll(hot, 1)
        | (np.floor(before / cap) != np.floor(np.roll(before, 1) / cap))
        | (index % cells_per_unit == 0)
    )
    first = np.flatnonzero(starts)
    last = np.append(first[1:], counts.size)
    sums = np.add.reduceat(counts, first) if counts.size else counts
    return [
        (t, int(a) * grid, min(int(b) * grid, rows), int(copies[a]), float(n))
        for a, b, n in zip(first, last, sums, strict=True)
    ]


def _place(
    traffic: RangeTraffic, pieces: list[_Piece], num_servers: int, cap: float
) -> tuple[list[Shard], np.ndarray, list[tuple[int, int, int]]]:
    """Shards of every copy of every piece, and the lookups each server gets, heaviest piece first.
    Rows count in whole rows (a quarter-width block's row is a quarter), as lookups do."""
    dim = traffic.dim
    total = max(traffic.total, 1)
    stored = sum(p[3] * (p[2] - p[1]) * (p[6] - p[5]) / dim for p in pieces)
    fair_load, fair_rows = total / num_servers, max(stored, 1) / num_servers
    load_on = np.zeros(num_servers)
    rows_on = np.zeros(num_servers)
    shards: list[Shard] = []
    too_hot = set()

    def weight(p: _Piece) -> float:
        return max(p[4] / p[3] / fair_load, (p[2] - p[1]) * (p[6] - p[5]) / dim / fair_rows)

    for t, start, end, copies, lookups, first, last in sorted(pieces, key=weight, reverse=True):
        if lookups / copies > cap and copies == num_servers:
            too_hot.add((t, start, end))
        rows = (end - start) * (last - first) / dim
        servers: list[int] = []
        for _ in range(copies):
            score = np.maximum((load_on + lookups / copies) / fair_load, (rows_on + rows) / fair_rows)
            score[servers] = np.inf
            s = int(np.argmin(score))
            servers.append(s)
            load_on[s] += lookups / copies
            rows_on[s] += rows
        columns = {} if last - first == dim else {"col_start": first, "col_end": last}
        shards.extend(Shard(t, start, end, s, **columns) for s in servers)
    return shards, load_on, sorted(too_hot)
