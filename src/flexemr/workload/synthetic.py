"""Synthetic DLRM requests: random bag sizes, power-law rows, a table mix and co-occurring rows.

For each (table, sample) bag:
1. its size is drawn from `bag_sizes` around the table's mean (the spec's pooling factor times the
   table's weight in `table_mix`); with probability `empty_prob` the bag is empty;
2. with probability `cooccurrence` the bag is a *group bag*: it holds consecutive members of one
   group of `group_size` ranks (the group drawn by the power law over groups), so the same rows keep
   appearing together; otherwise every row is drawn independently by the power law;
3. ranks become row ids through the table's seeded permutation (hot rows are not the low ids).
Everything is drawn for the whole batch at once.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

from flexemr.batch import SparseBatch
from flexemr.model.spec import DEFAULT_ZIPF_SKEW, ModelSpec
from flexemr.workload.powerlaw import RowPermutation, zipf_ranks

BagDistribution = Literal["fixed", "poisson", "uniform"]


@dataclass(frozen=True)
class SyntheticConfig:
    """How synthetic requests are drawn. Every field has a default that gives a skewed workload."""

    alpha: float | tuple[float, ...] = DEFAULT_ZIPF_SKEW
    """Power-law exponent of row popularity: one for all tables, or one per table (0 = uniform)."""
    bag_sizes: BagDistribution = "poisson"
    """Bag size distribution around the mean: exactly the mean, Poisson, or uniform on [0, 2*mean]."""
    table_mix: tuple[float, ...] = ()
    """Per-table weight multiplying the spec's pooling factor (0 leaves a table's bags empty);
    empty means weight 1 for every table."""
    empty_prob: float = 0.0
    """Probability that a bag is empty regardless of its drawn size."""
    max_bag: int = 1024
    """Bag sizes are clipped to this."""
    cooccurrence: float = 0.0
    """Probability that a bag is drawn as consecutive members of one group of rows."""
    group_size: int = 8
    """Rows per co-occurrence group."""

    def __post_init__(self) -> None:
        alphas = self.alpha if isinstance(self.alpha, tuple) else (self.alpha,)
        if min(alphas) < 0:
            raise ValueError(f"alpha must be >= 0, got {self.alpha}")
        if self.bag_sizes not in ("fixed", "poisson", "uniform"):
            raise ValueError(f"bag_sizes must be fixed, poisson or uniform, got {self.bag_sizes!r}")
        if self.table_mix and min(self.table_mix) < 0:
            raise ValueError(f"table_mix weights must be >= 0, got {self.table_mix}")
        if not 0 <= self.empty_prob <= 1 or not 0 <= self.cooccurrence <= 1:
            raise ValueError(
                f"empty_prob and cooccurrence are probabilities, got {self.empty_prob}, {self.cooccurrence}"
            )
        if self.max_bag < 1 or self.group_size < 1:
            raise ValueError(f"max_bag and group_size must be >= 1, got {self.max_bag}, {self.group_size}")

    def alphas(self, num_tables: int) -> np.ndarray:
        if isinstance(self.alpha, tuple):
            if len(self.alpha) != num_tables:
                raise ValueError(f"{len(self.alpha)} alphas for {num_tables} tables")
            return np.asarray(self.alpha, dtype=np.float64)
        return np.full(num_tables, self.alpha)

    def mean_bags(self, spec: ModelSpec) -> np.ndarray:
        mix = self.table_mix or (1.0,) * spec.num_tables
        if len(mix) != spec.num_tables:
            raise ValueError(f"table_mix has {len(mix)} weights for {spec.num_tables} tables")
        means: np.ndarray = np.asarray(spec.bag_sizes, dtype=np.float64) * np.asarray(mix)
        return means


class SyntheticWorkload:
    """Draws requests for `spec`; the same seed gives the same sequence of requests."""

    def __init__(self, spec: ModelSpec, config: SyntheticConfig | None = None, seed: int = 0) -> None:
        self.spec = spec
        self.config = config or SyntheticConfig()
        self._alphas = self.config.alphas(spec.num_tables)
        self._means = self.config.mean_bags(spec)
        seeds = np.random.SeedSequence(seed).spawn(spec.num_tables + 1)
        self._rng = np.random.default_rng(seeds[0])
        self.permutations = [RowPermutation(r, s) for r, s in zip(spec.table_rows, seeds[1:], strict=True)]

    def generate(self, batch_size: int) -> SparseBatch:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        rng, cfg = self._rng, self.config
        lengths = self._bag_lengths(batch_size)
        grouped = rng.random(lengths.shape) < cfg.cooccurrence
        indices = [self._table_rows(t, lengths[t], grouped[t]) for t in range(self.spec.num_tables)]
        dense = rng.standard_normal((batch_size, self.spec.num_dense), dtype=np.float32)
        return SparseBatch(dense, np.concatenate(indices), lengths.ravel().astype(np.int32))

    def _bag_lengths(self, batch_size: int) -> np.ndarray:
        rng, cfg = self._rng, self.config
        means = np.broadcast_to(self._means[:, None], (self.spec.num_tables, batch_size))
        if cfg.bag_sizes == "fixed":
            lengths = np.rint(means).astype(np.int64)
        elif cfg.bag_sizes == "poisson":
            lengths = rng.poisson(means)
        else:
            lengths = rng.integers(0, np.floor(2 * means).astype(np.int64) + 1)
        lengths[rng.random(lengths.shape) < cfg.empty_prob] = 0
        clipped: np.ndarray = np.minimum(lengths, cfg.max_bag)
        return clipped

    def _table_rows(self, table: int, lengths: np.ndarray, grouped: np.ndarray) -> np.ndarray:
        """Row ids for one table's bags: independent power-law draws, or runs through one group."""
        rng, rows, alpha = self._rng, self.spec.table_rows[table], float(self._alphas[table])
        total = int(lengths.sum())
        ranks = zipf_ranks(rng, rows, alpha, total)
        if grouped.any():
            group_size = min(self.config.group_size, rows)
            groups = zipf_ranks(rng, -(-rows // group_size), alpha, len(lengths))
            bag_of = np.repeat(np.arange(len(lengths)), lengths)
            position = np.arange(total) - np.repeat(np.cumsum(lengths) - lengths, lengths)
            in_group = grouped[bag_of]
            member = groups[bag_of] * group_size + position % group_size
            ranks = np.where(in_group, np.minimum(member, rows - 1), ranks)
        return self.permutations[table](ranks).astype(np.int64)
