"""A synthetic workload fitted to Meta's production embedding traces (dlrm_datasets, 2022).

The traces themselves are not public here; their per-batch locality statistics are. For each batch
the stats file gives the *reuse histogram*: over the distinct (table, row) pairs a batch touches,
the fraction used once, twice, 3-4 times, 5-8, ... (bins (0,1], (1,2], (2,4], ..., (32768, inf)).

The 2022 traces (788 tables, batch 131,072) have a mean reuse of 12.7 and a broad histogram (34%
used once, then 14%, 15%, 14%, 11%, 7%, ...). One power law over equally sized tables cannot make
such a broad histogram: every table then has the same lookups-to-rows ratio. Production tables
differ wildly in size, so the preset spreads table sizes log-uniformly (`META_ROWS`, fitted by hand
once with the exponent so the mean reuse is 12.7) and fits the single exponent `alpha` by minimising
the total variation distance between the generated and the real histogram (`fit_alpha`).
The fit holds at the preset's batch size, `META_BATCH`: reuse counts grow with the batch.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy.optimize import minimize_scalar

from flexemr.batch import SparseBatch
from flexemr.model.spec import ModelSpec
from flexemr.workload.synthetic import SyntheticConfig, SyntheticWorkload

REUSE_EDGES = np.array([1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768])
"""Upper edges of the reuse bins (0,1], (1,2], (2,4], ..., (16384,32768]; a last bin takes the rest."""

META_BATCH = 4096
META_POOLING = 14
"""Lookups per table per sample: 1.405e9 lookups / 788 tables / 131,072 samples = 13.6."""
META_ROWS = tuple(int(r) for r in np.geomspace(360, 27_000, 16).round())
META_ALPHA = 0.975
"""`fit_alpha` on the 2022 stats with the preset's layout and seed 0 (see tests/workload)."""


@dataclass(frozen=True)
class LocalityStats:
    """The reuse statistics of a set of trace batches, averaged over batches."""

    name: str
    batches: int
    lookups: float
    """Indices per batch."""
    distinct: float
    """Distinct (table, row) pairs per batch."""
    reuse_histogram: np.ndarray
    """Fraction of distinct rows in each reuse bin (17 bins, see `REUSE_EDGES`)."""

    @property
    def mean_reuse(self) -> float:
        return self.lookups / self.distinct


def load_locality_stats(path: str | Path) -> LocalityStats:
    """Parse a `meta_dlrm_datasets_locality_stats_*.txt` file (all its batches, averaged)."""
    text = Path(path).read_text()
    blocks = [b for b in re.split(r"\n(?=fbgemm_\S+\.pt\n)", text.strip()) if b.strip()]
    lookups, distinct, hists = [], [], []
    for block in blocks:
        lookups.append(float(_field(block, r"Avg # of indices: (\d+)")))
        distinct.append(float(_field(block, r"Avg # of unique cols: (\d+)")))
        section = block.split("Histogram of col sizes:")[1].split("Ratio of index")[0]
        hist = [float(v) for v in re.findall(r"^\(.*: ([0-9.]+)$", section, re.MULTILINE)]
        if len(hist) != len(REUSE_EDGES) + 1:
            raise ValueError(f"{path}: expected {len(REUSE_EDGES) + 1} reuse bins, found {len(hist)}")
        hists.append(hist)
    if not blocks:
        raise ValueError(f"{path} holds no fbgemm_*.pt batches")
    name = blocks[0].split("\n", 1)[0].strip()
    mean_hist = np.mean(hists, axis=0)
    return LocalityStats(name, len(blocks), float(np.mean(lookups)), float(np.mean(distinct)), mean_hist)


def _field(block: str, pattern: str) -> str:
    match = re.search(pattern, block)
    if match is None:
        raise ValueError(f"locality stats block has no match for {pattern!r}")
    return match.group(1)


def reuse_counts(request: SparseBatch) -> np.ndarray:
    """How many times each distinct (table, row) pair occurs in the request."""
    counts = [np.unique(request.table_indices(t), return_counts=True)[1] for t in range(request.num_tables)]
    return np.concatenate(counts)


def reuse_histogram(request: SparseBatch) -> np.ndarray:
    """Fraction of distinct (table, row) pairs in each reuse bin, as in the locality stats files."""
    counts = reuse_counts(request)
    return np.bincount(np.searchsorted(REUSE_EDGES, counts), minlength=len(REUSE_EDGES) + 1) / len(counts)


def total_variation(p: np.ndarray, q: np.ndarray) -> float:
    """Half the L1 distance between two histograms: 0 = equal, 1 = disjoint."""
    return 0.5 * float(np.abs(np.asarray(p) - np.asarray(q)).sum())


def meta_spec(dim: int = 16, num_dense: int = 13) -> ModelSpec:
    """The preset's model shape: `META_ROWS` tables pooling `META_POOLING` rows per bag."""
    return ModelSpec(
        table_rows=META_ROWS,
        dim=dim,
        bottom_mlp=(num_dense, 64, dim),
        top_mlp=(64, 1),
        pooling_factors=(META_POOLING,) * len(META_ROWS),
    )


def meta_config(alpha: float = META_ALPHA) -> SyntheticConfig:
    return SyntheticConfig(alpha=alpha, bag_sizes="poisson")


def meta_workload(seed: int = 0, dim: int = 16) -> SyntheticWorkload:
    """The Meta-like workload; draw batches of `META_BATCH` samples for the fitted reuse histogram."""
    return SyntheticWorkload(meta_spec(dim), meta_config(), seed)


def fit_alpha(stats: LocalityStats, spec: ModelSpec, batch_size: int = META_BATCH, seed: int = 0) -> float:
    """The exponent whose generated reuse histogram is closest (total variation) to `stats`'."""

    def distance(alpha: float) -> float:
        request = SyntheticWorkload(spec, meta_config(alpha), seed).generate(batch_size)
        return total_variation(reuse_histogram(request), stats.reuse_histogram)

    result = minimize_scalar(distance, bounds=(0.5, 1.5), method="bounded", options={"xatol": 0.005})
    return float(result.x)
