"""UCX node links (`--transport ucx`) with real embedding-server processes on this machine, over
UCX's TCP transport and over shared memory (`UCX_TLS`): exact scores in every engine mode and
sharding, migration, and the handshake's security (faults: `test_ucx_faults.py`)."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from collections.abc import Iterator

import numpy as np
import pytest

pytest.importorskip("ucxx", reason="the ucx extra is not installed (pip install 'flexemr[ucx]')")

from flexemr.config import Endpoint, NodeLimits
from flexemr.config.security import SecurityConfig, identities
from flexemr.config.spec import ClusterSpec
from flexemr.embedding_server.server import EmbeddingServer
from flexemr.embedding_server.store import ShardStore
from flexemr.engine import IoEngine, make_engine
from flexemr.entrypoints.local import LocalCluster
from flexemr.entrypoints.roles import build_ranker
from flexemr.model.source import load_weights
from flexemr.model.weights import build_monolithic
from flexemr.transport.base import ConfigMismatch
from tests.core.helpers import assert_scores_like_the_monolith
from tests.engine.helpers import random_request, reference
from tests.transport.ucx_helpers import SECRET, ucx_spec


@pytest.fixture(scope="module")
def cluster(link: str) -> Iterator[ClusterSpec]:
    with LocalCluster(ucx_spec()) as local:
        yield local.spec


def check_scores(spec: ClusterSpec, **engine: object) -> dict[str, object]:
    """Score 3 batches through a ranker on `spec` with `engine`, against the monolith; its stats."""
    spec = dataclasses.replace(spec, engine=dataclasses.replace(spec.engine, **engine))  # type: ignore[arg-type]
    ranker = build_ranker(spec, connect_timeout_s=60)
    try:
        assert isinstance(ranker.transport, IoEngine)
        assert ranker.transport.dialer.transport == "ucx"
        assert_scores_like_the_monolith(ranker.score, build_monolithic(load_weights(spec.model)))
        return ranker.stats()["transport"]  # type: ignore[no-any-return]
    finally:
        ranker.close()


@pytest.mark.parametrize(
    ("engine", "lookup"),
    [
        pytest.param({"mode": "mapped"}, "partial", id="flexemr"),
        pytest.param({"mode": "shared"}, "partial", id="no-mapped"),
        pytest.param({"mode": "single", "io_threads": 1}, "raw", id="naive"),
        pytest.param({"mode": "mapped", "credits": "off"}, "raw", id="no-credits"),
        pytest.param(
            {"mode": "mapped", "credits": "piggyback", "migration": False}, "partial", id="piggyback"
        ),
    ],
)
def test_every_engine_mode_scores_like_the_monolith_over_ucx(
    cluster: ClusterSpec, engine: dict[str, object], lookup: str
) -> None:
    spec = dataclasses.replace(cluster, ranker=dataclasses.replace(cluster.ranker, lookup=lookup))  # type: ignore[arg-type]
    stats = check_scores(spec, **engine)
    assert stats["engine"]["mode"] == engine["mode"]  # type: ignore[index]
    assert all(s["subrequests"] > 0 and s["failures"] == 0 for s in stats["servers"])  # type: ignore[index, attr-defined]


@pytest.mark.parametrize(
    ("preset", "row_scale"), [("rmc1", 0.001), ("rmc2", 0.001), ("rmc3", 0.001), ("dlrm-v2", 0.00002)]
)
def test_every_preset_scores_like_the_monolith_over_ucx(link: str, preset: str, row_scale: float) -> None:
    """tiny is the module's cluster; the other presets' shapes (dims, pooling, interaction) too."""
    with LocalCluster(ucx_spec("row", preset=preset, row_scale=row_scale)) as local:
        stats = check_scores(local.spec)
    assert all(s["subrequests"] > 0 for s in stats["servers"])  # type: ignore[index, attr-defined]


@pytest.mark.parametrize("sharding", ["table", "row"])
def test_table_and_row_sharding_over_three_ucx_servers_score_exactly(link: str, sharding: str) -> None:
    with LocalCluster(ucx_spec(sharding, servers=3)) as local:
        check_scores(local.spec, mode="mapped", io_threads=2)


def test_connections_migrate_between_io_threads_with_their_ucx_workers(cluster: ClusterSpec) -> None:
    """A connection's worker goes with it: lookups stay exact after every connection moved."""
    engine = make_engine(
        cluster.embedding_servers,
        identities(cluster),
        dataclasses.replace(cluster.engine, io_threads=2, migration=False),
        secret=SECRET.encode(),
        node_limits=NodeLimits(heartbeat_timeout_s=10.0),
    )
    engine.start(timeout=30)
    try:
        store = ShardStore(cluster.sharding, 0, load_weights(cluster.model), progress=False)
        rng = np.random.default_rng(0)
        for connection, owner in engine.owners().items():
            engine.migrate(connection, 1 - owner)
            requests = [random_request(rng, store.num_rows) for _ in range(8)]
            futures = [engine.submit(0, r) for r in requests]
            for request, future in zip(requests, futures, strict=True):
                np.testing.assert_allclose(future.result(30), reference(store, request), rtol=1e-5, atol=1e-6)
        assert engine.stats()["engine"]["migrations"] == len(engine.owners())
    finally:
        engine.close()


def test_a_wrong_secret_is_refused_over_ucx_before_any_row(cluster: ClusterSpec) -> None:
    engine = make_engine(
        cluster.embedding_servers, identities(cluster), cluster.engine, secret=b"not-the-secret"
    )
    with pytest.raises(ConfigMismatch, match="could not prove the shared secret"):
        engine.start(timeout=20)


def test_ucx_is_refused_without_a_secret_and_with_tls() -> None:
    spec = ucx_spec(servers=1)
    store = ShardStore(spec.sharding, 0, load_weights(spec.model), progress=False)
    with pytest.raises(ValueError, match="without a shared secret"):
        EmbeddingServer(store, Endpoint(), identities(spec)[0], secret=None, transport="ucx")
    with pytest.raises(ValueError, match="has no TLS"):
        dataclasses.replace(spec, security=SecurityConfig(tls_cert="c", tls_key="k", tls_ca="a"))


def test_nothing_imports_ucxx_unless_ucx_is_asked_for() -> None:
    code = (
        "import sys\n"
        "import flexemr.cli.main, flexemr.entrypoints.roles, flexemr.engine, flexemr.engine.link\n"
        "import flexemr.embedding_server.server, flexemr.protocol.ucx_stream\n"
        "assert not [m for m in sys.modules if m.startswith(('ucxx', 'libucx'))], sorted(sys.modules)\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
