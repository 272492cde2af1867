"""Route a whole batch of lookups to embedding servers with a table gather, not a search per key.

The router flattens (table, row) into one global key space, `key = table_base[table] + row`, and
keeps the sorted global start of every shard. The key space is cut into at most 2^20 equal buckets
that each remember the shard of their first key; a key's shard is its bucket's, moved past the few
shard starts inside that bucket. That is a gather and a compare or two per key, about 10x cheaper
than a binary search (`searchsorted`, kept for plans whose buckets would hold over 4 starts).

    keys:    |---- table 0 ----|-- table 1 --|------ table 2 ------|
    starts:  ^s0      ^s1      ^s2   ^s3     ^s4        ^s5
    buckets: |  |  |  |  |  |  |  |  |  |  |  |  |  |  |  |  |  |  |
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from functools import cached_property

import numpy as np

from flexemr.sharding.plan import ShardingPlan

MAX_BUCKETS = 2**20
MAX_STARTS_PER_BUCKET = 4

_Piece = tuple[np.ndarray, np.ndarray | np.int64, np.ndarray, np.ndarray]
"""Keys for one server (a whole table's, or all of a batch's it holds): (global keys, shift to
local rows, one or one per key, the bag id of each bag, where each bag starts in the keys)."""


@dataclass(frozen=True)
class Subrequest:
    """The part of a batch one server answers. Its bags appear in batch order."""

    server: int
    rows: np.ndarray
    """int32 [n] (int64 on a server of 2^31 rows or more): server-local rows, grouped by bag."""
    offsets: np.ndarray
    """[bags], the dtype of `rows`: where each bag starts in `rows`."""
    bags: np.ndarray
    """int64 [bags]: the batch-wide bag id (table * B + sample) of each bag."""
    key_pieces: tuple[np.ndarray, ...]
    """The global keys of `rows`, in pieces (joined only when the cache asks for them)."""

    @cached_property
    def keys(self) -> np.ndarray:
        """int64 [n]: the global key of each row (what the ranker's cache is keyed by)."""
        return np.concatenate(self.key_pieces)

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
        self._server = np.array([s.server for s in shards], dtype=np.int32)
        # local row = global key + shift
        self._shift = np.array(
            [s.local_start - s.row_start - self.table_base[s.table] for s in shards], dtype=np.int64
        )
        self._bucket_bits, self._bucket_shard, self._starts_in_bucket = self._buckets(
            int(sum(plan.table_rows))
        )
        self._next_start = np.append(self._starts[1:], np.iinfo(np.int64).max)
        self._table_edges = np.append(self.table_base, sum(plan.table_rows))
        # A table held whole by one server needs no per-key work: its keys go there as a slice.
        self._table_server = [
            sorted({s.server for s in shards if s.table == t}) for t in range(len(plan.table_rows))
        ]
        self._any_split = any(len(servers) > 1 for servers in self._table_server)
        self._whole_shift = np.zeros(len(plan.table_rows), dtype=np.int64)
        for shard, shift in zip(shards, self._shift, strict=True):
            self._whole_shift[shard.table] = shift  # used only where the table has one shard
        # Servers get int32 rows and offsets (half the request bytes) unless they hold 2^31 rows.
        self._index_dtype = [
            np.dtype(np.int32 if plan.server_rows(s) <= np.iinfo(np.int32).max else np.int64)
            for s in range(plan.num_servers)
        ]

    def _buckets(self, total_rows: int) -> tuple[int, np.ndarray | None, int]:
        """(key bits dropped per bucket, shard of each bucket's first key, most shard starts
        after a bucket's first key); no buckets when that is over `MAX_STARTS_PER_BUCKET`."""
        bits = max(0, (total_rows - 1).bit_length() - MAX_BUCKETS.bit_length() + 1)
        first = np.arange(((total_rows - 1) >> bits) + 1, dtype=np.int64) << bits
        last = np.minimum(first + (1 << bits) - 1, total_rows - 1)
        first_shard = np.searchsorted(self._starts, first, side="right") - 1
        inside = int((np.searchsorted(self._starts, last, side="right") - 1 - first_shard).max())
        if inside > MAX_STARTS_PER_BUCKET:
            return bits, None, inside
        return bits, first_shard.astype(np.int32), inside

    def shards(self, keys: np.ndarray) -> np.ndarray:
        """The shard (index into the sorted shards) of every key."""
        if self._bucket_shard is None:
            found: np.ndarray = np.searchsorted(self._starts, keys, side="right") - 1
            return found
        shard: np.ndarray = self._bucket_shard[keys >> self._bucket_bits]
        for _ in range(self._starts_in_bucket):
            shard += keys >= self._next_start[shard]
        return shard

    def keys(self, indices: np.ndarray, rows_per_table: np.ndarray) -> np.ndarray:
        """Global row keys (int64) of table-major indices (int32 or int64; `rows_per_table[t]` of
        them from table t); they also key the ranker's cache. One add per table slice."""
        keys = np.empty(indices.size, dtype=np.int64)
        bounds = np.concatenate([[0], np.cumsum(rows_per_table)])
        for t in np.flatnonzero(rows_per_table):
            np.add(
                indices[bounds[t] : bounds[t + 1]], self.table_base[t], out=keys[bounds[t] : bounds[t + 1]]
            )
        return keys

    def route(self, keys: np.ndarray, lengths: np.ndarray) -> Iterator[Subrequest]:
        """Split a batch of bags, KJT style (`keys` grouped by table in table order, bag b being
        the next `lengths[b]` keys, no bag spanning two tables), into one subrequest per server
        that holds any of its rows, its bags (ids b) in batch order. Servers with nothing to do
        get no subrequest. Where every table is held whole by one server, a table costs O(bags)
        (its keys go as one slice); once any is split, every key's shard is found at once, a pass
        over the keys per server instead of numpy calls per (table, server) slice."""
        if self._any_split:
            yield from self._route_keys(keys, lengths)
            return
        offsets = np.zeros(lengths.size + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        # Keys of table t all lie in [table_base[t], table_base[t+1]), so "key >= table_base[t]"
        # is monotone over the batch and a binary search finds each table's slice; the bags
        # starting in a slice are the table's.
        edges = np.searchsorted(keys, self._table_edges)
        bag_edges = np.searchsorted(offsets[:-1], edges)
        # Per server, (keys, shift to their local rows, bag ids, where each bag starts) per table.
        parts: list[list[_Piece]] = [[] for _ in self._index_dtype]
        for t in np.flatnonzero(edges[1:] > edges[:-1]):
            start, end = edges[t], edges[t + 1]
            bags = np.arange(bag_edges[t], bag_edges[t + 1])
            bags = bags[lengths[bags] > 0]
            parts[self._table_server[t][0]].append(
                (keys[start:end], self._whole_shift[t], bags, offsets[bags] - start)
            )
        for s, pieces in enumerate(parts):
            if pieces:
                yield self._subrequest(s, pieces)

    def _route_keys(self, keys: np.ndarray, lengths: np.ndarray) -> Iterator[Subrequest]:
        shard = self.shards(keys)
        server = self._server[shard]
        key_bags = np.repeat(np.arange(lengths.size), lengths)
        for s in range(len(self._index_dtype)):
            picked = np.flatnonzero(server == s)
            if picked.size:
                bags = key_bags[picked]
                starts = np.flatnonzero(np.concatenate([[True], bags[1:] != bags[:-1]]))
                yield self._subrequest(s, [(keys[picked], self._shift[shard[picked]], bags[starts], starts)])

    def _subrequest(self, server: int, pieces: list[_Piece]) -> Subrequest:
        """Write the pieces' local rows straight into one array of the server's index dtype."""
        dtype = self._index_dtype[server]
        rows = np.empty(sum(piece[0].size for piece in pieces), dtype)
        offsets, bags = [], []
        at = 0
        for piece_keys, shift, piece_bags, starts in pieces:
            np.add(piece_keys, shift, out=rows[at : at + piece_keys.size], casting="unsafe")
            offsets.append(starts + at)
            bags.append(piece_bags)
            at += piece_keys.size
        return Subrequest(
            server,
            rows,
            np.concatenate(offsets).astype(dtype),
            np.concatenate(bags),
            tuple(piece[0] for piece in pieces),
        )
