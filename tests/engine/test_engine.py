"""The engine against in-thread embedding servers: exact answers in every mode, live migration
under load, ownership checks, and the counters."""

from __future__ import annotations

import dataclasses
import threading
import time
from concurrent.futures import wait
from typing import Any

import numpy as np
import pytest

from flexemr.config import EngineConfig
from flexemr.engine import IoEngine, SharedIoEngine, make_engine
from flexemr.engine.connection import OwnershipError
from flexemr.transport.base import LookupFailed, LookupRequest
from tests.engine.helpers import Servers, burst, random_request, reference, thread_servers


@pytest.fixture(scope="module")
def servers() -> Servers:
    with thread_servers(2) as s:
        yield s  # type: ignore[misc]


@pytest.mark.parametrize(
    ("mode", "credits"),
    [
        ("single", "priority"),
        ("shared", "priority"),
        ("shared", "off"),
        ("mapped", "priority"),
        ("mapped", "piggyback"),
        ("mapped", "off"),
    ],
)
def test_every_mode_answers_exactly(servers: Servers, mode: str, credits: str) -> None:
    engine = servers.engine(mode=mode, io_threads=3, credits=credits, credit_capacity=8, debug_ownership=True)
    try:
        burst(engine, servers, 600, seed=hash((mode, credits)) % 1000)
        stats = engine.stats()
        assert sum(t["subrequests"] for t in stats["threads"]) == 600
        assert sum(c["responses"] for c in stats["connections"]) == 600
        assert len(stats["threads"]) == (1 if mode == "single" else 3)
        assert type(engine) is (SharedIoEngine if mode == "shared" else IoEngine)
        assert all(c["in_flight"] == 0 for c in stats["connections"])
        assert sum(s["bytes_received"] for s in stats["servers"]) > 0
    finally:
        engine.close()


def test_several_connections_per_server_pipelined(servers: Servers) -> None:
    engine = servers.engine(mode="mapped", io_threads=2, connections_per_server=3, credits="off")
    try:
        burst(engine, servers, 300, seed=3)
        conns = engine.stats()["connections"]
        assert len(conns) == 6
        assert all(c["subrequests"] > 0 for c in conns), "round robin uses every connection"
        assert {c["owner"] for c in conns} == {0, 1}, "connections are spread over the threads"
    finally:
        engine.close()


def test_forced_migrations_under_load_lose_nothing(servers: Servers) -> None:
    """Thousands of concurrent subrequests from 4 client threads while a chaos thread moves
    connections between I/O threads every millisecond: every answer exact, none lost or doubled."""
    engine = servers.engine(
        mode="mapped", io_threads=3, connections_per_server=2, credits="priority", credit_capacity=8,
        migration=False, debug_ownership=True,
    )  # fmt: skip
    stop = threading.Event()
    errors: list[BaseException] = []

    def chaos() -> None:
        rng = np.random.default_rng(7)
        while not stop.is_set():
            engine.migrate(int(rng.integers(0, 4)), int(rng.integers(0, 3)))
            time.sleep(0.001)

    def client(seed: int) -> None:
        try:
            burst(engine, servers, 1000, seed=seed)
        except BaseException as exc:
            errors.append(exc)

    mover = threading.Thread(target=chaos)
    clients = [threading.Thread(target=client, args=(seed,)) for seed in range(4)]
    mover.start()
    for c in clients:
        c.start()
    for c in clients:
        c.join(60)
    stop.set()
    mover.join(5)
    try:
        assert not errors, errors[0]
        stats = settled_stats(engine)
        migrated = sum(c["migrations"] for c in stats["connections"])
        assert migrated > 10, f"only {migrated} migrations happened; the test proves nothing"
        assert sum(t["migrations_in"] for t in stats["threads"]) == migrated, "a handover was lost"
        assert sum(c["responses"] for c in stats["connections"]) == 4000
        assert sum(c["subrequests"] for c in stats["connections"]) == 4000
        assert all(c["credits"]["violations"] == 0 for c in stats["connections"])
    finally:
        engine.close()


def settled_stats(engine: IoEngine, deadline_s: float = 10.0) -> dict[str, Any]:
    """The engine's stats once every released connection has been adopted: a hand-over posted
    just before the chaos stopped may still sit in its target thread's inbox."""
    end = time.monotonic() + deadline_s
    while True:
        stats = engine.stats()
        released = sum(c["migrations"] for c in stats["connections"])
        adopted = sum(t["migrations_in"] for t in stats["threads"])
        if released == adopted or time.monotonic() > end:
            return stats
        time.sleep(0.01)


