"""An embedding server's rows and the lookup kernels.

The server's shards sit back to back in server-local row numbers (the plan's `local_start`). Rows
are kept per row format (`flexemr.model.rows`): one array per format the server's tables use, a
segment, so an fp16 table takes half and an int8 table about a quarter of the fp32 bytes.

    local rows:  [ t0 shard: int8 | t1 shard: fp32 | t2 shard: int8 ]
    segments:    int8 [t0 rows, t2 rows] (uint8, dim + 8 wide)   fp32 [t1 rows] (float32, dim wide)

With one format (the usual case) the segment is the local array itself. Otherwise a subrequest's
rows are mapped to (segment, row) with one `searchsorted`, bags are grouped by format and each
group pooled by its kernel (a bag's rows all come from one table, so from one segment).

A shard that holds some columns of its rows (column-wise sharding) stores just those: its rows
are the whole rows' stored bytes cut to its columns (`rows.columns`; an int8 slice keeps the row's
scale and bias), so it pools and decodes to exactly the whole rows' values in those columns.
Segments are per (format, width); answers are as wide as the server's widest shard, narrower
shards' bags zero-filled on the right. Writes take whole rows and keep each shard's columns.

Where the segments live is a `Storage`: anonymous memory advised for transparent huge pages (DRAM),
or a file this server memory-maps (the SSD tier: the page cache is the DRAM tier, so hot rows stay
resident and a server can hold more rows than it has RAM). Kernels release the GIL while they run.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch
from tqdm import tqdm

from flexemr.config.model import RowFormat
from flexemr.config.plan import Shard, ShardingPlan
from flexemr.embedding_server.storage import DramStorage, Layout, Storage
from flexemr.model import rows as stored_rows
from flexemr.model.weights import WeightSource, fill_stored

log = logging.getLogger(__name__)

_LOAD_CHUNK_ROWS = 1 << 18


class BadSubrequest(ValueError):
    """A subrequest this server cannot answer (bad rows or offsets); sent back as an ERROR frame."""


@dataclass(frozen=True)
class RowImage:
    """Some rows' stored bytes as they were before a write, per segment: (rows within the segment,
    ascending; their stored bytes). A lookup at an older version reads these in place of the rows
    written since."""

    parts: tuple[tuple[np.ndarray, np.ndarray], ...]

    @property
    def nbytes(self) -> int:
        return sum(rows.nbytes + stored.nbytes for rows, stored in self.parts)

    @staticmethod
    def earliest(images: list[RowImage]) -> RowImage:
        """One image of `images` (oldest first): each row as the first of them that holds it."""
        parts = []
        for segment in zip(*(image.parts for image in images), strict=True):
            rows, first = np.unique(np.concatenate([r for r, _ in segment]), return_index=True)
            parts.append((rows, np.concatenate([b for _, b in segment])[first]))
        return RowImage(tuple(parts))


@dataclass(frozen=True)
class Segment:
    fmt: RowFormat
    width: int
    """Columns of each row."""
    rows: int
    shards: tuple[tuple[Shard, int], ...]
    """Each shard of this format with the row where it starts in the segment."""


def segments_of(plan: ShardingPlan, server: int, formats: tuple[RowFormat, ...]) -> list[Segment]:
    """One segment per (row format, width) among the server's shards, shards in local order."""
    shards = sorted(plan.shards_of(server), key=lambda s: s.local_start)

    def kind(shard: Shard) -> tuple[RowFormat, int]:
        start, end = shard.columns(plan.dim)
        if formats[shard.table] == "int4" and (start % 2 or end % 2):
            raise ValueError(
                f"table {shard.table} is stored as int4 (two values a byte): its column shards must "
                f"start and end at even columns, got [{start}, {end})"
            )
        return formats[shard.table], end - start

    if len({kind(s) for s in shards}) <= 1:  # keep local row numbers: no remapping
        fmt, width = kind(shards[0]) if shards else ("fp32", plan.dim)
        return [Segment(fmt, width, plan.server_rows(server), tuple((s, s.local_start) for s in shards))]
    segments = []
    for fmt, width in dict.fromkeys(kind(s) for s in shards):
        mine = [s for s in shards if kind(s) == (fmt, width)]
        starts = np.cumsum([0] + [s.rows for s in mine])
        placed = tuple(zip(mine, starts[:-1].tolist(), strict=True))
        segments.append(Segment(fmt, width, int(starts[-1]), placed))
    return segments


