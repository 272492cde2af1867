"""The validation benchmark's local deployment: servers plus several ranker processes, round-robin."""

from __future__ import annotations

import httpx
import numpy as np
import pytest

from flexemr.batch import SparseBatch
from flexemr.config import Endpoint, RankerConfig
from flexemr.config.model import ModelSource
from flexemr.config.spec import ClusterSpec
from flexemr.entrypoints.deployment import LocalDeployment
from flexemr.model.source import load_weights, model_spec
from flexemr.model.weights import build_monolithic
from flexemr.planner import ModelProfile, place
from tests.core.helpers import random_batch, reference_scores

pytestmark = pytest.mark.slow  # multi-process; `make test-fast` leaves it out


def test_two_rankers_share_the_servers_and_score_like_the_monolithic_model() -> None:
    source = ModelSource(preset="tiny", seed=3)
    model = ModelProfile(model_spec(source))
    plan = place(model, 2, 1, "table").to_sharding_plan(model)
    spec = ClusterSpec(source, plan, (Endpoint(), Endpoint()), RankerConfig(port=8000))
    batch = random_batch(model.spec, 5, seed=1)
    expected = reference_scores(build_monolithic(load_weights(source)), *batch)
    with LocalDeployment(spec, rankers=2) as deployment:
        assert set(deployment.pids()) == {"ranker-0", "ranker-1", "server-0", "server-1"}
        backend = deployment.backend()
        for _ in range(4):
            np.testing.assert_allclose(backend.infer(SparseBatch(*batch)), expected, atol=1e-5)
        backend.close()
        # Each ranker bound its own port (not the spec's 8000) and took every other request.
        served = [httpx.get(f"{r.url}/v2/stats").json()["requests"] for r in deployment.rankers]
        assert served == [2, 2]
    assert not deployment.rankers
