"""Replay of Criteo Kaggle rows (label, 13 integer features, 26 categorical hashes; tab-separated).

Preprocessing follows Meta's reference DLRM: integer features clipped at 0 and mapped to
log(x + 1) (missing = 0); categorical feature t, an 8-hex-digit hash, becomes row
`int(hash, 16) % table_rows[t]` of table t, a bag of one row. A missing categorical value becomes an
*empty bag* (size 0), so the model sees "no value" rather than a made-up row; the reference instead
hashes the empty string to a row of its own, which a replay can get with a dedicated row if needed.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from flexemr.batch import SparseBatch
from flexemr.model.spec import ModelSpec

CRITEO_DENSE = 13
CRITEO_TABLES = 26
_COLUMNS = 1 + CRITEO_DENSE + CRITEO_TABLES


def criteo_spec(rows_per_table: int | tuple[int, ...] = 1000, dim: int = 16) -> ModelSpec:
    """A small DLRM for Criteo rows: 13 dense features, 26 one-hot tables."""
    rows = rows_per_table if isinstance(rows_per_table, tuple) else (rows_per_table,) * CRITEO_TABLES
    return ModelSpec(
        table_rows=rows,
        dim=dim,
        bottom_mlp=(CRITEO_DENSE, 64, dim),
        top_mlp=(64, 1),
        pooling_factors=(1,) * CRITEO_TABLES,
    )


class CriteoReplay:
    """Criteo rows as requests for `spec` (13 dense features, 26 tables), replayed in file order and
    wrapping around."""

    def __init__(self, path: str | Path, spec: ModelSpec) -> None:
        if spec.num_dense != CRITEO_DENSE or spec.num_tables != CRITEO_TABLES:
            raise ValueError(
                f"Criteo rows need a spec with {CRITEO_DENSE} dense features and {CRITEO_TABLES} tables, "
                f"got {spec.num_dense} and {spec.num_tables}; see criteo_spec()"
            )
        self.spec = spec
        fields = _read_fields(Path(path))
        self.labels = np.array([int(f or 0) for f in fields[:, 0]], dtype=np.int32)
        ints = fields[:, 1 : 1 + CRITEO_DENSE]
        raw = np.where(ints == "", "0", ints).astype(np.float64)
        self.dense = np.log1p(np.maximum(raw, 0.0)).astype(np.float32)
        cats = fields[:, 1 + CRITEO_DENSE :]
        self.present = cats != ""
        hashes = np.array([int(h, 16) if h else 0 for h in cats.ravel()], dtype=np.uint64).reshape(cats.shape)
        rows = np.asarray(spec.table_rows, dtype=np.uint64)
        self.rows = (hashes % rows).astype(np.int64)  # per (sample, table); unused where not present
        self.all = self._request(np.arange(len(fields)))
        self._next = 0

    def __len__(self) -> int:
        return len(self.labels)

    def generate(self, batch_size: int) -> SparseBatch:
        """The next `batch_size` rows of the file, wrapping around at its end."""
        picked = (self._next + np.arange(batch_size)) % len(self)
        self._next = int(picked[-1] + 1) % len(self)
        return self.all.take(picked)

    def _request(self, samples: np.ndarray) -> SparseBatch:
        present = self.present[samples].T  # table-major [T, B]
        indices = self.rows[samples].T[present]
        return SparseBatch(self.dense[samples], indices.astype(np.int64), present.astype(np.int32).ravel())


def _read_fields(path: Path) -> np.ndarray:
    """All rows as a [n, 40] array of strings, short rows padded with empty fields."""
    lines = [line.rstrip("\n").split("\t") for line in path.read_text().splitlines() if line.strip()]
    for i, fields in enumerate(lines):
        if len(fields) > _COLUMNS:
            raise ValueError(f"{path}:{i + 1} has {len(fields)} fields, expected at most {_COLUMNS}")
    return np.array([fields + [""] * (_COLUMNS - len(fields)) for fields in lines], dtype=object)
