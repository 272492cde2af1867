"""The KServe v2 API of a real `flexemr serve` (servers and ranker in their own processes)."""

from __future__ import annotations

import json
import logging
import socket
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from flexemr.api.http import RateLimitedWarnings
from flexemr.api.http_server import http_listener
from flexemr.config.model import ModelSource
from flexemr.model.source import load_weights, model_spec
from flexemr.model.weights import build_monolithic
from tests.conftest import ServeProcess, start_serve
from tests.core.helpers import random_batch, reference_scores

SOURCE = ModelSource(preset="tiny", seed=3)
SPEC = model_spec(SOURCE)


def infer_body(dense: Any, indices: Any, lengths: Any, **extra: Any) -> dict[str, Any]:
    def tensor(name: str, dtype: str, array: Any) -> dict[str, Any]:
        array = np.asarray(array)
        return {"name": name, "datatype": dtype, "shape": list(array.shape), "data": array.ravel().tolist()}

    return {
        "inputs": [
            tensor("dense_features", "FP32", dense),
            tensor("sparse_indices", "INT64", indices),
            tensor("sparse_lengths", "INT32", lengths),
        ],
        **extra,
    }


@pytest.fixture(scope="module")
def cluster() -> Iterator[ServeProcess]:
    server = start_serve("--preset", "tiny", "--seed", "3", "--embedding-servers", "2", "--max-batch", "64")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def client(cluster: ServeProcess) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=cluster.url, timeout=30) as c:
        yield c


def test_health_and_metadata(client: httpx.Client) -> None:
    assert client.get("/v2/health/live").status_code == 200
    assert client.get("/v2/health/ready").status_code == 200
    meta = client.get("/v2/models/dlrm").json()
    assert [i["name"] for i in meta["inputs"]] == ["dense_features", "sparse_indices", "sparse_lengths"]
    assert meta["inputs"][0]["shape"] == [-1, SPEC.num_dense]


def test_json_infer_matches_monolithic(client: httpx.Client) -> None:
    dense, indices, lengths = random_batch(SPEC, 16, seed=1)
    response = client.post("/v2/models/dlrm/infer", json=infer_body(dense, indices, lengths, id="r1"))
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["id"] == "r1"
    scores = np.array(body["outputs"][0]["data"], dtype=np.float32)
    expected = reference_scores(build_monolithic(load_weights(SOURCE)), dense, indices, lengths)
    np.testing.assert_allclose(scores, expected, atol=1e-5)


@pytest.mark.parametrize("index_type", ["INT64", "INT32"])
def test_binary_infer_matches_json(client: httpx.Client, index_type: str) -> None:
    dense, indices, lengths = random_batch(SPEC, 8, seed=2)
    arrays = [
        ("dense_features", "FP32", dense),
        ("sparse_indices", index_type, indices.astype("<i8" if index_type == "INT64" else "<i4")),
        ("sparse_lengths", "INT32", lengths),
    ]
    header = {
        "inputs": [
            {"name": n, "datatype": d, "shape": list(a.shape), "parameters": {"binary_data_size": a.nbytes}}
            for n, d, a in arrays
        ],
        "outputs": [{"name": "scores", "parameters": {"binary_data": True}}],
    }
    import orjson

    head = orjson.dumps(header)
    body = head + b"".join(a.tobytes() for _, _, a in arrays)
    response = client.post(
        "/v2/models/dlrm/infer", content=body, headers={"Inference-Header-Content-Length": str(len(head))}
    )
    assert response.status_code == 200, response.text
    split = int(response.headers["inference-header-content-length"])
    scores = np.frombuffer(response.content[split:], dtype="<f4")
    expected = client.post("/v2/models/dlrm/infer", json=infer_body(dense, indices, lengths)).json()
    np.testing.assert_allclose(scores, expected["outputs"][0]["data"], atol=1e-6)
    assert len(scores) == 8


