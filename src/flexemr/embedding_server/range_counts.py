"""Rows looked up per row range, counted by the embedding server for the planner (`plan --from-stats`).

The server's local rows are cut into parts: buckets of 2^bits local rows, also cut at every shard
start, so a part lies in one shard and names a range of one table's rows. 2^bits is at most the
finest grid range the server holds (`range_rows`: the planner's unit, 1/`RANGES_PER_TABLE` of a
table) unless that would make over `MAX_PARTS` parts (a part may then span several grid ranges of
a small table; the planner spreads its count over them). When every shard starts on a bucket
boundary (the usual layout: shards back to back, tables of round sizes; `bits` is lowered to make
it so while the parts stay within `MAX_PARTS`), the parts are the buckets and a row's part is
`row >> bits`: a shift and one `bincount` per subrequest, added to the totals. Otherwise, when no
shard is shorter than a bucket, a bucket holds at most one shard start and a row's part is

    part = first_part[row >> bits] + (row >= split[row >> bits])

two gathers and a compare more (several times the cost); with shards shorter than a bucket, one
`searchsorted` over the part starts.

Counting is off the lookup path: a lookup only queues its rows array (the frame's own, never
reused); a thread of its own counts them. When that thread falls behind by `MAX_QUEUED`
subrequests, further ones are not counted but their rows are added to `skipped`, so the counts
become a sample of the traffic (the planner needs shares, not totals) and the stats say how big.

    local rows:  0       256      512      768  (bits = 8)
    shards:      [t0 ...........)[t1 ...........
    parts:       [ 0    )[ 1    )[2)[ 3  )[ 4    )      bucket 2 holds t1's start: split there
"""

from __future__ import annotations

import queue
import threading
import time
from typing import Any

import numpy as np

from flexemr.config.plan import Shard

RANGES_PER_TABLE = 1024
"""Grid ranges per table the planner works with: fine enough to find a hot spot, small enough to
ship as stats."""

MAX_PARTS = 2**17
"""Most parts (counters) per server: buckets grow past a grid range rather than exceed it."""

DRAIN_S = 1.0
"""How long `stats` waits for queued rows to be counted."""

MAX_QUEUED = 64
"""Subrequests waiting to be counted; beyond, they are skipped (counted in `skipped` only)."""


def _trailing_zeros(n: int) -> int:
    """The largest k such that 2^k divides n > 0."""
    return (n & -n).bit_length() - 1


def range_rows(table_rows: int) -> int:
    """Rows per grid range of a table of `table_rows` rows."""
    return -(-table_rows // RANGES_PER_TABLE)


class RangeCounts:
    def __init__(self, shards: list[Shard], table_rows: tuple[int, ...], dim: int) -> None:
        """`shards`: the server's (`ShardingPlan.shards_of`), of a model with tables of
        `table_rows` rows of `dim` columns."""
        self._table_rows, self._dim = table_rows, dim
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
        self.skipped = 0
        """Rows looked up but not counted (the counting thread was behind)."""
        self._queue: queue.Queue[np.ndarray | None] = queue.Queue(MAX_QUEUED)
        self._lock = threading.Lock()
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

        self._thread = threading.Thread(target=self._count_queued, daemon=True, name="flexemr-range-counts")
        self._thread.start()

    def count(self, rows: np.ndarray) -> None:
        """Queue one subrequest's server-local `rows` (all valid: the kernel has read them; the
        caller never writes to the array again) to be counted."""
        try:
            self._queue.put_nowait(rows)
        except queue.Full:
            with self._lock:
                self.skipped += rows.size

    def close(self) -> None:
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()

    def _count_queued(self) -> None:
        while (rows := self._queue.get()) is not None:
            self._add(rows)
            self._queue.task_done()
        self._queue.task_done()

    def _add(self, rows: np.ndarray) -> None:
        if rows.size == 0:
            return
        if self._aligned:
            parts = rows >> self._bits
        elif self._first_part is None:
            parts = np.searchsorted(self._starts[rows.dtype], rows, side="right") - 1
        else:
            bucket = rows >> self._bits
            parts = self._first_part[bucket] + (rows >= self._split[rows.dtype][bucket])
        counted = np.bincount(parts)
        with self._lock:
            self._counts[: counted.size] += counted

    def stats(self) -> dict[str, Any]:
        """The counts so far, as JSON-ready data: the model's shape, the planner's grid (rows per
        range of each table), the rows looked up in all, and `[table, row_start, row_end,
        lookups] of every part looked up at least once. Waits up to `DRAIN_S` for the rows queued
        so far to be counted (all of them, once lookups pause)."""
        deadline = time.monotonic() + DRAIN_S
        while self._queue.unfinished_tasks and time.monotonic() < deadline:
            time.sleep(0.001)
        with self._lock:
            counts, skipped = self._counts.copy(), self.skipped
        hit = np.flatnonzero(counts)
        return {
            "table_rows": list(self._table_rows),
            "dim": self._dim,
            "range_rows": [range_rows(rows) for rows in self._table_rows],
            "lookups": int(counts.sum()),
            "skipped": skipped,
            "ranges": np.stack(
                [self._table[hit], self._row_start[hit], self._row_end[hit], counts[hit]], axis=1
            ).tolist(),
        }
