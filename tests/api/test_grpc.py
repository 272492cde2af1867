"""KServe v2 gRPC and the metadata endpoints, with tritonclient unmodified, against real `flexemr
serve` processes; and the served monolithic deployment (`--embedding-tier local`)."""

from __future__ import annotations

import os
import re
import signal
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import numpy as np
import pytest
import tritonclient.grpc as triton_grpc
import tritonclient.http as triton_http
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException

from flexemr.config.model import ModelSource
from flexemr.model.source import load_weights, model_spec
from flexemr.model.weights import build_monolithic
from tests.conftest import ServeProcess, start_serve
from tests.core.helpers import random_batch, reference_scores

SOURCE = ModelSource(preset="tiny", seed=3)
SPEC = model_spec(SOURCE)
ARGS = ("--preset", "tiny", "--seed", "3", "--max-batch", "64", "--grpc-port", "0")


def grpc_address(server: ServeProcess) -> str:
    match = re.search(r"grpc=(\S+)", "".join(server.output))
    assert match, "the ready banner names no gRPC address"
    return match.group(1)


@pytest.fixture(scope="module")
def cluster() -> Iterator[ServeProcess]:
    server = start_serve(*ARGS, "--embedding-servers", "2", "--sharding", "row")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def local() -> Iterator[ServeProcess]:
    server = start_serve(*ARGS, "--embedding-tier", "local")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def client(cluster: ServeProcess) -> Iterator[Any]:
    c = triton_grpc.InferenceServerClient(grpc_address(cluster))
    yield c
    c.close()


def grpc_infer(client: Any, dense: np.ndarray, indices: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    inputs = []
    for name, dtype, array in [("dense_features", "FP32", dense), ("sparse_indices", "INT64", indices),
                               ("sparse_lengths", "INT32", lengths)]:  # fmt: skip
        tensor = triton_grpc.InferInput(name, list(array.shape), dtype)
        tensor.set_data_from_numpy(array)
        inputs.append(tensor)
    result = client.infer("dlrm", inputs, outputs=[triton_grpc.InferRequestedOutput("scores")])
    scores: np.ndarray = result.as_numpy("scores")
    return scores


def http_infer(url: str, dense: np.ndarray, indices: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    client = triton_http.InferenceServerClient(url.removeprefix("http://"))
    try:
        inputs = []
        for name, dtype, array in [("dense_features", "FP32", dense), ("sparse_indices", "INT64", indices),
                                   ("sparse_lengths", "INT32", lengths)]:  # fmt: skip
            tensor = triton_http.InferInput(name, list(array.shape), dtype)
            tensor.set_data_from_numpy(array, binary_data=True)
            inputs.append(tensor)
        outputs = [triton_http.InferRequestedOutput("scores", binary_data=True)]
        scores: np.ndarray = client.infer("dlrm", inputs, outputs=outputs).as_numpy("scores")
        return scores
    finally:
        client.close()


def test_grpc_metadata_rpcs(client: Any) -> None:
    assert client.is_server_live()
    assert client.is_server_ready()
    assert client.is_model_ready("dlrm")
    assert client.get_server_metadata().name == "flexemr"
    meta = client.get_model_metadata("dlrm")
    assert [t.name for t in meta.inputs] == ["dense_features", "sparse_indices", "sparse_lengths"]
    assert list(meta.inputs[0].shape) == [-1, SPEC.num_dense]
    config = client.get_model_config("dlrm").config
    assert [t.name for t in config.input] == ["dense_features", "sparse_indices", "sparse_lengths"]
    assert [m.name for m in client.get_model_repository_index().models] == ["dlrm"]
    with pytest.raises(InferenceServerException, match="unknown model 'nope'") as info:
        client.is_model_ready("nope")
    assert info.value.status() == "StatusCode.NOT_FOUND"


def test_grpc_infer_equals_http_bit_for_bit(cluster: ServeProcess, client: Any) -> None:
    dense, indices, lengths = random_batch(SPEC, 16, seed=7)
    via_grpc = grpc_infer(client, dense, indices, lengths)
    via_http = http_infer(cluster.url, dense, indices, lengths)
    assert via_grpc.dtype == np.float32 and via_grpc.shape == (16,)
    assert via_grpc.tobytes() == via_http.tobytes()
    expected = reference_scores(build_monolithic(load_weights(SOURCE)), dense, indices, lengths)
    np.testing.assert_allclose(via_grpc, expected, atol=1e-5)


def test_typed_contents_equal_raw_contents(cluster: ServeProcess, client: Any) -> None:
    dense, indices, lengths = random_batch(SPEC, 5, seed=8)
    tensor = service_pb2.ModelInferRequest.InferInputTensor
    contents = service_pb2.InferTensorContents
    request = service_pb2.ModelInferRequest(
        model_name="dlrm",
        id="typed-1",
        inputs=[
            tensor(name="dense_features", datatype="FP32", shape=list(dense.shape),
                   contents=contents(fp32_contents=dense.ravel().tolist())),
            tensor(name="sparse_indices", datatype="INT64", shape=list(indices.shape),
                   contents=contents(int64_contents=indices.tolist())),
            tensor(name="sparse_lengths", datatype="INT32", shape=list(lengths.shape),
                   contents=contents(int_contents=lengths.tolist())),
        ],
    )  # fmt: skip
    with grpc.insecure_channel(grpc_address(cluster)) as channel:
        response = service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=30)
    assert response.id == "typed-1"
    typed = np.frombuffer(response.raw_output_contents[0], dtype="<f4")
    assert typed.tobytes() == grpc_infer(client, dense, indices, lengths).tobytes()


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"sparse_lengths": ("INT64", None)}, "sparse_lengths must have datatype INT32"),
        ({"dense_features": ("FP32", np.zeros((2, SPEC.num_dense + 1), np.float32))}, "dense_features"),
        ({"sparse_indices": ("INT64", np.array([10**9], np.int64))}, "sparse_indices"),
    ],
)
def test_bad_grpc_input_is_invalid_argument(client: Any, change: dict[str, Any], field: str) -> None:
    dense, indices, lengths = random_batch(SPEC, 2, seed=9)
    arrays = {"dense_features": ("FP32", dense), "sparse_indices": ("INT64", indices),
              "sparse_lengths": ("INT32", lengths)}  # fmt: skip
    for name, (dtype, array) in change.items():
        old = arrays[name][1]
        arrays[name] = (dtype, old.astype(np.int64) if array is None else array)
    inputs = []
    for name, (dtype, array) in arrays.items():
        tensor = triton_grpc.InferInput(name, list(array.shape), dtype)
        tensor.set_data_from_numpy(array)
        inputs.append(tensor)
    with pytest.raises(InferenceServerException, match=field) as info:
        client.infer("dlrm", inputs)
    assert info.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert grpc_infer(client, dense, indices, lengths).shape == (2,)  # everyone else is still served


