"""Route a whole batch of lookups to embedding servers with a table gather, not a search per key.

The router flattens (table, row) into one global key space, `key = table_base[table] + row`, and
keeps the sorted global start of every shard. The key space is cut into at most 2^20 equal buckets
that each remember the shard of their first key; a key's shard is its bucket's, moved past the few
shard starts inside that bucket. That is a gather and a compare or two per key, about 10x cheaper
than a binary search (`searchsorted`, kept for plans whose buckets would hold over 4 starts).

    keys:    |---- table 0 ----|-- table 1 --|------ table 2 ------|
    starts:  ^s0      ^s1      ^s2   ^s3     ^s4        ^s5
    buckets: |  |  |  |  |  |  |  |  |  |  |  |  |  |  |  |  |  |  |

A plan that splits tables by column is routed over column blocks instead of tables: each block
(a table's rows, some of its columns) is a table of its own in the routing key space, so a key
of a split table goes, once per block, to a holder of that block; each subrequest says which
block each of its bags is (`Subrequest.blocks`), and the ranker adds each block's answer into its
columns (`column_runs`), or puts raw slices side by side into whole rows (`whole_rows`).

    table 0 (dim 8), cols [0, 4) and [4, 8):   key k -> block 0 key k  and  block 1 key k + rows_0
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cached_property

import numpy as np

from flexemr.config.plan import ShardingPlan

MAX_BUCKETS = 2**20
MAX_STARTS_PER_BUCKET = 4


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
    key_pieces: tuple[tuple[np.ndarray, np.int64], ...]
    """The routing keys of `rows`, in pieces (values, shift): a piece's keys are its values plus
    its shift (added up and joined only when a failover or the cache asks for them)."""
    blocks: np.ndarray | None = None
    """int64 [bags]: the column block (`RangeRouter.block_columns`) each bag is for, ascending;
    None where no table is split by column."""

    @cached_property
    def keys(self) -> np.ndarray:
        """int64 [n]: the routing key of each row; where no table is split by column, its global
        key (what the ranker's cache is keyed by; see `RangeRouter.cache_keys`)."""
        return np.concatenate([values + shift for values, shift in self.key_pieces])

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
        """Where each table's keys start: global key = table_base[table] + row (the cache's keys)."""
        blocks = plan.column_blocks()
        self.block_table = np.array([t for t, _, _ in blocks], dtype=np.int64)
        self.block_columns = np.array([(a, b) for _, a, b in blocks], dtype=np.int64).reshape(-1, 2)
        """[blocks, 2]: each column block's first column and one past its last."""
        self.split = len(blocks) > len(plan.table_rows)
        """Some table is split by column: routing is over column blocks, not tables."""
        if self.split:
            plan = _blocks_as_tables(plan)
        self._routing_base = np.concatenate([[0], np.cumsum(plan.table_rows)[:-1]]).astype(np.int64)
        self._block_shift = self._routing_base - self.table_base[self.block_table]
        self._table_key_edges = np.append(self.table_base, sum(self.plan.table_rows))
        total = int(sum(plan.table_rows))
        bounds = {
            int(self._routing_base[s.table]) + edge for s in plan.shards for edge in (s.row_start, s.row_end)
        }
        self._starts = np.array(sorted(bounds - {total}), dtype=np.int64)
        shard_pieces = [
            np.arange(
                *np.searchsorted(
                    self._starts,
                    [self._routing_base[s.table] + s.row_start, self._routing_base[s.table] + s.row_end],
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
                s.local_start - s.row_start - self._routing_base[s.table]
            )
            filled[pieces] += 1
        held = np.sort(self._holders, axis=1)
        if ((held[:, 1:] == held[:, :-1]) & (held[:, 1:] < plan.num_servers)).any():
            raise ValueError(
                "a server holds two copies of the same rows: replicas must be on distinct servers"
            )
        self._bucket_bits, self._bucket_shard, self._starts_in_bucket = self._buckets(total)
        self._next_start = np.append(self._starts[1:], np.iinfo(np.int64).max)
        self._table_edges = np.append(self._routing_base, total)
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
        return (
            self.plan.num_servers == 1
            and self.max_copies == 1
            and not self.split
            and not self._holder_shift.any()
        )

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
        block = int(np.searchsorted(self._routing_base, self._starts[piece], side="right") - 1)
        start = int(self._starts[piece] - self._routing_base[block])
        end = int(min(self._next_start[piece], self._table_edges[block + 1]) - self._routing_base[block])
        table, (first, last) = int(self.block_table[block]), self.block_columns[block]
        columns = f" columns [{first}, {last})" if self.split else ""
        servers = [int(s) for s in self._holders[piece] if s < self.plan.num_servers]
        holders = "embedding server " + ", ".join(map(str, servers))
        return Uncovered(
            f"no replica of table {table} rows [{start}, {end}){columns} can answer: {holders} (all that "
            "hold them) down, stalled or failed this request",
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
        """Split a batch of bags, KJT style (global `keys` grouped by table in table order, bag b
        being the next `lengths[b]` keys, no bag spanning two tables), into one subrequest per
        server that holds any of its rows, its bags (ids b) in batch order; a bag of a table split
        by column goes to a holder of each of its column blocks. Servers with nothing to do get no
        subrequest. `rank` (float [servers], lower preferred, inf unusable) picks each piece's
        replica; without it, the first. Raises `Uncovered` when a piece with keys has no usable
        holder, before anything is yielded."""
        if not self.split:
            yield from self._route(keys, lengths, rank)
            return
        keys, lengths, bag, block = self._by_block(keys, lengths)
        for sub in self._route(keys, lengths, rank):
            yield dataclasses.replace(sub, bags=bag[sub.bags], blocks=block[sub.bags])

    def route_batch(
        self,
        indices: np.ndarray,
        rows_per_table: np.ndarray,
        lengths: np.ndarray,
        rank: np.ndarray | None = None,
    ) -> Iterator[Subrequest]:
        """`route` of a batch's table-major row `indices` (`rows_per_table[t]` of them from table t,
        as in `keys`). Where every table is held whole by each of its holders (no row range or
        column block split off), each server's local rows are written straight from the indices, in
        one pass, without the global keys."""
        if self.split or self._any_split:
            yield from self.route(self.keys(indices, rows_per_table), lengths, rank)
            return
        edges = np.zeros(rows_per_table.size + 1, dtype=np.int64)
        np.cumsum(rows_per_table, out=edges[1:])
        yield from self._route_tables(indices, edges, self.table_base, lengths, rank)

    def route_again(self, sub: Subrequest, rank: np.ndarray) -> Iterator[Subrequest]:
        """`sub`'s rows routed again by `rank` (away from a replica that failed), with its bag ids
        and blocks."""
        lengths = np.diff(sub.offsets, append=sub.rows.size)
        for again in self._route(sub.keys, lengths, rank):
            blocks = None if sub.blocks is None else sub.blocks[again.bags]
            yield dataclasses.replace(again, bags=sub.bags[again.bags], blocks=blocks)

    def _by_block(
        self, keys: np.ndarray, lengths: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """A batch's keys as routing keys: each table's keys once per column block of it, blocks
        in order, with the bags' lengths; and per bag of the result, its bag in the batch and its
        block. One slice per block."""
        offsets = np.zeros(lengths.size + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        edges = np.searchsorted(keys, self._table_key_edges)  # each table's keys
        bag_edges = np.searchsorted(offsets[:-1], edges)  # the bags starting among them
        key_parts, length_parts, bag_parts, block_parts = [], [], [], []
        for block, table in enumerate(self.block_table.tolist()):
            bags = np.arange(bag_edges[table], bag_edges[table + 1])
            key_parts.append(keys[edges[table] : edges[table + 1]] + self._block_shift[block])
            length_parts.append(lengths[bags])
            bag_parts.append(bags)
            block_parts.append(np.full(bags.size, block, dtype=np.int64))
        return (
            np.concatenate(key_parts),
            np.concatenate(length_parts),
            np.concatenate(bag_parts),
            np.concatenate(block_parts),
        )

    def cache_keys(self, sub: Subrequest) -> np.ndarray:
        """The global key (the cache's) of each of `sub`'s rows."""
        if sub.blocks is None:
            return sub.keys
        sizes = np.diff(sub.offsets, append=sub.rows.size)
        keys: np.ndarray = sub.keys - np.repeat(self._block_shift[sub.blocks], sizes)
        return keys

    def column_runs(self, sub: Subrequest, raw: bool) -> list[tuple[slice, int, int]]:
        """Where `sub` holds each column block it is for: (its bags, or its rows when `raw`, of the
        block; the block's first column; one past its last). Bags of a block are consecutive."""
        if sub.blocks is None:
            return [(slice(None), 0, self.plan.dim)]
        starts = np.flatnonzero(np.diff(sub.blocks, prepend=-1))
        columns = self.block_columns[sub.blocks[starts]].tolist()
        edges = np.append(starts, sub.blocks.size)
        if raw:  # bag edges to row edges
            edges = np.append(sub.offsets, sub.rows.size).astype(np.int64)[edges]
        return [
            (slice(int(a), int(b)), first, last)
            for a, b, (first, last) in zip(edges[:-1], edges[1:], columns, strict=True)
        ]

    def whole_rows(self, answers: list[tuple[Subrequest, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
        """Raw answers (`values` [rows, width] per subrequest) as global keys [k] and whole rows
        [k, dim]: a key's column slices side by side (every key must have all its blocks)."""
        no_keys, no_rows = np.empty(0, np.int64), np.empty((0, self.plan.dim), np.float32)
        if not self.split:
            return (
                np.concatenate([sub.keys for sub, _ in answers] or [no_keys]),
                np.concatenate([rows for _, rows in answers] or [no_rows]),
            )
        cache_keys = [self.cache_keys(sub) for sub, _ in answers]
        unique = np.unique(np.concatenate(cache_keys or [no_keys]))
        whole = np.empty((unique.size, self.plan.dim), dtype=np.float32)
        for (sub, values), keys in zip(answers, cache_keys, strict=True):
            at = np.searchsorted(unique, keys)
            for part, first, last in self.column_runs(sub, raw=True):
                whole[at[part], first:last] = values[part, : last - first]
        return unique, whole

    def _route(self, keys: np.ndarray, lengths: np.ndarray, rank: np.ndarray | None) -> Iterator[Subrequest]:
        """`route` over routing keys (global keys, or per column block where tables are split).
        Where every table (block) is one piece, a table costs O(bags) (its keys go as one slice);
        once any is split, every key's piece is found at once, a pass over the keys per server
        instead of numpy calls per (table, server) slice."""
        if self._any_split:
            server, shift = self._choose(rank)
            yield from self._route_keys(keys, lengths, server, shift)
            return
        # Keys of table t all lie in [table_base[t], table_base[t+1]), so "key >= table_base[t]"
        # is monotone over the batch and a binary search finds each table's slice.
        edges = np.searchsorted(keys, self._table_edges)
        yield from self._route_tables(keys, edges, np.zeros(edges.size - 1, np.int64), lengths, rank)

    def _route_tables(
        self,
        values: np.ndarray,
        edges: np.ndarray,
        key_shift: np.ndarray,
        lengths: np.ndarray,
        rank: np.ndarray | None,
    ) -> Iterator[Subrequest]:
        """`_route` where every table (block) is one piece: table t's values are
        `values[edges[t]:edges[t+1]]`, its routing keys those plus `key_shift[t]`; the bags
        starting among a table's values are the table's. Per server, its tables' values are
        written into its rows (a cast and an add per table) and its bags found with a few
        vectorised ops over the batch's bags."""
        tables = edges.size - 1
        server, shift = (a[:tables] for a in self._choose(rank))  # piece t is table t
        sizes = np.diff(edges)
        used = sizes > 0
        if (server[used] < 0).any():
            raise self._no_replica(int(np.flatnonzero(used & (server < 0))[0]))
        offsets = np.zeros(lengths.size + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        # Each bag's table; bags past the last value (empty) get `tables`, which no server holds.
        bag_edges = np.append(np.searchsorted(offsets[:-1], edges), lengths.size)
        bag_table = np.repeat(np.arange(tables + 1), np.diff(bag_edges))
        nonempty = lengths > 0
        local_shift = shift + key_shift  # value -> the server's local row
        for s in np.unique(server[used]).tolist():
            mine = np.flatnonzero(used & (server == s))
            starts = np.zeros(mine.size + 1, dtype=np.int64)
            np.cumsum(sizes[mine], out=starts[1:])  # where each of its tables starts in its rows
            dtype = self._index_dtype[s]
            # Cast, then add in the rows' dtype: twice as fast as one add across dtypes. Both may
            # wrap around in int32, but the local row they add up to fits, so the wrapped sum is
            # that row (two's complement arithmetic is modulo 2^32).
            add = local_shift.astype(dtype)
            rows = np.empty(int(starts[-1]), dtype)
            for t, at, end in zip(mine.tolist(), starts[:-1].tolist(), starts[1:].tolist(), strict=True):
                np.copyto(rows[at:end], values[edges[t] : edges[t + 1]], casting="unsafe")
                np.add(rows[at:end], add[t], out=rows[at:end])
            moved = np.zeros(tables + 1, dtype=np.int64)  # a table's value positions -> row positions
            moved[mine] = starts[:-1] - edges[mine]
            held = np.zeros(tables + 1, dtype=bool)
            held[mine] = True
            bags = np.flatnonzero(nonempty & held[bag_table])
            yield Subrequest(
                s,
                rows,
                (offsets[bags] + moved[bag_table[bags]]).astype(dtype),
                bags,
                tuple((values[edges[t] : edges[t + 1]], key_shift[t]) for t in mine.tolist()),
            )

    def _route_keys(
        self, keys: np.ndarray, lengths: np.ndarray, piece_server: np.ndarray, piece_shift: np.ndarray
    ) -> Iterator[Subrequest]:
        piece = self.shards(keys)
        server = piece_server[piece]
        if server.size and server.min() < 0:
            raise self._no_replica(int(piece[np.argmin(server)]))
        key_bags = np.repeat(np.arange(lengths.size), lengths)
        for s in np.flatnonzero(np.bincount(server, minlength=len(self._index_dtype))).tolist():
            picked = np.flatnonzero(server == s)
            bags = key_bags[picked]
            starts = np.flatnonzero(np.concatenate([[True], bags[1:] != bags[:-1]]))
            dtype, mine = self._index_dtype[s], keys[picked]
            rows = np.empty(picked.size, dtype)
            np.add(mine, piece_shift[piece[picked]], out=rows, casting="unsafe")
            yield Subrequest(s, rows, starts.astype(dtype), bags[starts], ((mine, np.int64(0)),))


def _blocks_as_tables(plan: ShardingPlan) -> ShardingPlan:
    """`plan` with each column block a whole-width table of its own (the routing key space)."""
    blocks = plan.column_blocks()
    index = {(t, first): b for b, (t, first, _) in enumerate(blocks)}
    shards = tuple(
        dataclasses.replace(s, table=index[s.table, s.col_start], col_start=0, col_end=None)
        for s in plan.shards
    )
    rows = tuple(plan.table_rows[t] for t, _, _ in blocks)
    return dataclasses.replace(plan, table_rows=rows, shards=shards)
