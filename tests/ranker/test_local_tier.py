"""The local tier (every table in the ranker's process) pools a batch with one direct call."""

from __future__ import annotations

import numpy as np
import pytest

from flexemr.config import Endpoint, RankerConfig
from flexemr.config.model import ModelSource
from flexemr.config.spec import ClusterSpec
from flexemr.entrypoints.roles import build_ranker
from flexemr.model.source import load_weights, model_spec
from flexemr.model.weights import build_monolithic
from flexemr.sharding.plan import make_plan
from flexemr.transport.local import LocalTransport
from tests.core.helpers import random_batch, reference_scores

SOURCE = ModelSource(preset="tiny", seed=3)
SPEC = model_spec(SOURCE)


@pytest.mark.parametrize(("servers", "direct"), [(1, True), (2, False)])
def test_scores_equal_the_monolithic_models_with_empty_bags(servers: int, direct: bool) -> None:
    plan = make_plan("table", SPEC.table_rows, SPEC.dim, servers)
    spec = ClusterSpec(SOURCE, plan, tuple(Endpoint() for _ in range(servers)), ranker=RankerConfig())
    ranker = build_ranker(spec, transport=LocalTransport(plan, load_weights(SOURCE)))
    try:
        assert (ranker._whole_store is not None) is direct
        dense, indices, lengths = random_batch(SPEC, 32, seed=8)
        lengths = lengths.copy()
        lengths[::3] = 0  # empty bags pool to zeros
        offsets = np.concatenate([[0], np.cumsum(random_batch(SPEC, 32, seed=8)[2])])
        kept = np.concatenate(
            [indices[offsets[b] : offsets[b + 1]] for b in range(lengths.size) if lengths[b]]
        )
        expected = reference_scores(build_monolithic(load_weights(SOURCE)), dense, kept, lengths)
        np.testing.assert_array_equal(ranker.score(dense, kept, lengths), expected)
    finally:
        ranker.close()
