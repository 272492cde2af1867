"""How a real `flexemr serve` receives infer bodies (`flexemr.api.http_protocol`): a body with a
Content-Length goes into one buffer as its bytes arrive, however they are split; a client that
leaves mid-body costs nothing but its own request; the body caps hold before anything is read."""

from __future__ import annotations

import socket
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import numpy as np
import orjson
import pytest

from flexemr.client import binary_body
from flexemr.config.model import ModelSource
from flexemr.model.source import load_weights, model_spec
from flexemr.model.weights import build_monolithic
from tests.api.test_http import infer_body
from tests.conftest import ServeProcess, start_serve
from tests.core.helpers import random_batch, reference_scores

SOURCE = ModelSource(preset="tiny", seed=3)
SPEC = model_spec(SOURCE)
URL = "/v2/models/dlrm/infer"


@pytest.fixture(scope="module")
def ranker() -> Iterator[ServeProcess]:
    server = start_serve("--preset", "tiny", "--seed", "3", "--embedding-tier", "local", "--max-body", "1MiB")
    yield server
    server.stop()
    assert not any("Traceback" in line for line in server.output), "".join(server.output[-40:])


def request_bytes(url: str, batch: int, seed: int) -> tuple[bytes, bytes, np.ndarray]:
    """The head and the binary body of an infer request, and the monolith's scores for it."""
    dense, indices, lengths = random_batch(SPEC, batch, seed=seed)
    body, header_length = binary_body(
        [("dense_features", "FP32", dense.astype("<f4")), ("sparse_indices", "INT64", indices.astype("<i8")),
         ("sparse_lengths", "INT32", lengths.astype("<i4"))]
    )  # fmt: skip
    host = httpx.URL(url).host
    head = (
        f"POST {URL} HTTP/1.1\r\nHost: {host}\r\nContent-Length: {len(body)}\r\n"
        f"Inference-Header-Content-Length: {header_length}\r\n\r\n"
    ).encode()
    expected = reference_scores(build_monolithic(load_weights(SOURCE)), dense, indices, lengths)
    return head, body, expected


def read_response(sock: socket.socket) -> tuple[int, bytes]:
    """Status and body of one HTTP response with a Content-Length."""
    return read_responses(sock, 1)[0]


def read_responses(sock: socket.socket, count: int) -> list[tuple[int, bytes]]:
    """Status and body of the next `count` responses (each with a Content-Length)."""
    data = b""
    answers: list[tuple[int, bytes]] = []
    while len(answers) < count:
        while b"\r\n\r\n" not in data:
            data += sock.recv(65536)
        head, data = data.split(b"\r\n\r\n", 1)
        lines = head.split(b"\r\n")
        length = next(int(ln.split(b":")[1]) for ln in lines if ln.lower().startswith(b"content-length"))
        while len(data) < length:
            data += sock.recv(65536)
        answers.append((int(head.split()[1]), data[:length]))
        data = data[length:]
    return answers


def scores_of(answer: bytes, expected: np.ndarray) -> np.ndarray:
    return np.frombuffer(answer[-4 * len(expected) :], dtype="<f4")


def stats(url: str) -> dict[str, Any]:
    admission: dict[str, Any] = httpx.get(f"{url}/v2/stats", timeout=30).json()["admission"]
    return admission


def connect(url: str) -> socket.socket:
    sock = socket.create_connection((httpx.URL(url).host, httpx.URL(url).port), timeout=60)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


