"""Workloads: DLRM requests from synthetic power laws, a Meta-fitted preset, or Criteo replay.

Every generator has `spec` and `generate(batch_size) -> SparseBatch`, and is deterministic by seed.
Data files live in the shared data folder (`data_dir()`, overridable with FLEXEMR_DATA_DIR).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Protocol

from flexemr.batch import SparseBatch
from flexemr.model.spec import ModelSpec
from flexemr.workload.criteo import CriteoReplay, criteo_spec
from flexemr.workload.meta import (
    META_ALPHA,
    META_BATCH,
    LocalityStats,
    fit_alpha,
    load_locality_stats,
    meta_spec,
    meta_workload,
    reuse_histogram,
    total_variation,
)
from flexemr.workload.query_sizes import QuerySizes
from flexemr.workload.synthetic import SyntheticConfig, SyntheticWorkload

CRITEO_SAMPLE = "criteo_kaggle_sample_1000.tsv"
META_STATS_2022 = "meta_dlrm_datasets_locality_stats_2022.txt"
MLPERF_QUERY_SIZES = "mlperf_dlrm_v2_dist_quantile.txt"


class Workload(Protocol):
    spec: ModelSpec

    def generate(self, batch_size: int) -> SparseBatch: ...


def data_dir() -> Path:
    """$FLEXEMR_DATA_DIR, else `shared/data` beside the repository checkout."""
    env = os.environ.get("FLEXEMR_DATA_DIR")
    return Path(env) if env else Path(__file__).resolve().parents[4] / "shared" / "data"


__all__ = [
    "CRITEO_SAMPLE",
    "META_ALPHA",
    "META_BATCH",
    "META_STATS_2022",
    "MLPERF_QUERY_SIZES",
    "CriteoReplay",
    "LocalityStats",
    "QuerySizes",
    "SyntheticConfig",
    "SyntheticWorkload",
    "Workload",
    "criteo_spec",
    "data_dir",
    "fit_alpha",
    "load_locality_stats",
    "meta_spec",
    "meta_workload",
    "reuse_histogram",
    "total_variation",
]