def store_layout(plan: ShardingPlan, server: int, formats: tuple[RowFormat, ...]) -> Layout:
    """What a server's segments need: dtype, row width and rows of each."""
    return [
        (*stored_rows.storage(seg.fmt, seg.width), seg.rows) for seg in segments_of(plan, server, formats)
    ]


class ShardStore:
    def __init__(
        self,
        plan: ShardingPlan,
        server: int,
        source: WeightSource,
        progress: bool = True,
        storage: Storage | None = None,
    ) -> None:
        """`storage`: where the rows live (default: memory)."""
        storage = storage or DramStorage()
        self.server = server
        self.dim = plan.dim
        """Columns of the rows a write gives (whole rows)."""
        self.width = plan.server_width(server)
        """Columns of a lookup's answer (the widest shard's; narrower ones zero-filled)."""
        self.table_rows = plan.table_rows
        self.num_rows = plan.server_rows(server)
        self.shards = plan.shards_of(server)
        self.segments = segments_of(plan, server, source.spec.formats)
        arrays, fill = storage.open(store_layout(plan, server, source.spec.formats))
        if fill:
            self._fill(source, arrays, progress)
            storage.commit()
        self.tables = [torch.from_numpy(a) for a in arrays]
        self._arrays = arrays
        self._storage = storage
        # Remapping local rows to (segment, row): shard starts in local order, per shard its segment,
        # the shift from local to segment row numbers and its first column.
        placed = sorted(
            (shard.local_start, i, at - shard.local_start, shard.col_start)
            for i, seg in enumerate(self.segments)
            for shard, at in seg.shards
        )
        self._starts = np.array([p[0] for p in placed], dtype=np.int64)
        self._segment_of = np.array([p[1] for p in placed], dtype=np.int64)
        self._shift = np.array([p[2] for p in placed], dtype=np.int64)
        self._col_start = np.array([p[3] for p in placed], dtype=np.int64)
        # Local rows to global cache keys (the router's: table base + row), per shard in local order.
        table_base = np.concatenate([[0], np.cumsum(plan.table_rows)[:-1]]).astype(np.int64)
        self._key_shift = np.array(
            [table_base[s.table] + s.row_start - s.local_start for s in self.shards], dtype=np.int64
        )

    def _fill(self, source: WeightSource, arrays: list[np.ndarray], progress: bool) -> None:
        total = sum(s.rows for s in self.shards)
        with tqdm(
            total=total,
            unit="rows",
            unit_scale=True,
            disable=not progress,
            desc=f"server {self.server} loading",
        ) as bar:
            for seg, array in zip(self.segments, arrays, strict=True):
                for shard, at in seg.shards:
                    for start in range(0, shard.rows, _LOAD_CHUNK_ROWS):
                        n = min(_LOAD_CHUNK_ROWS, shard.rows - start)
                        out = array[at + start : at + start + n]
                        if seg.width == self.dim:
                            fill_stored(source, shard.table, shard.row_start + start, out)
                        else:  # whole rows, as stored, cut to the shard's columns
                            dtype, width = stored_rows.storage(seg.fmt, self.dim)
                            whole = np.empty((n, width), dtype=dtype)
                            fill_stored(source, shard.table, shard.row_start + start, whole)
                            out[:] = stored_rows.columns(
                                whole, seg.fmt, shard.col_start, shard.col_start + seg.width
                            )
                        bar.update(n)

    @property
    def nbytes(self) -> int:
        return sum(int(t.numel() * t.element_size()) for t in self.tables)

    def _check(self, rows: np.ndarray, offsets: np.ndarray | None, weights: np.ndarray | None) -> None:
        # One pass: as unsigned, a negative row is over every row number.
        if rows.size and rows.view(rows.dtype.str.replace("i", "u")).max() >= self.num_rows:
            bad = rows[(rows < 0) | (rows >= self.num_rows)][0]
            raise BadSubrequest(f"row {bad} is outside this server's {self.num_rows} rows")
        if offsets is not None and offsets.size:
            if offsets[0] != 0 or offsets[-1] > rows.size or np.any(np.diff(offsets) < 0):
                raise BadSubrequest("bag offsets must start at 0, not decrease, and stay within the rows")
        if weights is not None and weights.shape != rows.shape:
            raise BadSubrequest(f"{weights.size} weights for {rows.size} rows")

    def _locate(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Segment and row within it of each server-local row."""
        shard = np.searchsorted(self._starts, rows, side="right") - 1
        return self._segment_of[shard], rows + self._shift[shard]

    def keys(self, rows: np.ndarray) -> np.ndarray:
        """The global cache keys (int64) of server-local `rows`."""
        shard = np.searchsorted(self._starts, rows, side="right") - 1
        keys: np.ndarray = rows + self._key_shift[shard]
        return keys

    def write(self, rows: np.ndarray, values: np.ndarray) -> None:
        """Store float32 `values` [n, dim] (whole rows) as server-local `rows` [n], encoded in each
        row's format as at load (so an int8 row's bytes equal those a checkpoint of these values
        would load), each cut to its shard's columns."""
        self.check_write(rows, values)
        self._storage.modified()
        if len(self.segments) == 1 and not self._col_start.any():
            self._write_segment(0, rows, values, 0)
            return
        shard = np.searchsorted(self._starts, rows, side="right") - 1
        segment, at, first = self._segment_of[shard], rows + self._shift[shard], self._col_start[shard]
        group = segment * (self.dim + 1) + first
        for g in np.unique(group).tolist():
            mine = group == g
            self._write_segment(g // (self.dim + 1), at[mine], values[mine], g % (self.dim + 1))

    def check_write(self, rows: np.ndarray, values: np.ndarray) -> None:
        """Raise BadSubrequest unless `write(rows, values)` can store them."""
        self._check(rows, None, None)
        if values.shape != (rows.size, self.dim) or values.dtype != np.float32:
            raise BadSubrequest(f"values of shape {values.shape} for {rows.size} rows of dim {self.dim}")
        if not np.isfinite(values).all():
            raise BadSubrequest("values must be finite (no NaN or infinity)")
        segment = np.zeros(rows.size, dtype=np.int64) if len(self.segments) == 1 else self._locate(rows)[0]
        for s, seg in enumerate(self.segments):
            mine = np.flatnonzero(segment == s)
            bad = mine[stored_rows.overflowing(values[mine], seg.fmt)]
            if bad.size:
                raise BadSubrequest(
                    f"row {rows[bad[0]]} cannot be stored as {seg.fmt}: {stored_rows.OVERFLOW_HINT}"
                )

    def image(self, rows: np.ndarray) -> RowImage:
        """The stored bytes of server-local `rows` now (what writing them overwrites)."""
        segment, at = self._locate(rows)
        parts = []
        for s, array in enumerate(self._arrays):
            mine = np.unique(at[segment == s])
            parts.append((mine, array[mine]))
        return RowImage(tuple(parts))

    def restore(self, image: RowImage) -> None:
        """Put back the stored bytes `image` holds (a snapshot's rows), as they were."""
        self._storage.modified()
        for array, (rows, stored) in zip(self._arrays, image.parts, strict=True):
            array[rows] = stored

    def _write_segment(self, s: int, rows: np.ndarray, values: np.ndarray, first: int) -> None:
        """Whole rows `values` encoded, cut to columns `first` on, into segment `s`'s `rows`."""
        array, seg = self._arrays[s], self.segments[s]
        dtype, width = stored_rows.storage(seg.fmt, self.dim)
        encoded = np.empty((rows.size, width), dtype=dtype)
        stored_rows.encode(np.ascontiguousarray(values), seg.fmt, encoded)
        array[rows] = stored_rows.columns(encoded, seg.fmt, first, first + seg.width)

    def _held(self, s: int, at: np.ndarray, image: RowImage | None) -> tuple[np.ndarray, np.ndarray] | None:
        """Which of segment `s`'s rows `at` `image` holds (mask), and where in it (positions); None
        when it holds none of them."""
        if image is None or at.size == 0 or image.parts[s][0].size == 0:
            return None
        old_rows = image.parts[s][0]
        pos = np.minimum(np.searchsorted(old_rows, at), old_rows.size - 1)
        hit = old_rows[pos] == at
        return (hit, pos) if hit.any() else None

    def _pool(
        self,
        s: int,
        at: np.ndarray,
        offsets: np.ndarray,
        weights: torch.Tensor | None,
        image: RowImage | None,
    ) -> torch.Tensor:
        """Per-bag sums of segment `s`'s rows `at`. The few bags that read a row `image` holds are
        summed again from a copy of their rows with the image's bytes: the same kernel over the
        same values in the same order, so bit for bit what the table gave at that version."""
        table, fmt, index = self.tables[s], self.segments[s].fmt, torch.from_numpy(at)
        pooled = stored_rows.pool(table, fmt, index, torch.from_numpy(offsets), weights)
        held = self._held(s, at, image)
        if held is None or image is None:
            return pooled
        hit, pos = held
        bag = np.searchsorted(offsets, np.arange(at.size), side="right") - 1
        bags = np.unique(bag[hit])
        mine = np.isin(bag, bags)
        rows = table.index_select(0, index[torch.from_numpy(mine)])
        again = hit[mine]
        rows[torch.from_numpy(again)] = torch.from_numpy(image.parts[s][1][pos[mine][again]])
        lengths = np.diff(offsets, append=at.size)[bags]
        pooled[torch.from_numpy(bags)] = stored_rows.pool(
            rows,
            fmt,
            torch.arange(rows.shape[0], dtype=index.dtype),
            torch.from_numpy((np.cumsum(lengths) - lengths).astype(offsets.dtype)),
            None if weights is None else weights[torch.from_numpy(mine)],
        )
        return pooled

    def _raw(self, s: int, at: np.ndarray, image: RowImage | None) -> torch.Tensor:
        """Segment `s`'s rows `at` as float32; those `image` holds as it holds them."""
        fmt = self.segments[s].fmt
        rows = stored_rows.decode(self.tables[s].index_select(0, torch.from_numpy(at)), fmt)
        held = self._held(s, at, image)
        if held is not None and image is not None:
            hit, pos = held
            old = torch.from_numpy(image.parts[s][1][pos[hit]])
            rows[torch.from_numpy(hit)] = stored_rows.decode(old, fmt)
        return rows

    def pooled(
        self,
        rows: np.ndarray,
        offsets: np.ndarray,
        weights: np.ndarray | None = None,
        image: RowImage | None = None,
    ) -> np.ndarray:
        """Per-bag sums of this server's rows, in float32: [len(offsets), width]; rows that `image`
        holds as it holds them (a lookup at an older version)."""
        self._check(rows, offsets, weights)
        if offsets.size == 0:
            return np.zeros((0, self.width), dtype=np.float32)
        w = None if weights is None else torch.from_numpy(weights)
        if len(self.segments) == 1:
            return self._pool(0, rows, offsets, w, image).numpy()
        segment, at = self._locate(rows)
        lengths = np.diff(offsets, append=rows.size)
        bag_segment = segment[np.minimum(offsets, max(rows.size - 1, 0))] if rows.size else offsets * 0
        if np.any(segment != np.repeat(bag_segment, lengths)):
            raise BadSubrequest("a bag mixes rows of tables stored in different row formats")
        out = torch.zeros(offsets.size, self.width)
        for s in range(len(self.segments)):
            bags = np.flatnonzero((bag_segment == s) & (lengths > 0))
            if bags.size == 0:
                continue
            mine = segment == s
            sizes = lengths[bags]
            starts = np.cumsum(sizes) - sizes
            weights_s = None if w is None else w[torch.from_numpy(mine)]
            out[torch.from_numpy(bags), : self.segments[s].width] = self._pool(
                s, at[mine], starts, weights_s, image
            )
        return out.numpy()

    def raw(self, rows: np.ndarray, image: RowImage | None = None) -> np.ndarray:
        """The rows themselves as float32 (int8 and fp16 rows dequantised): [len(rows), width]; rows
        that `image` holds as it holds them."""
        self._check(rows, None, None)
        if len(self.segments) == 1:
            return self._raw(0, rows, image).numpy()
        segment, at = self._locate(rows)
        out = np.zeros((rows.size, self.width), dtype=np.float32)
        for s in range(len(self.segments)):
            mine = segment == s
            out[mine, : self.segments[s].width] = self._raw(s, at[mine], image).numpy()
        return out
