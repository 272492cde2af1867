"""`flexemr serve --ray` builds its rankers as `flexemr serve` does (`RankerProcess.build`): gRPC when
a gRPC port is asked for, the admin API behind the cluster secret's token, model versions and row
updates. One Ray node (three logical CPUs: the ranker and a server for each of two model versions)
keeps it cheap."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator

import httpx
import numpy as np
import pytest

from flexemr.config.model import ModelSource
from flexemr.model.source import load_weights, model_spec
from flexemr.model.weights import build_monolithic
from flexemr.sharding.plan import make_plan
from tests.api.test_http import infer_body
from tests.conftest import ServeProcess
from tests.core.helpers import random_batch, reference_scores
from tests.ranker.test_model_versions import (
    EXPECTED,
    LOAD,
    SECRET,
    UNLOAD,
    admin,
    npz,
    push,
    reference_with,
    rows_of,
    scores_now,
    serving,
)

LOOPBACK = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
os.environ[LOOPBACK] = "0"  # every Ray address stays 127.0.0.1 (see test_ray.py)
ray = pytest.importorskip("ray", reason="Ray is not installed (pip install 'flexemr[ray]')")
pytest.importorskip("tritonclient.grpc", reason="tritonclient[grpc] is not installed")
from ray.cluster_utils import Cluster  # noqa: E402

from flexemr.entrypoints.ray_resources import server_memory  # noqa: E402
from tests.api.test_grpc import grpc_address, grpc_infer  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]
SOURCE = ModelSource(preset="tiny", seed=3)  # the seed of tests.ranker.test_model_versions' version 1
PLAN = make_plan("table", model_spec(SOURCE).table_rows, model_spec(SOURCE).dim, 1)


@pytest.fixture(scope="module")
def ray_serve(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServeProcess]:
    """`flexemr serve --ray ADDRESS --grpc-port 0` on a one-node Ray cluster, with a secret."""
    node = {"num_cpus": 3, "object_store_memory": 80 * 2**20, "node_ip_address": "127.0.0.1"}
    cluster = Cluster(
        initialize_head=True,
        head_node_args={**node, "memory": int(server_memory(PLAN)[0] * 2.5), "include_dashboard": False},
    )
    try:
        command = [sys.executable, "-m", "flexemr.cli.main", "serve", "--port", "0", "--watch-stdin",
                   "--ray", cluster.address, "--preset", "tiny", "--seed", "3", "--embedding-servers", "1",
                   "--host", "127.0.0.1", "--grpc-port", "0", "--max-body", "1048576",
                   "--update-log-dir", str(tmp_path_factory.mktemp("updates"))]  # fmt: skip
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "FLEXEMR_SECRET": SECRET}
        serve = ServeProcess(command, "flexemr ready:", 240.0, env)
        try:
            yield serve
        finally:
            serve.stop()
        assert serve.proc.returncode == 0
    finally:
        cluster.shutdown()


@pytest.fixture(scope="module")
def client(ray_serve: ServeProcess) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=ray_serve.url, timeout=120) as c:
        yield c


def test_a_ray_ranker_serves_grpc_bit_for_bit_as_http(ray_serve: ServeProcess, client: httpx.Client) -> None:
    import tritonclient.grpc as triton_grpc

    assert "tier=ray" in "".join(ray_serve.output)
    dense, indices, lengths = random_batch(model_spec(SOURCE), 16, seed=7)
    via_grpc = grpc_infer(triton_grpc.InferenceServerClient(grpc_address(ray_serve)), dense, indices, lengths)
    answer = client.post("/v2/models/dlrm/infer", json=infer_body(dense, indices, lengths))
    via_http = np.array(answer.json()["outputs"][0]["data"], dtype=np.float32)
    assert via_grpc.tobytes() == via_http.tobytes()
    expected = reference_scores(build_monolithic(load_weights(SOURCE)), dense, indices, lengths)
    np.testing.assert_allclose(via_grpc, expected, atol=1e-5)


def test_a_grpc_message_over_the_body_limit_is_refused(ray_serve: ServeProcess) -> None:
    """gRPC's message cap is the config's `max_body_bytes` (--max-body 1 MiB here), as HTTP's is."""
    import grpc
    from tritonclient.grpc import service_pb2, service_pb2_grpc

    request = service_pb2.ModelInferRequest(model_name="dlrm", raw_input_contents=[bytes(2 * 2**20)])
    with grpc.insecure_channel(grpc_address(ray_serve)) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        with pytest.raises(grpc.RpcError) as refused:
            stub.ModelInfer(request, timeout=30)
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert stub.ServerReady(service_pb2.ServerReadyRequest(), timeout=30).ready  # still serving


def test_a_ray_ranker_serves_the_admin_api_model_versions_and_row_updates(client: httpx.Client) -> None:
    assert client.post(LOAD, json={"parameters": {"version": "1"}}).status_code == 401  # no token
    assert serving(client) == ("1", ["1"])
    again = admin(client, LOAD, version="1")
    assert again.status_code == 200 and again.json()["serving"] == "1", again.text
    assert client.post("/v2/repository/index").json() == [
        {"name": "dlrm", "version": "1", "state": "READY", "reason": "serving"}
    ]
    # Row updates reach this ranker's servers (they log them in --update-log-dir) and are served exactly.
    update = rows_of(21)
    done = push(client, npz(update))
    assert done.status_code == 200 and done.json()["rows"] == 12, done.text
    for got, want in zip(scores_now(client), reference_with([update]), strict=True):
        np.testing.assert_allclose(got, want, atol=1e-5)


def test_a_ray_ranker_loads_a_new_model_version_on_server_actors_of_its_own(client: httpx.Client) -> None:
    loaded = admin(client, LOAD, seed=4)
    assert loaded.status_code == 200 and loaded.json()["serving"] == "2", loaded.text
    assert serving(client) == ("2", ["1", "2"])
    for got, want in zip(scores_now(client), EXPECTED["2"], strict=True):
        np.testing.assert_allclose(got, want, atol=1e-5)

    back = admin(client, LOAD, version="1")
    assert back.status_code == 200 and back.json()["serving"] == "1", back.text
    unloaded = admin(client, UNLOAD, version="2")
    assert unloaded.status_code == 200, unloaded.text
    assert serving(client) == ("1", ["1"])
    for got, want in zip(scores_now(client), reference_with([rows_of(21)]), strict=True):
        np.testing.assert_allclose(got, want, atol=1e-5)  # version 1, with the rows pushed before
