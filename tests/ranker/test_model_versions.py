"""The admin API of a real `flexemr serve`: whole-model versions (load one under load with no
failed request and exact scores, roll back, bounds) and row updates pushed over HTTP; both refuse
what they must and change nothing then."""

from __future__ import annotations

import io
import json
import os
import secrets
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import numpy as np
import pytest
import torch

from flexemr.config.model import ModelSource
from flexemr.config.security import admin_token
from flexemr.model.source import load_weights, model_spec
from flexemr.model.weights import build_monolithic
from tests.api.test_http import infer_body
from tests.conftest import ServeProcess
from tests.core.helpers import random_batch, reference_scores

# Multi-process (`make test-fast` leaves them out); clusters start slowly on a loaded machine.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

SEEDS = {"1": 3, "2": 4, "3": 5}
"""The preset seed of each model version the test loads."""
SPEC = model_spec(ModelSource(preset="tiny", seed=3))
SECRET = secrets.token_hex(16)
LOAD = "/v2/repository/models/dlrm/load"
UNLOAD = "/v2/repository/models/dlrm/unload"


@pytest.fixture(scope="module")
def cluster() -> Iterator[ServeProcess]:
    command = [sys.executable, "-m", "flexemr.cli.main", "serve", "--port", "0", "--watch-stdin", "--preset",
               "tiny", "--seed", "3", "--embedding-servers", "2", "--max-body", "1048576"]  # fmt: skip
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "FLEXEMR_SECRET": SECRET}
    server = ServeProcess(command, "flexemr ready:", 240.0, env)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def client(cluster: ServeProcess) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=cluster.url, timeout=300) as c:
        yield c


ADMIN = {"Authorization": f"Bearer {admin_token(SECRET.encode())}"}
BATCHES = [random_batch(SPEC, 8, seed=s) for s in range(3)]
EXPECTED = {
    version: [
        reference_scores(build_monolithic(load_weights(ModelSource(preset="tiny", seed=seed))), *b)
        for b in BATCHES
    ]
    for version, seed in SEEDS.items()
}


class Load:
    """Client threads scoring `BATCHES` in a loop; every answer kept as (time sent, status, version,
    batch, scores)."""

    def __init__(self, url: str, threads: int = 3) -> None:
        self.url = url
        self.answers: list[tuple[float, int, str, int, np.ndarray | str]] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(i,)) for i in range(threads)]

    def _run(self, which: int) -> None:
        body = infer_body(*BATCHES[which])
        with httpx.Client(base_url=self.url, timeout=60) as client:
            while not self._stop.is_set():
                sent = time.monotonic()
                response = client.post("/v2/models/dlrm/infer", json=body)
                if response.status_code == 200:
                    out = response.json()
                    scores = np.array(out["outputs"][0]["data"], dtype=np.float32)
                    self.answers.append((sent, 200, out["model_version"], which, scores))
                else:
                    self.answers.append((sent, response.status_code, "", which, response.text))

    def __enter__(self) -> Load:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(120)

    def wait_for_answers_sent_after(self, after: float, count: int = 6, timeout_s: float = 120) -> None:
        deadline = time.monotonic() + timeout_s
        while sum(a[0] > after for a in list(self.answers)) < count:
            assert time.monotonic() < deadline, "the load stopped getting answers"
            time.sleep(0.1)

    def check(self, after: float, serving: str) -> None:
        """Every request succeeded with exactly its version's monolithic scores; every one sent
        after `after` (the switch was answered) was scored by `serving`."""
        failed = [a for a in self.answers if a[1] != 200]
        assert failed == [], failed[:3]
        for _, _, version, which, scores in self.answers:
            np.testing.assert_allclose(scores, EXPECTED[version][which], atol=1e-5)
        late = {a[2] for a in self.answers if a[0] > after}
        assert late == {serving}


def admin(client: httpx.Client, path: str, **parameters: Any) -> httpx.Response:
    return client.post(path, json={"parameters": parameters}, headers=ADMIN)


def serving(client: httpx.Client) -> tuple[str, list[str]]:
    meta = client.get("/v2/models/dlrm").json()
    return meta["parameters"]["serving_version"], meta["versions"]


