"""`RowUpdates`: new values for some rows of some tables, from one source; and reading them from a
file (npz, or a `torch.save`d dict: arrays `table`, `row`, `values`)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from flexemr.extras import needs_extra
from flexemr.model.rows import OVERFLOW_HINT, overflowing
from flexemr.model.spec import ModelSpec


@dataclass(frozen=True)
class RowUpdates:
    """One batch from one source: row `rows[i]` of table `tables[i]` becomes `values[i]`."""

    tables: np.ndarray
    """int64 [n]."""
    rows: np.ndarray
    """int64 [n]: the row within its table."""
    values: np.ndarray
    """float32 [n, dim]."""
    source: str = "default"
    """With `sequence`, what makes a batch apply at most once: (source, sequence) pairs already
    applied are acknowledged and skipped (at-least-once delivery made exact)."""
    sequence: int | None = None

    def check(self, spec: ModelSpec) -> None:
        """Raise ValueError, naming the field and a bad value, unless these rows fit `spec`."""
        n = self.tables.shape[0] if self.tables.ndim == 1 else -1
        if self.tables.ndim != 1 or self.rows.shape != (n,) or n == 0:
            raise ValueError(
                f"table and row must be non-empty 1-D arrays of one length, got shapes "
                f"{self.tables.shape} and {self.rows.shape}"
            )
        if self.values.shape != (n, spec.dim):
            raise ValueError(f"values must be [{n}, {spec.dim}] (rows, dim), got {list(self.values.shape)}")
        for name, array in (("table", self.tables), ("row", self.rows), ("values", self.values)):
            kind = "f" if name == "values" else "iu"
            if array.dtype.kind not in kind:
                raise ValueError(
                    f"{name} must be {'float' if name == 'values' else 'integer'}, got {array.dtype}"
                )
        bad = (self.tables < 0) | (self.tables >= spec.num_tables)
        if bad.any():
            raise ValueError(
                f"table {int(self.tables[bad][0])} is not a table of the model (0..{spec.num_tables - 1})"
            )
        limit = np.asarray(spec.table_rows, dtype=np.int64)[self.tables]
        bad = (self.rows < 0) | (self.rows >= limit)
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise ValueError(
                f"row {int(self.rows[i])} is outside table {int(self.tables[i])}'s {int(limit[i])} rows"
            )
        if not np.isfinite(self.values).all():
            raise ValueError("values must be finite (no NaN or infinity)")
        formats = np.asarray(spec.formats)[self.tables]
        for fmt in np.unique(formats).tolist():
            mine = np.flatnonzero(formats == fmt)
            bad = mine[overflowing(self.values[mine], fmt)]
            if bad.size:
                raise ValueError(
                    f"row {int(self.rows[bad[0]])} of table {int(self.tables[bad[0]])} cannot be stored as "
                    f"{fmt}: {OVERFLOW_HINT}"
                )
        if self.sequence is not None and self.sequence < 0:
            raise ValueError(f"sequence must be non-negative, got {self.sequence}")


def read_updates(path: Path, source: str = "default", sequence: int | None = None) -> RowUpdates:
    """Rows from `path`: an `.npz` or a `torch.save`d dict (`.pt`), with arrays `table` [n], `row`
    [n] and `values` [n, dim], or a Parquet file with columns `table`, `row` and `values` (a list
    of dim floats per row; needs pyarrow: the `parquet` extra). Raises ValueError for a file
    without them."""
    path = Path(path)
    if path.suffix == ".npz":
        with np.load(path, allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files}
    elif path.suffix == ".parquet":
        arrays = _read_parquet(path)
    else:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(loaded, dict):
            raise ValueError(f"{path}: expected a dict of table, row, values; got {type(loaded).__name__}")
        arrays = {k: v.numpy() if isinstance(v, torch.Tensor) else np.asarray(v) for k, v in loaded.items()}
    missing = [k for k in ("table", "row", "values") if k not in arrays]
    if missing:
        raise ValueError(f"{path}: missing array(s) {', '.join(missing)} (needs table, row, values)")
    return RowUpdates(arrays["table"], arrays["row"], arrays["values"], source, sequence)


def _read_parquet(path: Path) -> dict[str, np.ndarray]:
    with needs_extra("parquet"):
        import pyarrow.parquet as pq
    columns = pq.read_table(path)
    names = columns.column_names
    arrays = {name: columns.column(name).to_numpy() for name in ("table", "row") if name in names}
    if "values" in names:
        values = columns.column("values").combine_chunks()
        lengths = np.unique(values.value_lengths().to_numpy(zero_copy_only=False))
        if lengths.size > 1 or values.null_count:
            raise ValueError(f"{path}: every row's values must be a list of the same length (dim)")
        flat = values.flatten().to_numpy(zero_copy_only=False)
        arrays["values"] = flat.reshape(len(values), int(lengths[0]) if lengths.size else 0)
    return arrays
