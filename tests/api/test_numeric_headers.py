"""Numbers in headers and queries are ASCII digits only: '²', '٣' or '１' pass `str.isdigit` (and `int`
takes the last two), so a lenient parse answered some of them with 500 and took others as numbers.
Every numeric header of every endpoint gets them here, from a raw socket (so Content-Length is sent
as given), and every answer is a 4xx; the ranker keeps serving."""

from __future__ import annotations

import os
import socket
import sys
from collections.abc import Iterator
from urllib.parse import quote

import httpx
import numpy as np
import pytest

from flexemr.api.kserve import parse_decimal
from flexemr.batch import InvalidRequest
from flexemr.config.model import ModelSource
from flexemr.config.security import admin_token
from flexemr.model.source import load_weights, model_spec
from flexemr.model.weights import build_monolithic
from tests.api.test_http import infer_body
from tests.conftest import ServeProcess
from tests.core.helpers import random_batch, reference_scores

SECRET = "numeric-headers-secret"
SOURCE = ModelSource(preset="tiny", seed=3)
NOT_ASCII_DIGITS = [
    "²",
    "٣",
    "１",
    "৩",
    "12²",
    "1٣",
    "๑๒",
    "𝟕",
    "1_000",
    "+12",
    "-1",
    "1e3",
    "0x10",
    "1" * 19,
]


@pytest.mark.parametrize("text", NOT_ASCII_DIGITS)
def test_only_ascii_digits_are_a_number(text: str) -> None:
    with pytest.raises(InvalidRequest, match="decimal integer"):
        parse_decimal(text, "header X")


def test_ascii_digits_are_read() -> None:
    assert parse_decimal("0", "x") == 0 and parse_decimal("007", "x") == 7
    assert parse_decimal("9" * 18, "x") == 10**18 - 1


@pytest.fixture(scope="module")
def ranker() -> Iterator[ServeProcess]:
    command = [sys.executable, "-m", "flexemr.cli.main", "serve", "--port", "0", "--watch-stdin",
               "--preset", "tiny", "--seed", "3", "--embedding-servers", "1"]  # fmt: skip
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "FLEXEMR_SECRET": SECRET}
    server = ServeProcess(command, "flexemr ready:", 240.0, env)
    yield server
    server.stop()


def raw_post(url: str, path: str, headers: dict[str, str], body: bytes) -> tuple[int, bytes]:
    """POST with exactly these headers (UTF-8 encoded, Content-Length too): the response's status
    and body."""
    address = httpx.URL(url)
    lines = [f"POST {path} HTTP/1.1", f"Host: {address.host}", "Connection: close"]
    lines += [f"{name}: {value}" for name, value in headers.items()]
    request = ("\r\n".join(lines) + "\r\n\r\n").encode() + body
    with socket.create_connection((address.host, address.port), timeout=60) as sock:
        sock.sendall(request)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    head, _, content = answer.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), content


def test_every_numeric_header_with_other_digits_gets_4xx(ranker: ServeProcess) -> None:
    dense, indices, lengths = random_batch(model_spec(SOURCE), 2, seed=0)
    body = httpx.Request("POST", "/", json=infer_body(dense, indices, lengths)).content
    admin = {"Authorization": f"Bearer {admin_token(SECRET.encode())}"}
    cases: list[tuple[str, dict[str, str]]] = []
    length = str(len(body))
    for bad in NOT_ASCII_DIGITS:
        cases += [
            ("/v2/models/dlrm/infer", {"Content-Length": bad}),
            ("/v2/models/dlrm/infer", {"Content-Length": length, "Inference-Header-Content-Length": bad}),
            ("/v2/models/dlrm/infer", {"Content-Length": length, "Flexemr-Timeout-Ms": bad}),
            ("/v2/models/dlrm/updates", {**admin, "Content-Length": bad}),
            ("/v2/models/dlrm/updates?sequence=" + quote(bad), {**admin, "Content-Length": length}),
        ]
    statuses, unexplained = {}, []
    for path, headers in cases:
        status, content = raw_post(ranker.url, path, {"Content-Type": "application/json", **headers}, body)
        statuses[(path, tuple(headers.items()))] = status
        # uvicorn refuses a bad Content-Length itself; the others reach flexemr's parser
        if headers["Content-Length"] == length and b"decimal integer" not in content:
            unexplained.append((path, headers, status, content))
    assert {k: s for k, s in statuses.items() if not 400 <= s < 500} == {}
    assert unexplained == []
    answer = httpx.post(ranker.url + "/v2/models/dlrm/infer", content=body, timeout=60)
    scores = answer.json()["outputs"][0]["data"]
    expected = reference_scores(build_monolithic(load_weights(SOURCE)), dense, indices, lengths)
    np.testing.assert_allclose(np.asarray(scores).reshape(expected.shape), expected, atol=1e-5)
    assert not any("Traceback" in line for line in ranker.output), "".join(ranker.output[-40:])