@pytest.mark.parametrize("pieces", [1, 3, 200])
def test_a_body_in_any_number_of_pieces_scores_like_the_monolith(ranker: ServeProcess, pieces: int) -> None:
    head, body, expected = request_bytes(ranker.url, 64, seed=pieces)
    with connect(ranker.url) as sock:
        for attempt in range(2):  # twice on one connection: keep-alive works after the fast path
            sock.sendall(head + body[: len(body) // pieces])
            for start in range(len(body) // pieces, len(body), max(len(body) // pieces, 1)):
                time.sleep(0.002)
                sock.sendall(body[start : start + max(len(body) // pieces, 1)])
            status, answer = read_response(sock)
            assert status == 200, (attempt, answer[:300])
            scores = np.frombuffer(answer[-4 * len(expected) :], dtype="<f4")
            np.testing.assert_allclose(scores, expected, atol=1e-5)


def test_a_client_that_leaves_mid_body_is_dropped_and_others_are_served(ranker: ServeProcess) -> None:
    before = stats(ranker.url)
    head, body, expected = request_bytes(ranker.url, 64, seed=11)
    with connect(ranker.url) as sock:
        sock.sendall(head + body[: len(body) // 2])
        time.sleep(0.2)
    while (after := stats(ranker.url))["dropped_disconnected_requests"] == before[
        "dropped_disconnected_requests"
    ]:
        time.sleep(0.05)  # the test's timeout bounds it
    assert after["requests_in_flight"] == 0 and after["requests_being_read"] == 0
    with connect(ranker.url) as sock:
        sock.sendall(head + body)
        status, answer = read_response(sock)
    assert status == 200
    np.testing.assert_allclose(np.frombuffer(answer[-4 * len(expected) :], dtype="<f4"), expected, atol=1e-5)


@pytest.mark.parametrize(
    ("headers", "message"),
    [
        ("Content-Length: 2000000\r\nInference-Header-Content-Length: 100\r\n", "exceeds 1048576"),
        ("Content-Length: 100000\r\nContent-Type: application/json\r\n", "the JSON part of a request"),
    ],
)
def test_a_declared_body_over_its_cap_gets_413_before_a_byte_of_it_is_sent(
    ranker: ServeProcess, headers: str, message: str
) -> None:
    with connect(ranker.url) as sock:  # the body never comes: only a server that reads none can answer
        sock.sendall(f"POST {URL} HTTP/1.1\r\nHost: x\r\n{headers}\r\n".encode())
        status, answer = read_response(sock)
    assert status == 413 and message in answer.decode()


def test_a_client_that_expects_100_continue_is_told_to_send_its_body(ranker: ServeProcess) -> None:
    head, body, expected = request_bytes(ranker.url, 16, seed=12)
    with connect(ranker.url) as sock:  # as curl sends a large body: it waits for the 100 first
        sock.sendall(head.replace(b"\r\n\r\n", b"\r\nExpect: 100-continue\r\n\r\n", 1))
        interim = b""
        while b"\r\n\r\n" not in interim:
            interim += sock.recv(64)
        assert interim.startswith(b"HTTP/1.1 100 Continue\r\n\r\n")
        sock.sendall(body)
        status, answer = read_response(sock)
    assert status == 200
    np.testing.assert_allclose(np.frombuffer(answer[-4 * len(expected) :], dtype="<f4"), expected, atol=1e-5)


def test_pipelined_infer_requests_binary_json_and_others_are_answered_in_order(ranker: ServeProcess) -> None:
    """Requests sent back to back on one connection, before any answer: the infer route (served by
    the protocol) and the app's routes keep their order, and each infer scores like the monolith."""
    binary = [request_bytes(ranker.url, batch, seed=20 + batch) for batch in (8, 64)]
    dense, indices, lengths = random_batch(SPEC, 5, seed=30)
    json_body = orjson.dumps(infer_body(dense, indices, lengths, id="j"))
    json_head = f"POST {URL} HTTP/1.1\r\nHost: x\r\nContent-Length: {len(json_body)}\r\n\r\n".encode()
    health = b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n\r\n"
    with connect(ranker.url) as sock:
        sock.sendall(b"".join([*binary[0][:2], health, json_head, json_body, *binary[1][:2]]))
        answers = read_responses(sock, 4)
    assert [status for status, _ in answers] == [200, 200, 200, 200]
    for (_, answer), (_, _, expected) in zip([answers[0], answers[3]], binary, strict=True):
        np.testing.assert_allclose(scores_of(answer, expected), expected, atol=1e-5)
    assert orjson.loads(answers[1][1]) == {"live": True}
    scored = orjson.loads(answers[2][1])
    assert scored["id"] == "j"
    expected = reference_scores(build_monolithic(load_weights(SOURCE)), dense, indices, lengths)
    np.testing.assert_allclose(scored["outputs"][0]["data"], expected, atol=1e-5)


def test_a_chunked_body_is_scored_by_the_app_like_the_monolith(ranker: ServeProcess) -> None:
    """A body without a Content-Length is not served directly: the ASGI app reads it, bounded."""
    head, body, expected = request_bytes(ranker.url, 32, seed=13)
    chunked = head.replace(b"Content-Length: %d" % len(body), b"Transfer-Encoding: chunked")
    pieces = [body[start : start + 40_000] for start in range(0, len(body), 40_000)]
    with connect(ranker.url) as sock:
        sock.sendall(chunked + b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in pieces) + b"0\r\n\r\n")
        status, answer = read_response(sock)
    assert status == 200, answer[:300]
    np.testing.assert_allclose(scores_of(answer, expected), expected, atol=1e-5)


def test_under_h11_the_app_serves_infer_like_the_monolith(
    serve: Callable[..., ServeProcess],
) -> None:
    server = serve("--preset", "tiny", "--seed", "3", "--embedding-tier", "local", "--http-parser", "h11")
    head, body, expected = request_bytes(server.url, 16, seed=14)
    with connect(server.url) as sock:
        for _ in range(2):
            sock.sendall(head + body)
            status, answer = read_response(sock)
            assert status == 200, answer[:300]
            np.testing.assert_allclose(scores_of(answer, expected), expected, atol=1e-5)


def test_a_body_finished_in_the_same_write_as_the_next_requests_is_scored_and_they_are_parsed(
    ranker: ServeProcess,
) -> None:
    """The rest of a body goes straight into its buffer, no byte further: the requests that follow
    it in the same write (infer and another route) are parsed afterwards, in order, each infer
    scoring like the monolith."""
    first, second = (request_bytes(ranker.url, 64, seed=seed) for seed in (40, 41))
    health = b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n\r\n"
    with connect(ranker.url) as sock:
        sock.sendall(first[0] + first[1][:100])
        time.sleep(0.2)  # the server reads the head and waits for the rest of the body
        sock.sendall(first[1][100:] + second[0] + second[1] + health + first[0] + first[1])
        answers = read_responses(sock, 4)
    assert [status for status, _ in answers] == [200, 200, 200, 200]
    for (_, answer), expected in zip(answers, (first[2], second[2], None, first[2]), strict=True):
        if expected is None:
            assert orjson.loads(answer) == {"live": True}
        else:
            np.testing.assert_allclose(scores_of(answer, expected), expected, atol=1e-5)
