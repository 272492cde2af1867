"""A real `flexemr serve` flooded with connections, each carrying one infer request (as many clients
would): it refuses what it cannot serve (429 from the headers, pre-encoded, the body skipped), and
meanwhile answers liveness and serves a well-behaved client (one keep-alive connection, retrying
after a 429) with the monolithic model's scores. Outcomes are asserted, never durations.
"""

from __future__ import annotations

import asyncio
import socket
import threading
from collections import Counter
from collections.abc import Iterator
from typing import Any

import httpx
import numpy as np
import orjson
import pytest

from flexemr.config.model import ModelSource
from flexemr.model.source import load_weights, model_spec
from flexemr.model.weights import build_monolithic
from tests.api.test_http import infer_body
from tests.conftest import ServeProcess, start_serve
from tests.core.helpers import random_batch, reference_scores

SOURCE = ModelSource(preset="tiny", seed=3)
SPEC = model_spec(SOURCE)
URL = "/v2/models/dlrm/infer"
FLOOD = 3000
"""Requests in the flood, each on its own connection."""
AT_ONCE = 256
"""Flood connections open at once: far more than the ranker admits (its latency limit starts at 8)."""


@pytest.fixture(scope="module")
def ranker() -> Iterator[ServeProcess]:
    server = start_serve("--preset", "tiny", "--seed", "3", "--embedding-tier", "local")
    yield server
    server.stop()
    assert not any("Traceback" in line for line in server.output), "".join(server.output[-40:])


def raw_request(host: str, body: bytes, close: bool = True) -> bytes:
    connection = "Connection: close\r\n" if close else ""
    head = f"POST {URL} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n{connection}"
    return f"{head}Content-Length: {len(body)}\r\n\r\n".encode() + body


async def one_request(host: str, port: int, request: bytes) -> int | str:
    """The status of one request on its own connection, or the name of the error it met."""
    writer = None
    try:
        reader, writer = await asyncio.open_connection(host, port)
        writer.write(request)
        head = await reader.readuntil(b"\r\n\r\n")
        length = next(
            int(line.split(b":")[1])
            for line in head.split(b"\r\n")
            if line.lower().startswith(b"content-length:")
        )
        await reader.readexactly(length)
        return int(head.split(b" ", 2)[1])
    except (OSError, asyncio.IncompleteReadError) as exc:
        return type(exc).__name__
    finally:
        if writer is not None:
            writer.close()


def flood(host: str, port: int, request: bytes, outcomes: Counter[int | str]) -> None:
    async def run() -> None:
        left = FLOOD

        async def connections() -> None:
            nonlocal left
            while left > 0:
                left -= 1
                outcomes[await one_request(host, port, request)] += 1

        await asyncio.gather(*(connections() for _ in range(AT_ONCE)))

    asyncio.run(run())


def admission_stats(url: str) -> dict[str, Any]:
    stats: dict[str, Any] = httpx.get(f"{url}/v2/stats", timeout=60).json()["admission"]
    return stats


def test_a_flood_is_refused_while_liveness_and_a_well_behaved_client_are_served(
    ranker: ServeProcess,
) -> None:
    url = httpx.URL(ranker.url)
    host, port = url.host, url.port
    assert port is not None
    flood_body = orjson.dumps(infer_body(*random_batch(SPEC, 64, seed=1)))
    outcomes: Counter[int | str] = Counter()
    flooding = threading.Thread(target=flood, args=(host, port, raw_request(host, flood_body), outcomes))
    before = admission_stats(ranker.url)
    flooding.start()
    model = build_monolithic(load_weights(SOURCE))
    live: list[int] = []
    served_during_flood = refused = 0
    with (
        httpx.Client(base_url=ranker.url, timeout=60) as client,
        httpx.Client(base_url=ranker.url, timeout=60) as prober,
    ):
        seed = 100
        while flooding.is_alive():
            live.append(prober.get("/v2/health/live").status_code)
            batch = random_batch(SPEC, 4, seed=seed)
            response = client.post(URL, json=infer_body(*batch))
            if response.status_code == 429:  # well-behaved: back off, then retry
                assert response.headers["retry-after"] == "1"
                refused += 1
                threading.Event().wait(0.02)
                continue
            assert response.status_code == 200, response.text
            np.testing.assert_allclose(
                response.json()["outputs"][0]["data"], reference_scores(model, *batch), atol=1e-5
            )
            served_during_flood += flooding.is_alive()
            seed += 1
    assert sum(outcomes.values()) == FLOOD
    assert set(outcomes) <= {200, 429}, outcomes  # every flood request answered: no resets, no 5xx
    assert outcomes[429] > 0 and outcomes[200] > 0, outcomes
    assert live and set(live) == {200}
    assert served_during_flood > 0, f"the well-behaved client was refused {refused} times, never served"
    after = admission_stats(ranker.url)
    assert after["refused_requests"] - before["refused_requests"] >= outcomes[429]
    assert after["requests_in_flight"] == 0 and after["samples_in_flight"] == 0


