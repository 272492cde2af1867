"""Node authentication and identity, over real embedding-server processes on 127.0.0.1: a client
without the secret reads nothing, and a fake or mismatched server never contributes a row."""

from __future__ import annotations

import dataclasses
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

from flexemr.config import Endpoint, FrameLimits, SecurityConfig
from flexemr.config.model import ModelSource
from flexemr.config.security import identities
from flexemr.config.spec import ClusterSpec
from flexemr.embedding_server.server import EmbeddingServer
from flexemr.embedding_server.store import ShardStore
from flexemr.engine import IoEngine
from flexemr.entrypoints.local import LocalCluster
from flexemr.entrypoints.roles import build_ranker
from flexemr.model.source import load_weights
from flexemr.model.weights import build_monolithic
from flexemr.protocol.frames import (
    ConnectionClosed,
    MessageType,
    ProtocolError,
    encode,
    recv_frame,
    send_frame,
)
from flexemr.protocol.handshake import Hello, NotAuthenticated, client_handshake, new_nonce
from flexemr.transport.base import ConfigMismatch, LookupRequest, ServerUnavailable
from tests.core.helpers import assert_scores_like_the_monolith, random_batch, reference_scores
from tests.engine.helpers import dial, lookup_frame, started_cluster, tiny_spec

SECRET = "the-cluster-secret-for-these-tests"


@pytest.fixture(scope="module")
def secret_cluster() -> Iterator[tuple[LocalCluster, ClusterSpec]]:
    """Shared by the tests that leave it as they found it."""
    yield from started_cluster(SECRET)


@pytest.fixture
def doomed_secret_cluster() -> Iterator[tuple[LocalCluster, ClusterSpec]]:
    """A cluster of its own, for a test that kills one of its servers."""
    yield from started_cluster(SECRET)


def wait_for(condition: Callable[[], bool], bound_s: float = 30.0) -> bool:
    deadline = time.monotonic() + bound_s
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def assert_never_served(sock: socket.socket) -> None:
    """The server answers nothing but ERROR and closes: no RESULT ever comes back."""
    try:
        while True:
            frame = recv_frame(sock, FrameLimits())
            assert frame.type in (MessageType.HELLO, MessageType.ERROR), f"got {frame.type.name}"
    except (ConnectionClosed, ConnectionResetError):
        pass


def test_a_client_without_the_secret_reads_no_row(secret_cluster: tuple[LocalCluster, ClusterSpec]) -> None:
    _, spec = secret_cluster
    endpoint = spec.embedding_servers[0]
    one_row = LookupRequest(np.array([1], np.int64), np.array([0], np.int64), raw=True)

    with pytest.raises(NotAuthenticated):  # the honest client finds the server cannot be checked
        dial(endpoint, key=b"another secret")
    attempts = [
        [lookup_frame(1, one_row)],  # no handshake at all
        [encode(MessageType.HELLO, 0, [_hello()]), lookup_frame(1, one_row)],  # no proof
        [encode(MessageType.HELLO, 0, [_hello()]), _auth("0" * 64), lookup_frame(1, one_row)],  # wrong proof
    ]
    for frames in attempts:
        with socket.create_connection((endpoint.host, endpoint.port), timeout=10) as sock:
            for frame in frames:
                try:
                    send_frame(sock, frame)
                except OSError:
                    break
            assert_never_served(sock)

    with dial(endpoint, key=SECRET.encode()) as sock:  # the same lookup, with the secret
        send_frame(sock, lookup_frame(1, one_row))
        assert recv_frame(sock, FrameLimits()).type == MessageType.RESULT


def _hello() -> np.ndarray:
    import json

    hello = dataclasses.asdict(Hello("data", "thief", new_nonce()))
    return np.frombuffer(json.dumps(hello).encode(), dtype=np.uint8)


def _auth(proof: str) -> list[memoryview]:
    return encode(MessageType.AUTH, 0, [np.frombuffer(f'{{"proof": "{proof}"}}'.encode(), dtype=np.uint8)])


def in_thread_server(
    store: ShardStore, endpoint: Endpoint, spec: ClusterSpec, secret: str
) -> tuple[EmbeddingServer, threading.Thread]:
    server = EmbeddingServer(store, endpoint, identities(spec)[store.server], secret.encode())
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    return server, thread


