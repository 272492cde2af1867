"""Read-your-writes across the rankers of one cluster (issue #27 item 8), over real processes:
`flexemr serve --rankers 2` and one more `flexemr ranker` (with a cache) on the same servers.

A client pushes an update through one ranker and gets its row version; a request carrying it
(`Flexemr-Min-Row-Version`) through another ranker is scored with that version's rows (or newer),
never older ones: the ranker behind syncs first instead of waiting for its next poll. A version
no server holds is refused with 503 once the request's deadline passes; a malformed header 400."""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import tritonclient.grpc as triton_grpc

from flexemr.bench.update_checker import CheckerConfig, Cluster, expected_scores, read_batch
from flexemr.client import Client, binary_body
from flexemr.model.source import model_spec
from flexemr.updates import RowUpdates

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    started = Cluster(CheckerConfig(faults=(), redis=False), Path(tmp_path_factory.mktemp("ryw")))
    try:
        started.start()
        yield started
    finally:
        started.stop()


def push(url: str, token: str, updates: RowUpdates) -> int:
    body = io.BytesIO()
    np.savez(body, table=updates.tables, row=updates.rows, values=updates.values)
    response = httpx.post(
        f"{url}/v2/models/dlrm/updates",
        content=body.getvalue(),
        headers={"Authorization": f"Bearer {token}"},
        timeout=60,
    )
    assert response.status_code == 200, response.text
    return int(response.json()["version"])


def test_a_push_through_one_ranker_is_read_through_every_other(cluster: Cluster) -> None:
    assert cluster.extra is not None
    model = model_spec(cluster.spec.model)
    dense, indices, lengths, tables, rows = read_batch(model, 5)
    rng = np.random.default_rng(6)
    history: list[RowUpdates] = []
    pairs = [(cluster.url, cluster.extra.url), (cluster.extra.url, cluster.url)]
    reads: list[tuple[int, np.ndarray]] = []
    for step in range(12):
        pushed_to, read_from = pairs[step % 2]
        updates = RowUpdates(tables, rows, rng.standard_normal((tables.size, model.dim)).astype(np.float32))
        version = push(pushed_to, cluster.token, updates)
        history.append(updates)
        assert version == len(history)  # one writer: versions 1, 2, ...
        with Client(read_from, timeout=30) as client:  # a new connection: any of serve's rankers
            reads.append((version, client.infer(dense, indices, lengths, min_row_version=version)))
    expected = expected_scores(cluster.spec.model, history, dense, indices, lengths)
    for version, score in reads:  # every update rewrote every row read: only its state matches
        np.testing.assert_allclose(score, expected[version], atol=1e-5, rtol=0, err_msg=f"version {version}")


def test_read_your_writes_over_grpc(cluster: Cluster) -> None:
    """The same over gRPC: the version as `flexemr-min-row-version` metadata, to serve's first ranker."""
    assert cluster.extra is not None and cluster.grpc is not None
    model = model_spec(cluster.spec.model)
    dense, indices, lengths, tables, rows = read_batch(model, 7)
    values = np.random.default_rng(8).standard_normal((tables.size, model.dim)).astype(np.float32)
    updates = RowUpdates(tables, rows, values)
    version = push(cluster.extra.url, cluster.token, updates)
    inputs = []
    for name, dtype, array in [("dense_features", "FP32", dense), ("sparse_indices", "INT64", indices),
                               ("sparse_lengths", "INT32", lengths)]:  # fmt: skip
        tensor = triton_grpc.InferInput(name, list(array.shape), dtype)
        tensor.set_data_from_numpy(array)
        inputs.append(tensor)
    client = triton_grpc.InferenceServerClient(cluster.grpc)
    try:
        result = client.infer("dlrm", inputs, headers={"flexemr-min-row-version": str(version)})
    finally:
        client.close()
    # Every row the batch reads has `updates`' values now, whatever other tests wrote before.
    want = expected_scores(cluster.spec.model, [updates], dense, indices, lengths)[1]
    np.testing.assert_allclose(result.as_numpy("scores"), want, atol=1e-5, rtol=0)


def test_a_version_not_committed_is_refused_and_a_bad_header_is_400(cluster: Cluster) -> None:
    dense, indices, lengths, _, _ = read_batch(model_spec(cluster.spec.model), 5)
    body, header_length = binary_body(
        [
            ("dense_features", "FP32", dense),
            ("sparse_indices", "INT64", indices),
            ("sparse_lengths", "INT32", lengths),
        ]
    )
    headers = {"Inference-Header-Content-Length": str(header_length), "Flexemr-Timeout-Ms": "500"}
    infer = f"{cluster.url}/v2/models/dlrm/infer"
    response = httpx.post(infer, content=body, headers={**headers, "Flexemr-Min-Row-Version": "1000000000"})
    assert response.status_code == 503, response.text
    assert "not the 1000000000 the request needs" in response.json()["error"]
    response = httpx.post(infer, content=body, headers={**headers, "Flexemr-Min-Row-Version": "-1"})
    assert response.status_code == 400, response.text
    assert "Flexemr-Min-Row-Version" in response.json()["error"]
    response = httpx.post(infer, content=body, headers={**headers, "Flexemr-Min-Row-Version": "0"})
    assert response.status_code == 200, response.text
