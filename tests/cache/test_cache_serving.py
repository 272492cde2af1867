"""Scores stay exact with the ranker's cache in every mode, across evictions and resizes that
happen mid-traffic, with embedding servers as real processes."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterator

import numpy as np
import pytest

from flexemr.config import CacheMode, Endpoint, RankerConfig
from flexemr.config.model import ModelSource
from flexemr.config.spec import ClusterSpec
from flexemr.entrypoints.local import LocalCluster
from flexemr.entrypoints.roles import build_ranker
from flexemr.model.source import load_weights, model_spec
from flexemr.model.weights import build_monolithic
from flexemr.sharding.plan import make_plan
from flexemr.workload.synthetic import SyntheticConfig, SyntheticWorkload
from tests.core.helpers import reference_scores

SOURCE = ModelSource(preset="tiny", seed=21, pooling="mean")


@pytest.fixture(scope="module")
def cluster() -> Iterator[ClusterSpec]:
    spec = model_spec(SOURCE)
    plan = make_plan("row", spec.table_rows, spec.dim, 2)
    with LocalCluster(ClusterSpec(SOURCE, plan, (Endpoint(), Endpoint()))) as local:
        yield local.spec


@pytest.mark.parametrize("lookup", ["partial", "raw"])
@pytest.mark.parametrize("cache", ["fixed:2KiB", "fixed:64KiB", "adaptive"])
def test_cached_scores_are_exact(cluster: ClusterSpec, lookup: str, cache: str) -> None:
    # adaptive: a budget barely above the safety margin, so big batches squeeze the cache
    memory = 64 * 2**20 + 2**20 if cache == "adaptive" else None
    config = RankerConfig(
        lookup=lookup,
        cache=CacheMode.parse(cache),
        device_memory_bytes=memory,
        max_batch=4096,  # type: ignore[arg-type]
    )
    ranker = build_ranker(dataclasses.replace(cluster, ranker=config))
    monolithic = build_monolithic(load_weights(SOURCE))
    workload = SyntheticWorkload(model_spec(SOURCE), SyntheticConfig(alpha=1.1, empty_prob=0.1), seed=3)
    try:
        for i, batch_size in enumerate([1, 8, 64, 4096, 2, 16, 4096, 1] * 2):
            request = workload.generate(batch_size)
            got = ranker.score(request.dense, request.indices, request.lengths)
            expected = reference_scores(monolithic, request.dense, request.indices, request.lengths)
            np.testing.assert_allclose(got, expected, atol=1e-5, err_msg=f"batch {i} ({batch_size} samples)")
            time.sleep(0.06)  # let the background warmer run between batches
        stats = ranker.stats()["cache"]
    finally:
        ranker.close()
    assert stats["hits"] > 0  # the cache really served rows
    if cache == "adaptive":
        assert stats["shrinks"] > 0  # resized mid-traffic, before the big batches
        assert stats["grows"] > 0
