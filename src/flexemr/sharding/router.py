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

from flexemr.config.plan import ShardingPlan

MAX_BUCKETS = 2**20
MAX_STARTS_PER_BUCKET = 4

_Piece = tuple[np.ndarray, np.ndarray | np.int64, np.ndarray, np.ndarray]
"""Keys for one server (a whole table's, or all of a batch's it holds): (global keys, shift to
local rows, one or one per key, the bag id of each bag, where each bag starts in the keys)."""


class Uncovered(LookupError):
    """Some keys' rows have no usable holder (every replica is down, stalled or excluded)."""

    def __init__(self, message: str, servers: list[int]) -> None:
        super().__init__(message)
        self.servers = servers


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
    """Routes keys to servers. With replicas, the key space is cut at every shard boundary into
    pieces, each held by `plan.replicas` servers or more (hot ranges may have more copies); a batch
    sends each piece's keys to the one holder that the caller's per-server `rank` (lower is better,
    inf: unusable) prefers, so a subrequest's answer always comes whole from one replica.

    Holders are kept as a [pieces, most copies] table; a piece with fewer copies is padded with
    server `num_servers`, which ranks infinite (never chosen, never usable)."""

    def __init__(self, plan: ShardingPlan) -> None:
        self.plan = plan
        self.replicas = plan.replicas
        self.table_base = np.concatenate([[0], np.cumsum(plan.table_rows)[:-1]]).astype(np.int64)
        total = int(sum(plan.table_rows))
        bounds = {
            int(self.table_base[s.table]) + edge for s in plan.shards for edge in (s.row_start, s.row_end)
        }
        self._starts = np.array(sorted(bounds - {total}), dtype=np.int64)
        shard_pieces = [
            np.arange(
                *np.searchsorted(
                    self._starts,
                    [self.table_base[s.table] + s.row_start, self.table_base[s.table] + s.row_end],
                )
            )
            for s in plan.shards
        ]
        copies = np.zeros(self._starts.size, dtype=np.int64)
        for pieces in shard_pieces:
            copies[pieces] += 1
        self.max_copies = int(copies.max())
        """The most copies of any piece: above 1, some subrequest has a replica to fall back on."""
        # Per piece, its holders' servers and the shift from a global key to their local rows.
        self._holders = np.full((self._starts.size, self.max_copies), plan.num_servers, dtype=np.int32)
        self._holder_shift = np.zeros((self._starts.size, self.max_copies), dtype=np.int64)
        filled = np.zeros(self._starts.size, dtype=np.int64)
        for s, pieces in zip(plan.shards, shard_pieces, strict=True):
            self._holders[pieces, filled[pieces]] = s.server
            self._holder_shift[pieces, filled[pieces]] = (
                s.local_start - s.row_start - self.table_base[s.table]
            )
            filled[pieces] += 1
        held = np.sort(self._holders, axis=1)
        if ((held[:, 1:] == held[:, :-1]) & (held[:, 1:] < plan.num_servers)).any():
            raise ValueError(
                "a server holds two copies of the same rows: replicas must be on distinct servers"
            )
        self._bucket_bits, self._bucket_shard, self._starts_in_bucket = self._buckets(total)
        self._next_start = np.append(self._starts[1:], np.iinfo(np.int64).max)
        self._table_edges = np.append(self.table_base, total)
        # A table that is one piece (held whole by each of its holders) needs no per-key work:
        # its keys go to the chosen holder as a slice. Then piece t is table t.
        self._any_split = self._starts.size > len(plan.table_rows)
        # Servers get int32 rows and offsets (half the request bytes) unless they hold 2^31 rows.
        self._index_dtype = [
            np.dtype(np.int32 if plan.server_rows(s) <= np.iinfo(np.int32).max else np.int64)
            for s in range(plan.num_servers)
        ]

    @property
    def identity(self) -> bool:
        """One server holds every row at its global key (a local tier): routing changes nothing."""
        return self.plan.num_servers == 1 and self.max_copies == 1 and not self._holder_shift.any()

    def coverable(self, usable: np.ndarray) -> bool:
        """Whether every row has a holder among the `usable` servers (bool [servers])."""
        return bool(np.append(usable, False)[self._holders].any(axis=1).all())

    def _choose(self, rank: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        """Per piece, the server to ask (-1: no usable holder) and the shift to its local rows."""
        if rank is None:
            return self._holders[:, 0], self._holder_shift[:, 0]
        ranks = np.append(rank, np.inf)[self._holders]  # padding ranks infinite
        pick = ranks.argmin(axis=1)
        pieces = np.arange(pick.size)
        server = np.where(np.isinf(ranks[pieces, pick]), -1, self._holders[pieces, pick])
        return server, self._holder_shift[pieces, pick]

    def _no_replica(self, piece: int) -> Uncovered:
        table = int(np.searchsorted(self.table_base, self._starts[piece], side="right") - 1)
        start = int(self._starts[piece] - self.table_base[table])
        end = int(min(self._next_start[piece], self._table_edges[table + 1]) - self.table_base[table])
        servers = [int(s) for s in self._holders[piece] if s < self.plan.num_servers]
        holders = "embedding server " + ", ".join(map(str, servers))
        return Uncovered(
            f"no replica of table {table} rows [{start}, {end}) can answer: {holders} (all that hold "
            "them) down, stalled or failed this request",
            servers,
        )

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
        """The piece (a shard, or the part of one its replicas share) of every key."""
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

    def route(
        self, keys: np.ndarray, lengths: np.ndarray, rank: np.ndarray | None = None
    ) -> Iterator[Subrequest]:
        """Split a batch of bags, KJT style (`keys` grouped by table in table order, bag b being
        the next `lengths[b]` keys, no bag spanning two tables), into one subrequest per server
        that holds any of its rows, its bags (ids b) in batch order. Servers with nothing to do
        get no subrequest. `rank` (float [servers], lower preferred, inf unusable) picks each
        piece's replica; without it, the first. Raises `Uncovered` when a piece with keys has no
        usable holder, before anything is yielded. Where every table is one piece, a table costs
        O(bags) (its keys go as one slice); once any is split, every key's piece is found at once,
        a pass over the keys per server instead of numpy calls per (table, server) slice."""
        server, shift = self._choose(rank)
        if self._any_split:
            yield from self._route_keys(keys, lengths, server, shift)
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
        used = np.flatnonzero(edges[1:] > edges[:-1])
        missing = used[server[used] < 0]
        if missing.size:
            raise self._no_replica(int(missing[0]))
        for t in used:
            start, end = edges[t], edges[t + 1]
            bags = np.arange(bag_edges[t], bag_edges[t + 1])
            bags = bags[lengths[bags] > 0]
            parts[server[t]].append((keys[start:end], shift[t], bags, offsets[bags] - start))
        for s, pieces in enumerate(parts):
            if pieces:
                yield self._subrequest(s, pieces)

    def _route_keys(
        self, keys: np.ndarray, lengths: np.ndarray, piece_server: np.ndarray, piece_shift: np.ndarray
    ) -> Iterator[Subrequest]:
        piece = self.shards(keys)
        server = piece_server[piece]
        if server.size and server.min() < 0:
            raise self._no_replica(int(piece[np.argmin(server)]))
        key_bags = np.repeat(np.arange(lengths.size), lengths)
        for s in np.flatnonzero(np.bincount(server, minlength=len(self._index_dtype))):
            picked = np.flatnonzero(server == s)
            bags = key_bags[picked]
            starts = np.flatnonzero(np.concatenate([[True], bags[1:] != bags[:-1]]))
            yield self._subrequest(int(s), [(keys[picked], piece_shift[piece[picked]], bags[starts], starts)])

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