def test_admin_api_refuses_without_the_token_and_names_bad_parameters(client: httpx.Client) -> None:
    assert client.post(LOAD, json={"parameters": {"seed": 4}}).status_code == 401
    wrong = client.post(LOAD, json={"parameters": {"seed": 4}}, headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 401 and wrong.headers["www-authenticate"] == "Bearer"
    cases = [
        ({"seeds": 4}, 400, "seeds"),
        ({"seed": "4"}, 400, "parameters.seed"),
        ({"checkpoint": "/no/such/model.pt"}, 400, "parameters.checkpoint"),
        ({"version": "7"}, 404, "'7'"),
        ({}, 400, "parameters"),
    ]
    for parameters, status, named in cases:
        response = admin(client, LOAD, **parameters)
        assert response.status_code == status and named in response.json()["error"], response.text
    only = admin(client, UNLOAD)
    assert only.status_code == 409 and "only one loaded" in only.json()["error"]
    assert client.post("/v2/repository/models/other/load", json={}, headers=ADMIN).status_code == 404
    assert serving(client) == ("1", ["1"])  # nothing changed
    assert client.post("/v2/repository/index").json() == [
        {"name": "dlrm", "version": "1", "state": "READY", "reason": "serving"}
    ]


def test_swap_under_load_fails_nothing_and_rolls_back(client: httpx.Client, cluster: ServeProcess) -> None:
    assert len(cluster.children()) == 2  # version 1's embedding servers
    with Load(cluster.url) as load:
        load.wait_for_answers_sent_after(time.monotonic(), count=3)
        response = admin(client, LOAD, seed=SEEDS["2"])
        assert response.status_code == 200, response.text
        assert response.json() == {"name": "dlrm", "version": "2", "serving": "2"}
        flipped = time.monotonic()
        load.wait_for_answers_sent_after(flipped)
    load.check(flipped, serving="2")
    assert {a[2] for a in load.answers} == {"1", "2"}  # the load ran across the swap
    assert serving(client) == ("2", ["1", "2"])
    assert len(cluster.children()) == 4  # both versions' servers

    # Either version can still be asked for by name; unknown ones are refused.
    old = client.post("/v2/models/dlrm/versions/1/infer", json=infer_body(*BATCHES[0]))
    assert old.json()["model_version"] == "1"
    np.testing.assert_allclose(old.json()["outputs"][0]["data"], EXPECTED["1"][0], atol=1e-5)
    assert client.post("/v2/models/dlrm/versions/3/infer", json=infer_body(*BATCHES[0])).status_code == 400

    # Rollback, instant: version 1 serves again, version 2 stays loaded.
    with Load(cluster.url) as load:
        load.wait_for_answers_sent_after(time.monotonic(), count=3)
        assert admin(client, LOAD, version="1").json() == {"name": "dlrm", "version": "1", "serving": "1"}
        flipped = time.monotonic()
        load.wait_for_answers_sent_after(flipped)
    load.check(flipped, serving="1")
    assert serving(client) == ("1", ["1", "2"])

    # A third version: at most two are loaded, so the one not serving (2) is unloaded for it; a
    # load while another is under way is refused.
    third: list[httpx.Response] = []
    loader = threading.Thread(target=lambda: third.append(admin(client, LOAD, seed=SEEDS["3"])))
    loader.start()
    deadline = time.monotonic() + 60
    while not client.get("/v2/stats").json()["model"]["loading"]:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    busy = admin(client, LOAD, seed=9)
    assert busy.status_code == 409 and "being loaded" in busy.json()["error"]
    loader.join(300)
    assert third[0].json() == {"name": "dlrm", "version": "3", "serving": "3"}, third[0].text
    assert serving(client) == ("3", ["1", "3"])
    assert len(cluster.children()) == 4  # version 2's servers were stopped

    # Unloading the serving version rolls back to the other one, under load, and stops its servers.
    with Load(cluster.url) as load:
        load.wait_for_answers_sent_after(time.monotonic(), count=3)
        assert admin(client, UNLOAD).json() == {"name": "dlrm", "version": "1", "serving": "1"}
        flipped = time.monotonic()
        load.wait_for_answers_sent_after(flipped)
    load.check(flipped, serving="1")
    assert serving(client) == ("1", ["1"])
    assert len(cluster.children()) == 2
    stats = client.get("/v2/stats").json()["model"]
    assert (stats["loads"], stats["rollbacks"], stats["loaded_versions"]) == (2, 2, 1)
    metrics = client.get("/metrics").text
    assert "flexemr_model_serving_version 1.0" in metrics


def reference_with(updates: list[dict[str, np.ndarray]], seed: int = SEEDS["1"]) -> list[np.ndarray]:
    """The monolithic scores of `BATCHES` by the preset of `seed` (version 1's) once `updates` are
    written, in order."""
    model = build_monolithic(load_weights(ModelSource(preset="tiny", seed=seed)))
    with torch.no_grad():
        for update in updates:
            for table, row, values in zip(update["table"], update["row"], update["values"], strict=True):
                model.emb_l[int(table)].weight[int(row)] = torch.from_numpy(values)
    return [reference_scores(model, *b) for b in BATCHES]


def scores_now(client: httpx.Client) -> list[np.ndarray]:
    out = [client.post("/v2/models/dlrm/infer", json=infer_body(*b)).json() for b in BATCHES]
    return [np.array(o["outputs"][0]["data"], dtype=np.float32) for o in out]


def rows_of(seed: int, n: int = 12) -> dict[str, np.ndarray]:
    """New values for `n` rows the batches read (tables 0 and 1)."""
    rng = np.random.default_rng(seed)
    _, indices, lengths = BATCHES[0]
    table0 = indices[: lengths.reshape(SPEC.num_tables, -1)[0].sum()]
    rows = np.concatenate([table0[: n // 2], rng.integers(0, SPEC.table_rows[1], n - n // 2)])
    tables = np.repeat([0, 1], [n // 2, n - n // 2])
    return {"table": tables.astype(np.int64), "row": rows.astype(np.int64),
            "values": rng.standard_normal((n, SPEC.dim)).astype(np.float32)}  # fmt: skip


def npz(arrays: dict[str, Any]) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


def push(client: httpx.Client, body: bytes, query: str = "", **headers: str) -> httpx.Response:
    return client.post(f"/v2/models/dlrm/updates{query}", content=body, headers={**ADMIN, **headers})


def test_pushed_updates_are_served_exactly_and_bad_ones_change_nothing(client: httpx.Client) -> None:
    assert serving(client) == ("1", ["1"])
    first = rows_of(11)
    assert client.post("/v2/models/dlrm/updates", content=npz(first)).status_code == 401
    bad_row = {**first, "row": first["row"] + SPEC.table_rows[0] * 100}
    nan = {**first, "values": np.full_like(first["values"], np.nan)}
    cases = [
        (npz(bad_row), 400, "row"),
        (npz(nan), 400, "finite"),
        (npz({"table": first["table"], "row": first["row"]}), 400, "values"),
        (b"PK\x03\x04 not a zip", 400, "body"),
        (b"{}", 400, "inputs"),
        (b"x" * (2 * 2**20), 413, "exceeds"),
    ]
    for body, status, named in cases:
        response = push(client, body)
        assert response.status_code == status and named in response.json()["error"], response.text
    assert push(client, npz(first), "?sequence=-1").status_code == 400
    for got, want in zip(scores_now(client), reference_with([]), strict=True):
        np.testing.assert_allclose(got, want, atol=1e-5)  # nothing changed

    # As an npz, then as KServe binary tensors; a repeated (source, sequence) is not applied again.
    done = push(client, npz(first), "?source=trainer&sequence=1")
    assert done.status_code == 200, done.text
    assert done.json()["model_version"] == "1" and done.json()["rows"] == 12
    second = rows_of(12)
    header = {"inputs": [
        {"name": name, "datatype": dtype, "shape": list(second[name].shape),
         "parameters": {"binary_data_size": second[name].nbytes}}
        for name, dtype in (("table", "INT64"), ("row", "INT64"), ("values", "FP32"))
    ]}  # fmt: skip
    head = json.dumps(header).encode()
    body = head + b"".join(second[name].tobytes() for name in ("table", "row", "values"))
    binary = {"Inference-Header-Content-Length": str(len(head))}
    again = push(client, body, "?source=trainer&sequence=2", **binary)
    assert again.status_code == 200 and again.json()["version"] > done.json()["version"], again.text
    repeat = push(client, npz(rows_of(13)), "?source=trainer&sequence=2")  # other values, same sequence
    assert repeat.status_code == 200, repeat.text
    for got, want in zip(scores_now(client), reference_with([first, second]), strict=True):
        np.testing.assert_allclose(got, want, atol=1e-5)
    metrics = client.get("/metrics").text
    assert "flexemr_updates_rows_total 36.0" in metrics and "flexemr_update_lag_seconds_count 3.0" in metrics
