"""Route a whole batch of lookups to embedding servers with one `searchsorted`.

The router flattens (table, row) into one global key space, `key = table_base[table] + row`, and
keeps the sorted global start of every shard. A batch's shards are found with a single
`searchsorted` over its keys; memory is O(shards), never O(rows).

    keys:    |---- table 0 ----|-- table 1 --|------ table 2 ------|
    starts:  ^s0      ^s1      ^s2   ^s3     ^s4        ^s5
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from flexemr.sharding.plan import ShardingPlan


@dataclass(frozen=True)
class Subrequest:
    """The part of a batch one server answers. Its bags appear in batch order."""

    server: int
    rows: np.ndarray
    """int64 [n]: server-local rows, grouped by bag."""
    offsets: np.ndarray
    """int64 [bags]: where each bag starts in `rows`."""
    bags: np.ndarray
    """int64 [bags]: the batch-wide bag id (table * B + sample) of each bag."""

    def row_bags(self) -> np.ndarray:
        """The bag id of every row (for pooling raw rows on the ranker)."""
        sizes = np.diff(self.offsets, append=self.rows.size)
        bags: np.ndarray = np.repeat(self.bags, sizes)
        return bags


class RangeRouter:
    def __init__(self, plan: ShardingPlan) -> None:
        self.plan = plan
        self.table_base = np.concatenate([[0], np.cumsum(plan.table_rows)[:-1]]).astype(np.int64)
        shards = sorted(plan.shards, key=lambda s: (s.table, s.row_start))
        self._starts = np.array([self.table_base[s.table] + s.row_start for s in shards], dtype=np.int64)
        self._server = np.array([s.server for s in shards], dtype=np.int64)
        # local row = global key + shift
        self._shift = np.array(
            [s.local_start - s.row_start - self.table_base[s.table] for s in shards], dtype=np.int64
        )

    def keys(self, indices: np.ndarray, tables: np.ndarray) -> np.ndarray:
        """Global row keys of (table, row) pairs; they also key the ranker's cache."""
        keys: np.ndarray = self.table_base[tables] + indices
        return keys

    def route(self, keys: np.ndarray, bag_ids: np.ndarray) -> list[Subrequest]:
        """Split a batch (keys in bag order, with each key's bag id) into one subrequest per server
        that holds any of its rows. Servers with nothing to do get no subrequest."""
        shard = np.searchsorted(self._starts, keys, side="right") - 1
        server = self._server[shard]
        local = keys + self._shift[shard]
        order = np.argsort(server, kind="stable")  # stable: bags stay in batch order per server
        counts = np.bincount(server, minlength=self.plan.num_servers)
        ends = np.cumsum(counts)
        subrequests = []
        for s in np.flatnonzero(counts):
            picked = order[ends[s] - counts[s] : ends[s]]
            bags = bag_ids[picked]
            first = np.flatnonzero(np.concatenate([[True], bags[1:] != bags[:-1]]))
            subrequests.append(
                Subrequest(int(s), local[picked], first.astype(np.int64), bags[first].astype(np.int64))
            )
        return subrequests
