"""Rows looked up per row range, counted by the embedding server for the planner (`plan --from-stats`).

The server's local rows are cut into parts: buckets of 2^bits local rows, also cut at every shard
start, so a part lies in one shard and names a range of one table's rows. 2^bits is at most the
finest grid range the server holds (`range_rows`: the planner's unit, 1/`RANGES_PER_TABLE` of a
table) unless that would make over `MAX_PARTS` parts (a part may then span several grid ranges of
a small table; the planner spreads its count over them). When every shard starts on a bucket
boundary (the usual layout: shards back to back, tables of round sizes; `bits` is lowered to make
it so while the parts stay within `MAX_PARTS`), the parts are the buckets and a row's part is
`row >> bits`: a shift and one `bincount` (torch's, over int32) per subrequest, added to the
totals. Otherwise, when no shard is shorter than a bucket, a bucket holds at most one shard start
and a row's part is

    part = first_part[row >> bits] + (row >= split[row >> bits])

two gathers and a compare more (several times the cost); with shards shorter than a bucket, one
`searchsorted` over the part starts.

A connection thread counts its lookup's rows itself, once the answer is on its way: a pass over
the rows costs less than handing them to a thread of their own (a wake-up per subrequest), but
on a server whose cores the kernels keep busy it still took a quarter of its CPU. So only one
subrequest in `sample`, drawn at random, is counted, each of its rows as `sample` lookups: every
count is an unbiased estimate, and the planner only compares shares of a server's lookups
(`sample` 1: every subrequest, the counts exact). So that the stats include every lookup counted
before they were asked for, a sampled lookup is announced (`expect`) before its answer goes out
and `stats` waits for the announced ones to be counted. `skipped` (rows looked up but not
counted, an older server's) stays 0 and stays in the stats, which rankers of every version read.

    local rows:  0       256      512      768  (bits = 8)
    shards:      [t0 ...........)[t1 ...........
    parts:       [ 0    )[ 1    )[2)[ 3  )[ 4    )      bucket 2 holds t1's start: split there
"""

from __future__ import annotations

import random
import threading
from typing import Any

import numpy as np
import torch

from flexemr.config.plan import Shard

RANGES_PER_TABLE = 1024
"""Grid ranges per table the planner works with: fine enough to find a hot spot, small enough to
ship as stats."""

MAX_PARTS = 2**17
"""Most parts (counters) per server: buckets grow past a grid range rather than exceed it."""

DRAIN_S = 1.0
"""How long `stats` waits for the lookups answered so far to be counted."""


def _trailing_zeros(n: int) -> int:
    """The largest k such that 2^k divides n > 0."""
    return (n & -n).bit_length() - 1


