"""How many user-item pairs one query carries in MLPerf Inference DLRM-v2's Server scenario.

The file holds 20 equally likely quantiles (100, 100, 200, ..., 700); MLPerf draws a query's size
uniformly among them, as does `QuerySizes.sample`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


class QuerySizes:
    """Query sizes drawn uniformly from MLPerf DLRM-v2's quantile list."""

    def __init__(self, quantiles: np.ndarray | list[int]) -> None:
        values = np.asarray(quantiles, dtype=np.int64)
        if values.ndim != 1 or values.size == 0 or values.min() < 1:
            raise ValueError(f"quantiles must be a non-empty list of positive sizes, got {quantiles!r}")
        self.quantiles = values

    @classmethod
    def load(cls, path: str | Path) -> QuerySizes:
        """Parse `dist_quantile.txt`: comma-separated integers."""
        text = Path(path).read_text()
        return cls([int(v) for v in text.replace("\n", ",").split(",") if v.strip()])

    @property
    def mean(self) -> float:
        return float(self.quantiles.mean())

    def sample(self, rng: np.random.Generator, count: int) -> np.ndarray:
        """`count` query sizes."""
        return self.quantiles[rng.integers(0, len(self.quantiles), size=count)]
