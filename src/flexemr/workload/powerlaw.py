"""Power-law row popularity, vectorised and O(1) in memory however big the table.

Ranks follow the continuous power law p(x) ~ x^-alpha on [1, rows + 1), floored: rank r (0-based)
gets probability proportional to the integral of x^-alpha over [r + 1, r + 2), which is Zipf's law
up to a small correction at the very head. Drawing by inverting the CDF needs no table of
probabilities, so a 40-million-row table costs nothing.

Ranks then go through a seeded affine permutation `(a * rank + b) mod rows` (a coprime to rows),
so the hot rows are spread over the id space instead of being ids 0, 1, 2, ...
"""

from __future__ import annotations

import math

import numpy as np


def zipf_ranks(rng: np.random.Generator, rows: int, alpha: float, size: int) -> np.ndarray:
    """`size` 0-based popularity ranks in [0, rows), rank 0 the hottest; alpha=0 is uniform."""
    if alpha < 0:
        raise ValueError(f"alpha must be >= 0, got {alpha}")
    u = rng.random(size)
    hi = float(rows + 1)
    if abs(alpha - 1.0) < 1e-9:
        x = np.exp(u * math.log(hi))
    else:
        e = 1.0 - alpha
        x = (1.0 + u * (hi**e - 1.0)) ** (1.0 / e)
    return np.minimum(x.astype(np.int64) - 1, rows - 1)


class RowPermutation:
    """A seeded bijection of [0, rows): rank -> row id, `(a * rank + b) mod rows`."""

    def __init__(self, rows: int, seed: int | np.random.SeedSequence) -> None:
        rng = np.random.default_rng(seed)
        self.rows = rows
        a = int(rng.integers(1, max(rows, 2)))
        while math.gcd(a, rows) != 1:
            a = a + 1 if a + 1 < rows else 1
        self.a = a
        self.b = int(rng.integers(0, rows))

    def __call__(self, ranks: np.ndarray) -> np.ndarray:
        # Python ints for a and b keep the product exact in int64 for rows < 2**31.
        return (ranks * self.a + self.b) % self.rows

    def inverse(self, ids: np.ndarray) -> np.ndarray:
        """Row id -> rank."""
        return ((ids - self.b) * pow(self.a, -1, self.rows)) % self.rows
