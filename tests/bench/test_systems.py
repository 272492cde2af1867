"""The load generator's lean HTTP client gets the same scores as flexemr's client, on one
keep-alive connection per thread."""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from flexemr.batch import SparseBatch
from flexemr.bench.systems import KeepAliveHttp
from flexemr.client import Client, InferenceError
from flexemr.model.presets import preset
from tests.conftest import ServeProcess
from tests.core.helpers import random_batch

SPEC = preset("tiny")


def test_keep_alive_client_scores_as_flexemrs_client_and_reports_errors(
    serve: Callable[..., ServeProcess],
) -> None:
    server = serve("--preset", "tiny", "--embedding-tier", "local")
    batches = [SparseBatch(*random_batch(SPEC, 1 + i % 5, seed=i)) for i in range(12)]
    lean = KeepAliveHttp(server.url)
    try:
        with ThreadPoolExecutor(3) as pool:
            scores = list(pool.map(lean.infer, batches))
        assert len(lean._connections) <= 3  # one connection per thread, kept alive
        with Client(server.url) as client:
            for batch, got in zip(batches, scores, strict=True):
                np.testing.assert_array_equal(got, client.infer(batch.dense, batch.indices, batch.lengths))
        bad = batches[0]
        with pytest.raises(InferenceError, match="HTTP 400"):
            lean.infer(SparseBatch(bad.dense, bad.indices + 10**6, bad.lengths))
    finally:
        lean.close()
