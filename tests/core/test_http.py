"""The KServe v2 API of a real `flexemr serve` (servers and ranker in their own processes)."""

from __future__ import annotations

import os
import signal
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from flexemr.config import ModelSource
from flexemr.model.weights import build_monolithic
from tests.conftest import ServeProcess, start_serve
from tests.core.helpers import random_batch, reference_scores

SOURCE = ModelSource(preset="tiny", seed=3)
SPEC = SOURCE.spec()


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
    expected = reference_scores(build_monolithic(SOURCE.load()), dense, indices, lengths)
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
def test_killed_embedding_server_gives_503_never_scores(serve: Callable[..., ServeProcess]) -> None:
    # no cache: a warm cache could (correctly) answer from cached rows without the dead server
    server = serve("--preset", "tiny", "--embedding-servers", "2", "--sharding", "row", "--cache", "off")
    with httpx.Client(base_url=server.url, timeout=30) as client:
        dense, indices, lengths = random_batch(SPEC, 4, seed=4)
        body = infer_body(dense, indices, lengths)
        assert client.post("/v2/models/dlrm/infer", json=body).status_code == 200
        victim = server.children()[1]
        os.kill(victim, signal.SIGKILL)
        for _ in range(5):  # every request touches both servers (row-wise): none may score
            response = client.post("/v2/models/dlrm/infer", json=body)
            assert response.status_code == 503, response.text
            assert "embedding server 1" in response.json()["error"]
            assert "outputs" not in response.json()
        assert client.get("/v2/health/ready").status_code == 503


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