def test_policy_migrates_under_skew(servers: Servers) -> None:
    """All traffic on server 0, whose connections start on one thread: the policy spreads them."""
    engine = servers.engine(
        mode="mapped", io_threads=2, connections_per_server=2, credits="priority", migration=True,
        migration_interval_s=0.001, migration_window=3, migration_cooldown=3, debug_ownership=True,
    )  # fmt: skip
    try:
        for conn in (0, 1):  # both of server 0's connections on thread 0
            engine.migrate(conn, 0)
        for conn in (2, 3):
            engine.migrate(conn, 1)
        rng = np.random.default_rng(5)
        deadline = time.monotonic() + 20
        while engine.stats()["engine"]["migrations"] <= 4 and time.monotonic() < deadline:
            requests = [random_request(rng, servers.plan.server_rows(0), max_bags=64) for _ in range(400)]
            futures = [engine.submit(0, r) for r in requests]
            for request, future in zip(requests, futures, strict=True):
                np.testing.assert_allclose(
                    future.result(30), reference(servers.stores[0], request), rtol=1e-5, atol=1e-5
                )
        assert engine.stats()["engine"]["migrations"] > 4, "the policy never moved a connection"
        owners = engine.owners()
        assert owners[0] != owners[1], "server 0's two connections end up on different threads"
    finally:
        engine.close()


def test_each_engine_class_runs_only_its_own_modes(servers: Servers) -> None:
    identities = [s.identity for s in servers.servers]
    with pytest.raises(ValueError, match="IoEngine runs modes \\('mapped', 'single'\\), not 'shared'"):
        IoEngine(servers.endpoints, identities, EngineConfig(mode="shared"))
    with pytest.raises(ValueError, match="SharedIoEngine runs modes \\('shared',\\), not 'mapped'"):
        SharedIoEngine(servers.endpoints, identities, EngineConfig(mode="mapped"))
    baseline = make_engine(servers.endpoints, identities, EngineConfig(mode="shared"))
    try:
        with pytest.raises(ValueError, match="migrate in mapped mode only"):
            baseline.migrate(0, 1)
    finally:
        baseline.close()


def test_ownership_debug_catches_a_foreign_thread(servers: Servers) -> None:
    engine = servers.engine(mode="mapped", io_threads=2, credits="off", debug_ownership=True)
    try:
        burst(engine, servers, 20, seed=9)
        conn = engine._connections[0]
        assert conn.owner_ident is not None
        with pytest.raises(OwnershipError, match="touched by thread"):
            conn.flush()  # the test thread does not own it
    finally:
        engine.close()


def test_server_errors_come_back_and_the_connection_lives(servers: Servers) -> None:
    engine = servers.engine(mode="mapped", io_threads=2)
    try:
        bad = LookupRequest(np.array([10**9], dtype=np.int64), np.array([0], dtype=np.int64))
        with pytest.raises(LookupFailed, match="outside"):
            engine.submit(0, bad).result(10)
        burst(engine, servers, 50, seed=11)
        assert engine.connected() == [True, True]
    finally:
        engine.close()


def test_answers_land_in_the_callers_buffer_when_they_fit_it(servers: Servers) -> None:
    engine = servers.engine(mode="mapped", io_threads=2)
    dim = servers.stores[0].width
    try:
        rng = np.random.default_rng(5)
        for raw in (False, True):
            request = random_request(rng, servers.stores[0].num_rows, raw=raw)
            buffer = np.full((request.expected_shape(dim)[0] + 2, dim), np.nan, dtype=np.float32)
            out = buffer[1:-1]
            answer = engine.submit(0, dataclasses.replace(request, out=out)).result(10)
            assert answer is out  # received straight into it, no copy
            np.testing.assert_allclose(out, reference(servers.stores[0], request), rtol=1e-5, atol=1e-6)
            assert np.isnan(buffer[[0, -1]]).all()  # nothing written around it
        # an `out` of another shape than the answer is left alone: the answer gets its own array
        request = random_request(rng, servers.stores[0].num_rows)
        wrong = np.zeros((request.expected_shape(dim)[0] + 1, dim), dtype=np.float32)
        answer = engine.submit(0, dataclasses.replace(request, out=wrong)).result(10)
        assert answer is not wrong and not wrong.any()
        np.testing.assert_allclose(answer, reference(servers.stores[0], request), rtol=1e-5, atol=1e-6)
    finally:
        engine.close()


def test_close_leaves_no_threads(servers: Servers) -> None:
    before = {t.name for t in threading.enumerate()}
    engine = servers.engine(mode="mapped", io_threads=3, credits="priority")
    burst(engine, servers, 30, seed=13)
    engine.close()
    time.sleep(0.1)
    leaked = {t.name for t in threading.enumerate()} - before
    assert not any(name.startswith("flexemr-") for name in leaked), leaked


def test_a_burst_beyond_the_bound_is_refused_not_absorbed(servers: Servers) -> None:
    engine = servers.engine(
        mode="mapped", io_threads=2, connections_per_server=1, max_in_flight_per_connection=50
    )
    try:
        rng = np.random.default_rng(17)
        futures = [engine.submit(0, random_request(rng, servers.plan.server_rows(0))) for _ in range(2000)]
        refused = [f for f in futures if f.done() and isinstance(f.exception(), LookupFailed)]
        assert refused, "2,000 at once against a bound of 100 must refuse some"
        assert all("overloaded" in str(f.exception()) for f in refused)
        wait(futures, timeout=30)
        assert engine.stats()["engine"]["outstanding"] == 0
        burst(engine, servers, 50, seed=19)  # and it serves normally afterwards
    finally:
        engine.close()
