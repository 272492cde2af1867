"""Real clients against a running cluster: tritonclient unmodified, flexemr's client, Prometheus."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest

from flexemr.client import Client, InferenceError, infer_inputs
from flexemr.config.model import ModelSource
from flexemr.model.source import load_weights, model_spec
from flexemr.model.weights import build_monolithic
from tests.conftest import ServeProcess, start_serve
from tests.core.helpers import random_batch, reference_scores

pytestmark = pytest.mark.slow  # multi-process; `make test-fast` leaves it out

SOURCE = ModelSource(preset="tiny", seed=5, pooling="mean")
SPEC = model_spec(SOURCE)
MODEL = build_monolithic(load_weights(SOURCE))


@pytest.fixture(scope="module")
def cluster() -> Iterator[ServeProcess]:
    server = start_serve(
        "--preset", "tiny", "--seed", "5", "--pooling", "mean", "--embedding-servers", "3",
        "--sharding", "table", "--batch-window-ms", "5", "--cache", "fixed:1MiB",
    )  # fmt: skip
    yield server
    server.stop()


@pytest.mark.parametrize("binary", [False, True])
def test_tritonclient_unmodified(cluster: ServeProcess, binary: bool) -> None:
    import tritonclient.http as triton

    dense, indices, lengths = random_batch(SPEC, 7, seed=int(binary))
    client = triton.InferenceServerClient(url=cluster.url.removeprefix("http://"))
    try:
        assert client.is_server_live()
        assert client.is_model_ready("dlrm")
        inputs = []
        for name, dtype, array in [("dense_features", "FP32", dense), ("sparse_indices", "INT64", indices),
                                   ("sparse_lengths", "INT32", lengths)]:  # fmt: skip
            tensor = triton.InferInput(name, list(array.shape), dtype)
            tensor.set_data_from_numpy(array, binary_data=binary)
            inputs.append(tensor)
        outputs = [triton.InferRequestedOutput("scores", binary_data=binary)]
        result = client.infer("dlrm", inputs, outputs=outputs)
        np.testing.assert_allclose(
            result.as_numpy("scores"), reference_scores(MODEL, dense, indices, lengths), atol=1e-5
        )
    finally:
        client.close()


def test_flexemr_client_and_dynamic_batching(cluster: ServeProcess) -> None:
    batches = [random_batch(SPEC, 1 + i % 5, seed=100 + i) for i in range(48)]
    with Client(cluster.url) as binary, Client(cluster.url, binary=False) as plain:
        assert binary.ready()
        with ThreadPoolExecutor(8) as pool:
            results = list(pool.map(lambda b: binary.infer(*b), batches))
        for batch, scores in zip(batches, results, strict=True):
            np.testing.assert_allclose(scores, reference_scores(MODEL, *batch), atol=1e-5)
        np.testing.assert_allclose(plain.infer(*batches[0]), results[0], atol=1e-6)
        with pytest.raises(InferenceError, match="HTTP 400"):
            plain.infer(batches[0][0], batches[0][1] + 10**6, batches[0][2])
    stats = httpx.get(f"{cluster.url}/v2/stats").json()
    assert stats["batcher"]["requests"] >= 48
    assert stats["batcher"]["batches"] < stats["batcher"]["requests"]  # requests were merged


def test_metrics_endpoint(cluster: ServeProcess) -> None:
    with Client(cluster.url) as client:
        client.infer(*random_batch(SPEC, 3, seed=1))
        with pytest.raises(InferenceError):
            client.infer(*random_batch(SPEC, 0, seed=1))
    text = httpx.get(f"{cluster.url}/metrics").text
    samples = {
        line.split(" ")[0]: float(line.split(" ")[1]) for line in text.splitlines() if line and line[0] != "#"
    }
    assert samples['flexemr_http_requests_total{status="200"}'] >= 1
    assert samples['flexemr_errors_total{kind="invalid_input"}'] >= 1
    assert samples["flexemr_request_latency_seconds_count"] >= 1
    assert samples["flexemr_request_batch_size_sum"] >= 3
    sent = [v for k, v in samples.items() if k.startswith("flexemr_transport_servers_bytes_sent_total{")]
    assert len(sent) == 3
    assert sum(sent) > 0


def _metric_types(text: str) -> dict[str, str]:
    return {line.split()[2]: line.split()[3] for line in text.splitlines() if line.startswith("# TYPE ")}


def test_metrics_are_counters_or_gauges_by_meaning(cluster: ServeProcess) -> None:
    with Client(cluster.url) as client:
        client.infer(*random_batch(SPEC, 3, seed=2))
    text = httpx.get(f"{cluster.url}/metrics").text
    series = [line.rsplit(" ", 1)[0] for line in text.splitlines() if line and line[0] != "#"]
    assert len(series) == len(set(series)), "every series (name and labels) appears once"
    types = _metric_types(text)
    # Counts that only grow are counters, whatever their names; sizes (which shrink) are gauges.
    counters = (
        "flexemr_requests_total",
        "flexemr_transport_servers_subrequests_total",
        "flexemr_cache_lookups_total",
        "flexemr_cache_hits_total",
        "flexemr_transport_threads_loops_total",
    )
    gauges = (
        "flexemr_cache_rows",
        "flexemr_cache_size_bytes",
        "flexemr_cache_hit_rate",
        "flexemr_transport_threads_queue_depth",
        "flexemr_transport_engine_outstanding",
    )
    assert {name: types.get(name) for name in counters} == dict.fromkeys(counters, "counter")
    assert {name: types.get(name) for name in gauges} == dict.fromkeys(gauges, "gauge")


def test_metrics_pass_promtool(cluster: ServeProcess) -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("needs promtool: `make test` installs it as root (else: apt-get install prometheus)")
    with Client(cluster.url) as client:
        client.infer(*random_batch(SPEC, 3, seed=3))
    text = httpx.get(f"{cluster.url}/metrics").text
    result = subprocess.run(
        [promtool, "check", "metrics"], input=text, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_client_sends_indices_as_int32_only_when_every_one_fits() -> None:
    dense, lengths = np.zeros((1, 2)), np.array([2], dtype=np.int64)
    for indices, datatype in (([0, 2**31 - 1], "INT32"), ([0, 2**31], "INT64"), ([-1, 3], "INT64")):
        sent = infer_inputs(dense, np.array(indices, dtype=np.int64), lengths)
        assert [(name, d) for name, d, _ in sent] == [
            ("dense_features", "FP32"), ("sparse_indices", datatype), ("sparse_lengths", "INT32")
        ]  # fmt: skip
        assert sent[1][2].tolist() == indices  # the same values, whatever the width
