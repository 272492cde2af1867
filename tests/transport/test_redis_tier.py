"""The Redis-tier baseline serves the same scores (it is a fair comparison only if it is right)."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest

from flexemr.client import Client
from flexemr.config.model import ModelSource
from flexemr.model.source import load_weights, model_spec
from flexemr.model.weights import build_monolithic
from tests.conftest import ServeProcess
from tests.core.helpers import NEEDS_REDIS_SERVER, random_batch, reference_scores

pytestmark = NEEDS_REDIS_SERVER


@pytest.mark.parametrize(
    "sharding", [["--sharding", "auto"], ["--sharding", "column", "--column-shards", "3"]]
)
def test_redis_tier_scores_equal_monolithic(serve: Callable[..., ServeProcess], sharding: list[str]) -> None:
    """Whole rows, and column slices of uneven widths (each server's keys hold its slices)."""
    server = serve(
        "--preset", "tiny", "--seed", "4", "--embedding-tier", "redis", "--embedding-servers", "2", *sharding
    )  # fmt: skip
    source = ModelSource(preset="tiny", seed=4)
    model = build_monolithic(load_weights(source))
    with Client(server.url) as client:
        for seed in range(3):
            batch = random_batch(model_spec(source), 9, seed=seed)
            np.testing.assert_allclose(client.infer(*batch), reference_scores(model, *batch), atol=1e-5)
    assert any(line.startswith("redis tier: redis://127.0.0.1:") for line in server.output)