def range_rows(table_rows: int) -> int:
    """Rows per grid range of a table of `table_rows` rows."""
    return -(-table_rows // RANGES_PER_TABLE)


class RangeCounts:
    def __init__(
        self,
        shards: list[Shard],
        table_rows: tuple[int, ...],
        dim: int,
        sample: int = 1,
        seed: int | None = None,
    ) -> None:
        """`shards`: the server's (`ShardingPlan.shards_of`), of a model with tables of
        `table_rows` rows of `dim` columns; one subrequest in `sample` is counted (`seed`: of the
        draw, for tests)."""
        if sample < 1:
            raise ValueError(f"range counts sample one subrequest in N >= 1, got {sample}")
        self._table_rows, self._dim = table_rows, dim
        self.sample = sample
        self._draw = random.Random(seed).random
        shards = sorted(shards, key=lambda s: s.local_start)
        local_rows = max((s.local_start + s.rows for s in shards), default=0)
        # Buckets no longer than the finest grid range held, unless that makes too many.
        bits = max(0, min((range_rows(table_rows[s.table]) for s in shards), default=1).bit_length() - 1)
        while local_rows >> bits > MAX_PARTS:
            bits += 1
        shard_starts = np.array([s.local_start for s in shards], dtype=np.int64)
        # Finer buckets that every shard starts on, if there are not too many: then parts = buckets.
        aligned = min((_trailing_zeros(int(start)) for start in shard_starts if start), default=bits)
        self._aligned = local_rows >> min(bits, aligned) <= MAX_PARTS
        if self._aligned:
            bits = min(bits, aligned)
        starts = np.union1d(shard_starts, np.arange(0, local_rows, 1 << bits, dtype=np.int64))
        # Each part's shard and rows of its table (table -1: a gap between shards, never looked up).
        owner = np.searchsorted(shard_starts, starts, side="right") - 1
        ends = np.append(starts[1:], local_rows)
        local = np.array([[s.table, s.local_start, s.rows, s.row_start] for s in shards], dtype=np.int64)
        table, first, rows, row_start = (
            local[np.maximum(owner, 0)].T if shards else np.zeros((4, 0), np.int64)
        )
        inside = (owner >= 0) & (starts < first + rows)
        self._table = np.where(inside, table, -1)
        self._row_start = starts - first + row_start
        self._row_end = np.minimum(ends, first + rows) - first + row_start
        self._counts = np.zeros(starts.size, dtype=np.int64)
        self._lock = threading.Condition()
        self._expected = 0
        self._bits = bits
        self._starts = {np.dtype(t): starts.astype(t) for t in (np.int32, np.int64)}
        # The fast path needs at most one shard start inside a bucket: shards no shorter than one.
        self._first_part: np.ndarray | None = None
        if not self._aligned and shards and min(s.rows for s in shards) >= 1 << bits:
            bucket_starts = np.arange(-(-local_rows >> bits), dtype=np.int64) << bits
            self._first_part = np.searchsorted(starts, bucket_starts)
            nxt = np.append(starts, local_rows)[self._first_part + 1]
            split = np.where(nxt < bucket_starts + (1 << bits), nxt, np.iinfo(np.int64).max)
            self._split = {
                np.dtype(t): np.minimum(split, np.iinfo(t).max).astype(t) for t in (np.int32, np.int64)
            }

    def expect(self) -> bool:
        """Draw whether a lookup is counted; when it is (True), announce it: its rows must then be
        given to `count` (call before its answer goes out)."""
        if self.sample > 1 and self._draw() * self.sample >= 1:
            return False
        with self._lock:
            self._expected += 1
        return True

    def count(self, rows: np.ndarray) -> None:
        """Count one announced subrequest's server-local `rows` (all valid: the kernel has read
        them), each as `sample` lookups."""
        if rows.size == 0:
            with self._lock:
                self._counted_one()
            return
        if self._aligned:
            parts = rows >> self._bits
        elif self._first_part is None:
            parts = np.searchsorted(self._starts[rows.dtype], rows, side="right") - 1
        else:
            bucket = rows >> self._bits
            parts = self._first_part[bucket] + (rows >= self._split[rows.dtype][bucket])
        # torch's bincount over int32 takes half of numpy's time (which first widens to int64);
        # parts (at most MAX_PARTS plus a few shard starts) always fit in int32.
        counted = torch.bincount(torch.from_numpy(parts.astype(np.int32, copy=False))).numpy()
        if self.sample > 1:
            counted *= self.sample
        with self._lock:
            self._counts[: counted.size] += counted
            self._counted_one()

    def _counted_one(self) -> None:
        self._expected -= 1
        if not self._expected:
            self._lock.notify_all()

    def stats(self) -> dict[str, Any]:
        """The counts so far, as JSON-ready data: the model's shape, the planner's grid (rows per
        range of each table), the rows looked up in all, one subrequest in how many was counted
        (`sample`), and `[table, row_start, row_end, lookups]` of every part counted at least once.
        Waits up to `DRAIN_S` for the lookups announced so far to be counted."""
        with self._lock:
            self._lock.wait_for(lambda: not self._expected, DRAIN_S)
            counts = self._counts.copy()
        hit = np.flatnonzero(counts)
        return {
            "table_rows": list(self._table_rows),
            "dim": self._dim,
            "range_rows": [range_rows(rows) for rows in self._table_rows],
            "lookups": int(counts.sum()),
            "sample": self.sample,
            "skipped": 0,
            "ranges": np.stack(
                [self._table[hit], self._row_start[hit], self._row_end[hit], counts[hit]], axis=1
            ).tolist(),
        }