def _bad_requests() -> list[tuple[str, Callable[[], Any], str]]:
    dense, indices, lengths = random_batch(SPEC, 2, seed=5, max_bag=2)
    lengths = lengths.copy()
    lengths[:] = 1
    indices = np.zeros(SPEC.num_tables * 2, dtype=np.int64)
    out_of_range = indices.copy()
    out_of_range[2 * 2] = SPEC.table_rows[2]  # table 2, first sample: one past the end
    negative = indices.copy()
    negative[1] = -3
    long_lengths = np.ones(SPEC.num_tables * 2 + 1, dtype=np.int32)
    return [
        (
            "out of range",
            lambda: infer_body(dense, out_of_range, lengths),
            f"sparse_indices[4] = {SPEC.table_rows[2]}",
        ),
        ("negative", lambda: infer_body(dense, negative, lengths), "sparse_indices[1] = -3"),
        ("lengths sum", lambda: infer_body(dense, indices[:-1], lengths), "sum to 8"),
        (
            "lengths count",
            lambda: infer_body(dense, np.zeros(9, np.int64), long_lengths),
            "sparse_lengths must have",
        ),
        (
            "dense width",
            lambda: infer_body(np.zeros((2, 3)), indices, lengths),
            "dense_features must have shape",
        ),
        ("batch zero", lambda: infer_body(np.zeros((0, 4)), [], []), "batch size 0"),
        (
            "batch too big",
            lambda: infer_body(np.zeros((65, 4)), np.zeros(260, np.int64), np.ones(260, np.int32)),
            "exceeds the maximum of 64",
        ),
        (
            "float indices",
            lambda: {
                **infer_body(dense, indices, lengths),
                "inputs": [
                    infer_body(dense, indices, lengths)["inputs"][0],
                    {"name": "sparse_indices", "datatype": "INT64", "shape": [8], "data": [0.5] * 8},
                    infer_body(dense, indices, lengths)["inputs"][2],
                ],
            },
            "must hold INT64",
        ),
        (
            "wrong datatype",
            lambda: {"inputs": [{**infer_body(dense, indices, lengths)["inputs"][0], "datatype": "INT32"}]},
            "must have datatype FP32",
        ),
        (
            "parameters not an object",
            lambda: {**infer_body(dense, indices, lengths), "parameters": [1]},
            "parameters must be a JSON object, got list",
        ),
        (
            "outputs not a list",
            lambda: {**infer_body(dense, indices, lengths), "outputs": 3},
            "outputs must be",
        ),
        (
            "shape overflows int64",
            lambda: {
                "inputs": [
                    {**infer_body(dense, indices, lengths)["inputs"][0], "shape": [2**62, SPEC.num_dense]}
                ]
            },
            f"shape [{2**62}, {SPEC.num_dense}] needs {2**62 * SPEC.num_dense} values",
        ),
        (
            "huge shape",
            lambda: {"inputs": [{**infer_body(dense, indices, lengths)["inputs"][1], "shape": [2**40]}]},
            f"shape [{2**40}] needs {2**40} values",
        ),
        (
            "booleans as numbers",
            lambda: {
                "inputs": [
                    infer_body(dense, indices, lengths)["inputs"][0],
                    {"name": "sparse_indices", "datatype": "INT64", "shape": [8], "data": [True] + [0] * 7},
                    infer_body(dense, indices, lengths)["inputs"][2],
                ]
            },
            "must hold INT64 numbers, got boolean values",
        ),
        (
            "input twice",
            lambda: {"inputs": infer_body(dense, indices, lengths)["inputs"] * 2},
            "input dense_features is given twice",
        ),
        (
            "missing input",
            lambda: {"inputs": infer_body(dense, indices, lengths)["inputs"][:2]},
            "missing input",
        ),
    ]


@pytest.mark.parametrize(("case", "make", "message"), _bad_requests(), ids=[c for c, _, _ in _bad_requests()])
def test_bad_input_gets_400_and_service_continues(
    client: httpx.Client, case: str, make: Callable[[], Any], message: str
) -> None:
    response = client.post("/v2/models/dlrm/infer", json=make())
    assert response.status_code == 400, response.text
    assert message in response.json()["error"]
    dense, indices, lengths = random_batch(SPEC, 2, seed=9)
    assert client.post("/v2/models/dlrm/infer", json=infer_body(dense, indices, lengths)).status_code == 200


def test_malformed_json_and_unknown_model(client: httpx.Client) -> None:
    response = client.post("/v2/models/dlrm/infer", content=b"{not json")
    assert response.status_code == 400
    assert "malformed JSON" in response.json()["error"]
    dense, indices, lengths = random_batch(SPEC, 1, seed=0)
    response = client.post("/v2/models/nope/infer", json=infer_body(dense, indices, lengths))
    assert response.status_code == 400
    assert "unknown model 'nope'" in response.json()["error"]


@pytest.mark.slow
def test_serve_stops_all_children_on_sigterm(serve: Callable[..., ServeProcess]) -> None:
    server = serve("--preset", "tiny", "--embedding-servers", "3")
    children = server.children()
    assert len(children) == 3
    server.stop()
    assert server.proc.returncode == 0
    for pid in children:
        assert (
            not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text().lower()
        )


def _fuzz_value(rng: np.random.Generator) -> Any:
    """A value of the kind a careless or hostile client sends where something else belongs."""
    choices: list[Any] = [
        None, True, False, 0, -1, 1.5, 2**63, -(2**70), 1e308, "", "x", [], {}, [[]], [True, False],
        [2**64, 1], [1.5, "a"], {"a": [1]}, [[[[1]]]], [1] * 100, [[1, 2], [3]], [None], [-(2**62)] * 3,
    ]  # fmt: skip
    return choices[int(rng.integers(len(choices)))]


