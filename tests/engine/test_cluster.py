"""The engine against real embedding-server processes (LocalCluster on 127.0.0.1)."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterator
from concurrent.futures import wait

import numpy as np
import pytest

from flexemr.config import EngineConfig
from flexemr.config.security import identities
from flexemr.config.spec import ClusterSpec
from flexemr.embedding_server.store import ShardStore
from flexemr.engine import IoEngine
from flexemr.entrypoints.local import LocalCluster
from flexemr.entrypoints.roles import build_ranker
from flexemr.model.source import load_weights
from flexemr.model.weights import build_monolithic
from flexemr.transport.base import ServerUnavailable
from tests.core.helpers import random_batch, reference_scores
from tests.engine.helpers import random_request, reference, started_cluster


@pytest.fixture(scope="module")
def cluster() -> Iterator[tuple[LocalCluster, ClusterSpec]]:
    """Shared by the tests that leave it as they found it."""
    yield from started_cluster()


@pytest.fixture
def doomed_cluster() -> Iterator[tuple[LocalCluster, ClusterSpec]]:
    """A cluster of its own, for a test that kills one of its servers."""
    yield from started_cluster()


@pytest.mark.parametrize(
    ("engine", "lookup"),
    [
        pytest.param({"mode": "mapped"}, "partial", id="flexemr"),
        pytest.param({"mode": "shared"}, "partial", id="no-mapped"),
        pytest.param({"mode": "single", "io_threads": 1}, "raw", id="naive"),
        pytest.param({"mode": "mapped", "credits": "off"}, "partial", id="no-credits"),
        pytest.param({"mode": "mapped", "credits": "piggyback", "migration": False}, "raw", id="piggyback"),
    ],
)
def test_ranker_on_the_engine_scores_like_the_monolith(
    cluster: tuple[LocalCluster, ClusterSpec], engine: dict[str, object], lookup: str
) -> None:
    """The engine configurations of the benchmark's systems (`bench.systems`), end to end."""
    _, spec = cluster
    spec = dataclasses.replace(
        spec,
        engine=EngineConfig(**{"io_threads": 2, **engine}),  # type: ignore[arg-type]
        ranker=dataclasses.replace(spec.ranker, lookup=lookup),  # type: ignore[arg-type]
    )
    mode = engine["mode"]
    ranker = build_ranker(spec, connect_timeout_s=30)
    try:
        assert isinstance(ranker.transport, IoEngine)
        model = build_monolithic(load_weights(spec.model))
        for seed in range(5):
            dense, indices, lengths = random_batch(ranker.spec, 32, seed)
            np.testing.assert_allclose(
                ranker.score(dense, indices, lengths),
                reference_scores(model, dense, indices, lengths),
                rtol=1e-4,
                atol=1e-5,
            )
        assert ranker.stats()["transport"]["engine"]["mode"] == mode
    finally:
        ranker.close()


@pytest.mark.slow
def test_a_dying_server_fails_its_subrequests_fast_and_others_carry_on(
    doomed_cluster: tuple[LocalCluster, ClusterSpec],
) -> None:
    local, spec = doomed_cluster
    plan = spec.sharding
    engine = IoEngine(
        spec.embedding_servers,
        identities(spec),
        EngineConfig(mode="mapped", io_threads=2, credit_capacity=4, debug_ownership=True),
    )
    engine.start(timeout=30)
    try:
        rng = np.random.default_rng(0)
        doomed = [
            engine.submit(0, random_request(rng, plan.server_rows(0), max_bags=64)) for _ in range(3000)
        ]
        local.kill_server(0)
        started = time.monotonic()
        _, not_done = wait(doomed, timeout=10)
        assert not not_done, f"{len(not_done)} subrequests to the dead server still hang"
        assert time.monotonic() - started < 10
        failures = [f.exception() for f in doomed if f.exception() is not None]
        assert failures, "the server was killed with nothing in flight; the test proves nothing"
        assert all(isinstance(e, ServerUnavailable) and e.server == 0 for e in failures)
        with pytest.raises(ServerUnavailable):
            engine.submit(0, random_request(rng, plan.server_rows(0))).result(5)
        assert engine.connected() == [False, True]

        store = ShardStore(plan, 1, load_weights(spec.model), progress=False)
        requests = [random_request(rng, plan.server_rows(1)) for _ in range(300)]
        futures = [engine.submit(1, r) for r in requests]
        for request, future in zip(requests, futures, strict=True):
            np.testing.assert_allclose(future.result(10), reference(store, request), rtol=1e-5, atol=1e-5)
    finally:
        engine.close()