def hold_full(url: str, host: str, port: int) -> list[socket.socket]:
    """Connections whose requests' headers came and whose bodies never do: each holds a place in
    flight, as many as the latency limit allows (it does not grow: none of them starts)."""
    held = []
    head = f"POST {URL} HTTP/1.1\r\nHost: {host}\r\nContent-Length: 1000\r\n\r\n".encode()
    while (stats := admission_stats(url))["requests_in_flight"] < stats["requests_limit"]:
        for _ in range(stats["requests_limit"] - stats["requests_in_flight"]):
            held.append(socket.create_connection((host, port)))
            held[-1].sendall(head)
        threading.Event().wait(0.05)
    return held


def read_response(sock: socket.socket) -> tuple[bytes, bytes]:
    """One response's head and body from `sock`."""
    data = b""
    while b"\r\n\r\n" not in data:
        part = sock.recv(65536)
        assert part, f"closed before a whole response came: {data!r}"
        data += part
    head, body = data.split(b"\r\n\r\n", 1)
    length = next(
        int(line.split(b":")[1])
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"content-length:")
    )
    while len(body) < length:
        body += sock.recv(65536)
    return head, body


def test_a_refusal_skips_the_body_and_keeps_or_closes_the_connection_as_asked(ranker: ServeProcess) -> None:
    """Refused from its headers, a keep-alive request's body is skipped and its connection serves
    the next request; a `Connection: close` one gets its 429 and then a clean close (no reset)."""
    url = httpx.URL(ranker.url)
    host, port = url.host, url.port
    assert port is not None
    batch = random_batch(SPEC, 8, seed=5)
    body = orjson.dumps(infer_body(*batch))
    held = hold_full(ranker.url, host, port)
    try:
        keep = socket.create_connection((host, port))
        closing = socket.create_connection((host, port))
        keep.sendall(raw_request(host, body, close=False))
        closing.sendall(raw_request(host, body, close=True))
        kept_head, kept_body = read_response(keep)
        closed_head, _ = read_response(closing)
        assert closing.recv(65536) == b""  # closed cleanly after the 429 (a reset would raise)
    finally:
        for sock in held:
            sock.close()
    assert kept_head.startswith(b"HTTP/1.1 429") and b"connection: close" not in kept_head.lower()
    assert b"retry-after: 1" in kept_head.lower() and b"retry later" in kept_body
    assert closed_head.startswith(b"HTTP/1.1 429") and b"connection: close" in closed_head.lower()
    while admission_stats(ranker.url)["requests_in_flight"]:
        threading.Event().wait(0.05)  # the held requests' places are freed as their clients go
    with keep:
        keep.sendall(raw_request(host, body, close=False))
        head, answer = read_response(keep)
    assert head.startswith(b"HTTP/1.1 200"), head + answer
    np.testing.assert_allclose(
        orjson.loads(answer)["outputs"][0]["data"],
        reference_scores(build_monolithic(load_weights(SOURCE)), *batch),
        atol=1e-5,
    )
    closing.close()