def _mutate(rng: np.random.Generator, node: Any) -> Any:
    """`node` with one value somewhere inside it replaced, removed or added."""
    if isinstance(node, dict) and node and rng.random() < 0.8:
        key = list(node)[int(rng.integers(len(node)))]
        action = rng.random()
        if action < 0.15:
            return {k: v for k, v in node.items() if k != key}
        if action < 0.5:
            return {**node, key: _fuzz_value(rng)}
        return {**node, key: _mutate(rng, node[key])}
    if isinstance(node, list) and node and rng.random() < 0.8:
        i = int(rng.integers(len(node)))
        copy = list(node)
        copy[i] = _mutate(rng, node[i]) if rng.random() < 0.6 else _fuzz_value(rng)
        return copy
    if isinstance(node, dict):
        return {
            **node,
            str(rng.choice(["parameters", "outputs", "id", "shape", "data", "inputs"])): _fuzz_value(rng),
        }
    return _fuzz_value(rng)


def _dumps(value: Any) -> bytes:
    return json.dumps(value).encode()  # not orjson: the fuzz sends integers beyond 64 bits


def _fuzzed_request(rng: np.random.Generator) -> tuple[str, bytes, dict[str, str]]:
    dense, indices, lengths = random_batch(SPEC, int(rng.integers(1, 4)), seed=int(rng.integers(1000)))
    good = infer_body(dense, indices, lengths, outputs=[{"name": "scores"}], parameters={})
    kind = rng.random()
    headers: dict[str, str] = {}
    if kind < 0.6:
        body = _dumps(_mutate(rng, good))
    elif kind < 0.75:  # corrupted bytes
        raw = bytearray(_dumps(good))
        for _ in range(int(rng.integers(1, 8))):
            raw[int(rng.integers(len(raw)))] = int(rng.integers(256))
        body = bytes(raw[: int(rng.integers(1, len(raw) + 1))])
    else:  # binary tensors with a bad split, size or length
        arrays = [np.asarray(dense, "<f4"), np.asarray(indices, "<i8"), np.asarray(lengths, "<i4")]
        header = _dumps(
            _mutate(rng, {
                "inputs": [
                    {"name": e["name"], "datatype": e["datatype"], "shape": e["shape"],
                     "parameters": {"binary_data_size": a.nbytes}}
                    for e, a in zip(good["inputs"], arrays, strict=True)
                ],
            })
        )  # fmt: skip
        body = header + b"".join(a.tobytes() for a in arrays)[: int(rng.integers(0, 200))]
        split = [str(len(header)), str(int(rng.integers(-5, len(body) + 5))), "x", "1e3", str(2**70)]
        headers["Inference-Header-Content-Length"] = split[int(rng.integers(len(split)))]
    if rng.random() < 0.1:
        headers["Flexemr-Timeout-Ms"] = str(rng.choice(["0", "-1", "nan", "inf", "1e12", "abc", "5000"]))
    return str(rng.choice(["dlrm"] * 9 + ["other"])), body, headers


def test_fuzzed_requests_get_4xx_never_5xx_and_the_ranker_keeps_serving(
    cluster: ServeProcess, client: httpx.Client
) -> None:
    rng = np.random.default_rng(11)
    statuses = []
    for _ in range(400):
        model, body, headers = _fuzzed_request(rng)
        response = client.post(f"/v2/models/{model}/infer", content=body, headers=headers)
        assert response.status_code < 500, (body[:300], headers, response.text)
        statuses.append(response.status_code)
    assert statuses.count(400) > 200  # the fuzzing did reach the validation
    for _ in range(5):  # truncated bodies: the client promises more than it sends, then leaves
        with socket.create_connection((client.base_url.host, client.base_url.port)) as sock:
            sock.sendall(b"POST /v2/models/dlrm/infer HTTP/1.1\r\nHost: x\r\nContent-Length: 900\r\n\r\n{")
    assert cluster.proc.poll() is None
    test_json_infer_matches_monolithic(client)
    assert not any("Traceback" in line for line in cluster.output), "".join(cluster.output[-40:])


def test_client_caused_warnings_are_rate_limited_errors_are_not() -> None:
    limit = RateLimitedWarnings(interval_s=3600)

    def record(level: int) -> logging.LogRecord:
        return logging.LogRecord(
            "uvicorn.error", level, __file__, 1, "Invalid HTTP request received.", (), None
        )

    assert [limit.filter(record(logging.WARNING)) for _ in range(5)] == [True, False, False, False, False]
    assert limit.filter(record(logging.ERROR))


def test_the_http_socket_sends_without_waiting_for_acks() -> None:
    with http_listener("127.0.0.1", 0) as listener, socket.create_connection(listener.getsockname()):
        accepted, _ = listener.accept()
        with accepted:
            assert accepted.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
