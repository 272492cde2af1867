"""Served scores equal the monolithic model's, with embedding servers as real processes."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import numpy as np
import pytest

from flexemr.config import Endpoint, RankerConfig
from flexemr.config.model import ModelSource
from flexemr.config.spec import ClusterSpec
from flexemr.entrypoints.local import LocalCluster
from flexemr.entrypoints.roles import build_ranker
from flexemr.model.source import load_weights, model_spec
from flexemr.model.weights import build_monolithic
from flexemr.sharding.plan import make_plan
from tests.core.helpers import random_batch, reference_scores

VARIANTS = [
    # (interaction, itself, pooling)
    ("dot", False, "sum"),
    ("dot", True, "mean"),
    ("cat", False, "sum"),
    ("cat", False, "mean"),
]


@pytest.fixture(scope="module", params=[("table", 1), ("table", 3), ("row", 2), ("row", 4)], ids=str)
def servers(request: pytest.FixtureRequest) -> Iterator[ClusterSpec]:
    strategy, count = request.param
    source = ModelSource(preset="tiny", seed=7)
    spec = model_spec(source)
    plan = make_plan(strategy, spec.table_rows, spec.dim, count)
    cluster = LocalCluster(ClusterSpec(source, plan, tuple(Endpoint() for _ in range(count))))
    yield cluster.start()
    cluster.stop()


@pytest.mark.parametrize("lookup", ["partial", "raw"])
def test_scores_equal_monolithic(servers: ClusterSpec, lookup: str) -> None:
    for interaction, itself, pooling in VARIANTS:
        source = dataclasses.replace(
            servers.model, interaction=interaction, interaction_itself=itself, pooling=pooling
        )
        spec = dataclasses.replace(servers, model=source, ranker=RankerConfig(lookup=lookup))  # type: ignore[arg-type]
        ranker = build_ranker(spec)
        monolithic = build_monolithic(load_weights(source))
        try:
            for seed, batch in enumerate([1, 5, 64]):
                dense, indices, lengths = random_batch(model_spec(source), batch, seed)
                got = ranker.score(dense, indices, lengths)
                np.testing.assert_allclose(
                    got, reference_scores(monolithic, dense, indices, lengths), atol=1e-5
                )
            # every bag empty, and one table only (servers holding nothing for the batch)
            for empty in [(0, 1, 2, 3), (1, 2, 3)]:
                dense, indices, lengths = random_batch(model_spec(source), 3, 11, empty_tables=empty)
                got = ranker.score(dense, indices, lengths)
                np.testing.assert_allclose(
                    got, reference_scores(monolithic, dense, indices, lengths), atol=1e-5
                )
        finally:
            ranker.close()