def test_fake_and_mismatched_servers_are_refused_and_never_score(
    doomed_secret_cluster: tuple[LocalCluster, ClusterSpec],
) -> None:
    local, spec = doomed_secret_cluster
    ranker = build_ranker(spec, connect_timeout_s=30)
    assert isinstance(ranker.transport, IoEngine)
    engine = ranker.transport
    model = build_monolithic(load_weights(spec.model))
    dense, indices, lengths = random_batch(ranker.spec, 16, 0)
    expected = reference_scores(model, dense, indices, lengths)
    try:
        np.testing.assert_allclose(ranker.score(dense, indices, lengths), expected, rtol=1e-4, atol=1e-5)
        local.kill_server(1)
        assert wait_for(lambda: not ranker.ready())
        spot = spec.embedding_servers[1]
        other = tiny_spec(seed=8)  # same plan, another model's weights
        impostors = [
            # a fake: the right rows and identity, but no secret
            (
                ShardStore(spec.sharding, 1, load_weights(spec.model), progress=False),
                spec,
                "not the secret",
                "prove",
            ),
            # a stale one: the secret, but another model
            (
                ShardStore(other.sharding, 1, load_weights(other.model), progress=False),
                other,
                SECRET,
                "expects",
            ),
        ]
        for store, claimed, secret, why in impostors:
            server, thread = in_thread_server(store, spot, claimed, secret)
            try:
                assert wait_for(lambda w=why: w in engine.health[1].reason), engine.health[1].reason
                assert not ranker.ready()
                with pytest.raises(ServerUnavailable):
                    ranker.score(dense, indices, lengths)
                assert server.lookups == 0
            finally:
                server.close()
                thread.join(5)
        # the real server back on the spot: re-admitted, exact scores again
        server, thread = in_thread_server(
            ShardStore(spec.sharding, 1, load_weights(spec.model), progress=False), spot, spec, SECRET
        )
        try:
            assert wait_for(ranker.ready)
            np.testing.assert_allclose(ranker.score(dense, indices, lengths), expected, rtol=1e-4, atol=1e-5)
            assert server.lookups > 0
        finally:
            server.close()
            thread.join(5)
    finally:
        ranker.close()


def test_a_ranker_refuses_a_mismatched_cluster_at_start(
    secret_cluster: tuple[LocalCluster, ClusterSpec],
) -> None:
    _, spec = secret_cluster
    with pytest.raises(ConfigMismatch, match="expects"):
        build_ranker(
            dataclasses.replace(spec, model=ModelSource(preset="tiny", seed=3)), connect_timeout_s=30
        )


def test_without_a_secret_servers_bind_loopback_only() -> None:
    spec = tiny_spec(1)
    store = ShardStore(spec.sharding, 0, load_weights(spec.model), progress=False)
    with pytest.raises(ValueError, match="without a shared secret"):
        EmbeddingServer(store, Endpoint("0.0.0.0", 0), identities(spec)[0])


@pytest.fixture
def certificate(tmp_path: Path) -> Path:
    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl command")
    subprocess.run(
        [
            "openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
            "-subj", "/CN=flexemr-test",
            "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(tmp_path / "key.pem"),
            "-out", str(tmp_path / "cert.pem"),
        ],
        check=True,
        capture_output=True,
    )  # fmt: skip
    return tmp_path


def test_tls_links_score_exactly_and_refuse_plain_clients(
    certificate: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FLEXEMR_SECRET", SECRET)
    cert, key = str(certificate / "cert.pem"), str(certificate / "key.pem")
    spec = dataclasses.replace(tiny_spec(), security=SecurityConfig(tls_cert=cert, tls_key=key, tls_ca=cert))
    with LocalCluster(spec) as local:
        ranker = build_ranker(local.spec, connect_timeout_s=30)
        try:
            model = build_monolithic(load_weights(spec.model))
            assert_scores_like_the_monolith(ranker.score, model)
        finally:
            ranker.close()
        endpoint = local.spec.embedding_servers[0]
        plain = socket.create_connection((endpoint.host, endpoint.port), timeout=10)
        with plain, pytest.raises((ConnectionClosed, ConnectionResetError, ProtocolError)):
            client_handshake(plain, Hello("data", "plain", new_nonce()), SECRET.encode(), FrameLimits())
