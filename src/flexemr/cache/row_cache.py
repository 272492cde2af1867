"""A set-associative cache of embedding rows in device memory, LRU by timestamp within each set.

Rows are keyed by their global key (`table_base[table] + row`, see `RangeRouter.keys`). A key
lives in one set, `bucket(key, num_sets)`, in any of that set's `ways` slots:

    slot = set * ways + way
    keys   int64   [num_sets, ways]             -1 = empty
    stamps int64   [num_sets * ways + 1]        last use (a counter, not a clock); -1 = empty
    rows   float32 [num_sets * ways + 1, dim]   the last row is always zero: misses point at it

The extra last slot is where every miss points: its row stays zero and its stamp absorbs the
misses' touches, so a lookup needs no compaction of its hits.

Every operation is a handful of whole-batch tensor ops: finding a batch of keys gathers each
key's set (its `ways` keys, adjacent in memory) and compares, a chunk of keys at a time so the
[chunk, ways] intermediates stay in the CPU cache; inserting a batch sorts the new keys by set and
hands the r-th new key of a set the r-th least recently used slot of that set. Duplicates in a
batch are looked up independently and inserted once. Because a miss's slot is the zero row,
`bag_sums` pools a whole batch (hits and misses) with one `embedding_bag` and no compaction.

Capacity is in bytes and counts the row plus its key and stamp (`slot_bytes = 4 * dim + 16`).
Resizing keeps the sets where it can and changes the ways, 1 to `max_ways`: a shrink keeps each
set's most recently used rows, a grow adds empty ways; a copy, no rehashing (a rebuild of a big
cache sorts every row and stalls requests for about a second on a CPU). A capacity beyond
`max_ways` ways or below one rebuilds the table with a new number of sets, keeping the globally
most recently used rows that fit (a few may still lose a set conflict in the new geometry). While
it resizes, old and new tables both exist; afterwards the old one is freed.

Not thread-safe: `AdaptiveCacheManager` serialises access.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.nn import functional as F

from flexemr.cache.hashing import bucket
from flexemr.config.cache import DEFAULT_WAYS

EMPTY = -1
FIND_CHUNK = 1 << 15
"""Keys `_find` compares per step."""


class RowCache:
    def __init__(
        self,
        dim: int,
        capacity_bytes: int,
        device: torch.device | str = "cpu",
        ways: int = DEFAULT_WAYS,
    ) -> None:
        if dim < 1:
            raise ValueError(f"dim must be positive, got {dim}")
        if ways < 1:
            raise ValueError(f"ways must be positive, got {ways}")
        self.dim = dim
        self.max_ways = ways
        self.device = torch.device(device)
        self._clock = 0
        self._allocate(*self._geometry(capacity_bytes))

    # -- geometry ---------------------------------------------------------------------------------

    @property
    def slot_bytes(self) -> int:
        """Bytes one cached row costs: the floats, its key and its stamp."""
        return 4 * self.dim + 16

    def _geometry(self, capacity_bytes: int) -> tuple[int, int]:
        """(sets, ways) of a fresh table of at most `capacity_bytes`."""
        if capacity_bytes < 0:
            raise ValueError(f"capacity_bytes must be >= 0, got {capacity_bytes}")
        slots = capacity_bytes // self.slot_bytes
        ways = min(self.max_ways, slots)
        return (slots // ways if ways else 0), ways

    def _allocate(self, num_sets: int, ways: int) -> None:
        self.num_sets, self.ways = num_sets, ways
        shape = (num_sets, ways)
        self._keys = torch.full(shape, EMPTY, dtype=torch.int64, device=self.device)
        self._stamp_store = torch.full((num_sets * ways + 1,), EMPTY, dtype=torch.int64, device=self.device)
        self._stamps = self._stamp_store[:-1].view(shape)
        self._rows = torch.zeros(self.num_sets * self.ways + 1, self.dim, device=self.device)

    @property
    def capacity_rows(self) -> int:
        return self.num_sets * self.ways

    @property
    def capacity_bytes(self) -> int:
        """Bytes allocated (at most the requested capacity)."""
        return self.capacity_rows * self.slot_bytes

    @property
    def num_rows(self) -> int:
        return int((self._keys >= 0).sum())

    @property
    def size_bytes(self) -> int:
        """Bytes of the rows held now."""
        return self.num_rows * self.slot_bytes

    # -- lookups ----------------------------------------------------------------------------------

    def _sets(self, keys: Tensor) -> Tensor:
        return bucket(keys, self.num_sets)

    def _find(self, keys: Tensor) -> tuple[Tensor, Tensor]:
        """(hit [N] bool, slot [N] int64; the zero row `capacity_rows` where not hit)."""
        keys = keys.to(self.device, torch.int64).reshape(-1)
        if self.capacity_rows == 0 or keys.numel() == 0:
            hit = torch.zeros(keys.shape, dtype=torch.bool, device=self.device)
            return hit, torch.full(keys.shape, self.capacity_rows, dtype=torch.int64, device=self.device)
        sets = self._sets(keys)
        hits, ways = [], []
        for start in range(0, keys.numel(), FIND_CHUNK):
            chunk = slice(start, start + FIND_CHUNK)
            # a key sits in at most one way of its set, so max finds whether and where
            found, way = (self._keys.index_select(0, sets[chunk]) == keys[chunk, None]).max(dim=1)
            hits.append(found)
            ways.append(way)
        hit = torch.cat(hits) & (keys >= 0)
        slot = (sets * self.ways + torch.cat(ways)).masked_fill_(~hit, self.capacity_rows)
        return hit, slot

    def _touch(self, slots: Tensor) -> None:
        """Mark `slots` (misses included: they touch the spare slot) used now; later positions in
        the batch count as more recent."""
        n = slots.numel()
        if n == 0:
            return
        stamps = torch.arange(self._clock, self._clock + n, dtype=torch.int64, device=self.device)
        self._stamp_store.scatter_reduce_(0, slots, stamps, reduce="amax")
        self._clock += n

    def lookup(self, keys: Tensor) -> tuple[Tensor, Tensor]:
        """Find `keys` [N] and mark the hits used. Returns (hit [N] bool, slots [N] int64); read
        the hit rows with `gather(slots[hit])`, or sum them per bag with `bag_sums(slots, ...)`."""
        hit, slot = self._find(keys)
        self._touch(slot)
        return hit, slot

    def contains(self, keys: Tensor) -> Tensor:
        """hit [N] bool, without marking anything used."""
        return self._find(keys)[0]

    def gather(self, slots: Tensor) -> Tensor:
        """float32 [n, dim] rows of slots returned by `lookup` (valid until the next mutation)."""
        return self._rows[slots]

    def bag_sums(self, slots: Tensor, offsets: Tensor) -> Tensor:
        """float32 [B, dim]: per bag, the sum of the rows of `slots` [N] as `lookup` returned
        them (misses add zero); bag b is `slots[offsets[b]:offsets[b + 1]]`, the last one runs
        to N. A new tensor: later mutations cannot change it."""
        return F.embedding_bag(slots, self._rows, offsets, mode="sum")

    # -- mutations --------------------------------------------------------------------------------

    def insert(self, keys: Tensor, rows: Tensor) -> int:
        """Cache `rows` [N, dim] under `keys` [N]; refreshes keys already present, evicts the least
        recently used rows of full sets. Duplicate keys are inserted once (their first row). When
        more new keys map to one set than it has ways, earlier keys in the batch win. Returns the
        number of rows written."""
        if rows.shape != (keys.shape[0], self.dim):
            raise ValueError(f"rows must be [{keys.shape[0]}, {self.dim}], got {list(rows.shape)}")
        if self.capacity_rows == 0 or keys.numel() == 0:
            return 0
        keys = keys.to(self.device, torch.int64)
        rows = rows.to(self.device, torch.float32)
        keys, first = _first_occurrences(keys)
        rows = rows[first]
        stamps = self._clock + torch.arange(keys.numel(), dtype=torch.int64, device=self.device)
        self._clock += keys.numel()

        present, slot = self._find(keys)
        self._rows[slot[present]] = rows[present]
        self._stamps.view(-1)[slot[present]] = stamps[present]
        absent = ~present
        placed = self._place(keys[absent], rows[absent], stamps[absent])
        return int(present.sum()) + placed

    def _place(self, keys: Tensor, rows: Tensor, stamps: Tensor) -> int:
        """Put keys known to be absent (and distinct) into their sets: the r-th key of a set (in
        batch order) takes the set's r-th least recently used slot; keys beyond `ways` are dropped."""
        if keys.numel() == 0:
            return 0
        sets = self._sets(keys)
        sorted_sets, order = torch.sort(sets, stable=True)
        touched, counts = torch.unique_consecutive(sorted_sets, return_counts=True)
        starts = torch.cumsum(counts, 0) - counts
        group = torch.repeat_interleave(torch.arange(touched.numel(), device=self.device), counts)
        rank = torch.arange(keys.numel(), device=self.device) - starts[group]
        keep = rank < self.ways
        by_age = torch.argsort(self._stamps[touched], dim=1)  # least recently used (or empty) first
        way = by_age[group[keep], rank[keep]]
        slot = sorted_sets[keep] * self.ways + way
        chosen = order[keep]
        self._keys.view(-1)[slot] = keys[chosen]
        self._stamps.view(-1)[slot] = stamps[chosen]
        self._rows[slot] = rows[chosen]
        return int(keep.sum())

    def invalidate(self, keys: Tensor) -> int:
        """Drop `keys` (those cached); returns how many were dropped."""
        hit, slot = self._find(keys)
        slot = torch.unique(slot[hit])
        self._keys.view(-1)[slot] = EMPTY
        self._stamps.view(-1)[slot] = EMPTY
        return int(slot.numel())

    def clear(self) -> None:
        self._keys.fill_(EMPTY)
        self._stamps.fill_(EMPTY)

    def resize(self, capacity_bytes: int) -> int:
        """Reallocate for `capacity_bytes` (see the module docstring for which rows are kept; their
        recency is kept too). Returns the number of rows evicted."""
        before = self.num_rows
        sets, ways = self._resized_geometry(capacity_bytes)
        if (sets, ways) == (self.num_sets, self.ways):
            return 0
        if sets == self.num_sets:
            self._set_ways(ways)
        else:
            self._rebuild(sets, ways)
        return before - self.num_rows

    def capacity_after_resize(self, capacity_bytes: int) -> int:
        """`capacity_bytes` after `resize(capacity_bytes)`: whole ways of the current sets, or a
        new geometry."""
        sets, ways = self._resized_geometry(capacity_bytes)
        return sets * ways * self.slot_bytes

    def _resized_geometry(self, capacity_bytes: int) -> tuple[int, int]:
        ways = capacity_bytes // self.slot_bytes // self.num_sets if self.num_sets else 0
        if 1 <= ways <= self.max_ways:
            return self.num_sets, ways
        return self._geometry(capacity_bytes)

    def _set_ways(self, ways: int) -> None:
        """Same sets, `ways` ways: each set keeps its most recently used slots (empty ones last)."""
        kept = min(ways, self.ways)
        order = torch.argsort(self._stamps, dim=1, descending=True)[:, :kept]
        old = torch.arange(self.num_sets, device=self.device).unsqueeze(1) * self.ways + order
        keys, stamps, rows = self._keys.gather(1, order), self._stamps.gather(1, order), self._rows[old]
        self._allocate(self.num_sets, ways)
        self._keys[:, :kept] = keys
        self._stamps[:, :kept] = stamps
        self._rows[:-1].view(self.num_sets, ways, self.dim)[:, :kept] = rows

    def _rebuild(self, num_sets: int, ways: int) -> None:
        """A new number of sets: place the most recently used rows that fit, newest first (so
        that in a set conflict the newest rows win)."""
        flat_keys, flat_stamps = self._keys.view(-1), self._stamps.view(-1)
        valid = torch.nonzero(flat_keys >= 0).squeeze(1)
        valid = valid[torch.argsort(flat_stamps[valid], descending=True)][: num_sets * ways]
        keys, stamps, rows = flat_keys[valid], flat_stamps[valid], self._rows[valid]
        del flat_keys, flat_stamps
        self._allocate(num_sets, ways)
        if self.capacity_rows:
            self._place(keys, rows, stamps)


def _first_occurrences(keys: Tensor) -> tuple[Tensor, Tensor]:
    """Distinct keys in order of first appearance, and the position of each first appearance."""
    unique, inverse = torch.unique(keys, return_inverse=True)
    positions = torch.arange(keys.numel(), dtype=torch.int64, device=keys.device)
    first = torch.full((unique.numel(),), keys.numel(), dtype=torch.int64, device=keys.device)
    first.scatter_reduce_(0, inverse, positions, reduce="amin")
    first = torch.sort(first).values
    return keys[first], first
