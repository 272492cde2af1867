"""Credit-based flow control: the ledger alone, servers that never outrun their credits, and the
control channel's reading of the server's answers."""

from __future__ import annotations

import socket
import time

import pytest

from flexemr.config import FrameLimits
from flexemr.engine.credits import ControlChannel, CreditLedger
from flexemr.engine.health import ServerHealth
from flexemr.protocol.frames import MessageType, encode, error_frame, recv_frame, send_frame
from tests.engine.helpers import burst, thread_servers


def test_ledger_grants_freed_slots_in_batches() -> None:
    ledger = CreditLedger(8)
    assert ledger.at_server == 8
    for _ in range(8):
        ledger.on_response()
    assert ledger.violations == 0 and ledger.at_server == 0
    ledger.on_delivered()
    assert ledger.due(in_flight=0) == 0  # one slot: wait for a batch of capacity/4
    ledger.on_delivered()
    assert ledger.due(in_flight=0) == 2
    ledger.on_delivered()
    assert ledger.due(in_flight=5) == 1  # the server holds answers: grant at once
    assert ledger.at_server == 3  # 11 granted, 8 received
    ledger.on_response()
    assert ledger.violations == 0


def test_ledger_counts_a_response_beyond_credits() -> None:
    ledger = CreditLedger(1)
    ledger.on_response()
    ledger.on_response()
    assert ledger.violations == 1


@pytest.mark.parametrize("credits", ["priority", "piggyback"])
def test_server_never_exceeds_its_credits(credits: str) -> None:
    """A burst of 1,500 subrequests against 2 response slots per connection: the servers must hold
    answers back (they wait for credits), never send one without a credit, and all answers arrive."""
    with thread_servers(2) as servers:
        engine = servers.engine(mode="mapped", io_threads=2, credits=credits, credit_capacity=2)
        try:
            burst(engine, servers, 1500, seed=1, raw_every=0)
            stats = engine.stats()
            for conn in stats["connections"]:
                assert conn["credits"]["violations"] == 0
                assert conn["credits"]["received"] <= conn["credits"]["granted"]
            if credits == "priority":
                for server in range(2):
                    seen = engine.server_credit_stats(server)["connections"]
                    assert seen, "the server registered the engine's credited connections"
                    for conn in seen.values():
                        assert conn["sent"] <= conn["granted"]
                    assert sum(c["waits"] for c in seen.values()) > 0, "the burst must hit the limit"
                assert sum(s["control_grants"] for s in stats["servers"]) > 0
        finally:
            engine.close()


def test_the_control_channel_fails_with_the_servers_reason_when_it_answers_an_error() -> None:
    ours, server = socket.socketpair()
    health = ServerHealth(timeout_s=60)
    channel = ControlChannel(4, ours, FrameLimits(), health, interval_s=0.05)
    try:
        ping = recv_frame(server, FrameLimits())
        assert ping.type == MessageType.PING
        send_frame(server, encode(MessageType.PONG, ping.request_id, []))
        send_frame(server, error_frame(ping.request_id + 1, "embedding server 4: no heartbeat for you"))
        deadline = time.monotonic() + 30
        while channel.alive and time.monotonic() < deadline:
            time.sleep(0.01)
        assert not channel.alive
        assert channel.error == "control connection failed: embedding server 4: no heartbeat for you"
    finally:
        channel.close()
        server.close()