def test_http_metadata_endpoints_for_tritonclient(cluster: ServeProcess) -> None:
    client = triton_http.InferenceServerClient(cluster.url.removeprefix("http://"))
    try:
        assert client.get_server_metadata()["name"] == "flexemr"
        assert client.is_model_ready("dlrm", "1")
        config = client.get_model_config("dlrm")
        assert [t["data_type"] for t in config["input"]] == ["TYPE_FP32", "TYPE_INT64", "TYPE_INT32"]
        assert client.get_model_repository_index() == [
            {"name": "dlrm", "version": "1", "state": "READY", "reason": "serving"}
        ]
        assert client.get_model_metadata("dlrm", "1")["name"] == "dlrm"
        with pytest.raises(InferenceServerException, match=r"has versions \['1'\], not '2'"):
            client.get_model_metadata("dlrm", "2")
        with pytest.raises(InferenceServerException, match="Not Found"):  # not served: a clean 404
            client.get_inference_statistics("dlrm")
    finally:
        client.close()


def test_served_monolithic_scores_equal_flexemr(cluster: ServeProcess, local: ServeProcess) -> None:
    assert "tier=local" in "".join(local.output)
    assert local.children() == []  # every table in the ranker's own process
    dense, indices, lengths = random_batch(SPEC, 32, seed=10)
    over_servers = http_infer(cluster.url, dense, indices, lengths)
    local_client = triton_grpc.InferenceServerClient(grpc_address(local))
    try:
        in_ranker = grpc_infer(local_client, dense, indices, lengths)
    finally:
        local_client.close()
    np.testing.assert_allclose(in_ranker, over_servers, rtol=1e-6, atol=1e-7)
    expected = reference_scores(build_monolithic(load_weights(SOURCE)), dense, indices, lengths)
    np.testing.assert_allclose(in_ranker, expected, atol=1e-5)


def test_dead_embedding_server_is_unavailable(serve: Callable[..., ServeProcess]) -> None:
    server = serve(*ARGS, "--embedding-servers", "2", "--sharding", "row", "--cache", "off")
    client = triton_grpc.InferenceServerClient(grpc_address(server))
    try:
        dense, indices, lengths = random_batch(SPEC, 4, seed=11)
        assert grpc_infer(client, dense, indices, lengths).shape == (4,)
        os.kill(server.children()[1], signal.SIGKILL)
        for _ in range(3):  # every request touches both servers (row-wise): none may score
            with pytest.raises(InferenceServerException, match="embedding server 1") as info:
                grpc_infer(client, dense, indices, lengths)
            assert info.value.status() == "StatusCode.UNAVAILABLE"
        assert not client.is_server_ready()
    finally:
        client.close()
