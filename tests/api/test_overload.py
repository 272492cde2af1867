"""Admission, deadlines and body limits on a real `flexemr serve` (servers and ranker in their own
processes).

The ranker batches with a long window (3 s) and admits 64 samples: two requests of 24 samples are
admitted and then wait for their batch to fill (it never does: a third would pass the bound), which
holds them in flight long enough for the tests to offer more. Outcomes are asserted (status codes,
counters), never durations.
"""

from __future__ import annotations

import select
import socket
import threading
from collections.abc import Iterator
from typing import Any

import httpx
import numpy as np
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


@pytest.fixture(scope="module")
def cluster() -> Iterator[ServeProcess]:
    server = start_serve(
        "--preset", "tiny", "--seed", "3", "--embedding-servers", "2", "--max-batch", "64",
        "--max-in-flight", "64", "--batch-window-ms", "3000", "--max-body", "1MiB",
    )  # fmt: skip
    yield server
    server.stop()
    assert not any("Traceback" in line for line in server.output), "".join(server.output[-40:])


def admission_stats(url: str) -> dict[str, Any]:
    stats: dict[str, Any] = httpx.get(f"{url}/v2/stats", timeout=30).json()
    return {**stats["admission"], "samples": stats["samples"]}


def test_three_times_the_admitted_load_is_refused_while_admitted_requests_score_right(
    cluster: ServeProcess,
) -> None:
    before = admission_stats(cluster.url)
    batches = [random_batch(SPEC, 24, seed=100 + i) for i in range(6)]  # 3 x the 2 admitted
    results: list[tuple[int, Any, dict[str, str]] | None] = [None] * 6
    order: list[int] = []
    start = threading.Barrier(6)

    def offer(i: int) -> None:
        with httpx.Client(base_url=cluster.url, timeout=60) as client:
            start.wait()
            response = client.post(URL, json=infer_body(*batches[i]))
            results[i] = (response.status_code, response.json(), dict(response.headers))
            order.append(i)

    threads = [threading.Thread(target=offer, args=(i,)) for i in range(6)]
    for thread in threads:
        thread.start()
    with httpx.Client(base_url=cluster.url, timeout=30) as probe:
        live = [probe.get("/v2/health/live").status_code for _ in range(10)]
    for thread in threads:
        thread.join(120)
    assert live == [200] * 10
    assert all(r is not None for r in results)
    statuses = sorted(r[0] for r in results if r is not None)
    assert statuses == [200, 200, 429, 429, 429, 429], [r[1] for r in results if r is not None]
    model = build_monolithic(load_weights(SOURCE))
    for i, result in enumerate(results):
        assert result is not None
        status, body, headers = result
        if status == 429:
            assert headers["retry-after"] == "1" and "retry later" in body["error"]
        else:
            np.testing.assert_allclose(
                body["outputs"][0]["data"], reference_scores(model, *batches[i]), atol=1e-5
            )
    assert set(order[:4]) == {i for i, r in enumerate(results) if r and r[0] == 429}  # refused at once
    after = admission_stats(cluster.url)
    assert after["refused_requests"] - before["refused_requests"] == 4
    assert after["admitted_requests"] - before["admitted_requests"] == 2
    assert after["samples"] - before["samples"] == 48
    assert after["samples_in_flight"] == 0 and after["requests_being_read"] == 0


def test_a_request_whose_deadline_passes_in_the_batch_queue_is_dropped_not_computed(
    cluster: ServeProcess,
) -> None:
    before = admission_stats(cluster.url)
    body = infer_body(*random_batch(SPEC, 8, seed=7))
    response = httpx.post(cluster.url + URL, json=body, headers={"Flexemr-Timeout-Ms": "300"}, timeout=60)
    assert response.status_code == 504, response.text
    assert "deadline of 300 ms passed" in response.json()["error"]
    after = admission_stats(cluster.url)
    assert after["dropped_deadline_requests"] - before["dropped_deadline_requests"] == 1
    assert after["samples"] == before["samples"]  # nothing was scored
    bad = httpx.post(cluster.url + URL, json=body, headers={"Flexemr-Timeout-Ms": "soon"}, timeout=60)
    assert bad.status_code == 400 and "Flexemr-Timeout-Ms" in bad.json()["error"]


def test_work_of_a_client_that_left_is_dropped_not_computed(cluster: ServeProcess) -> None:
    before = admission_stats(cluster.url)
    host, port = httpx.URL(cluster.url).host, httpx.URL(cluster.url).port
    body = httpx.Request("POST", cluster.url + URL, json=infer_body(*random_batch(SPEC, 8, seed=8)))
    head = f"POST {URL} HTTP/1.1\r\nHost: {host}\r\nContent-Length: {len(body.read())}\r\n\r\n"
    with socket.create_connection((host, port)) as sock:  # gone while its batch window is open
        sock.sendall(head.encode() + body.read())
    while (after := admission_stats(cluster.url))["dropped_disconnected_requests"] == before[
        "dropped_disconnected_requests"
    ]:
        threading.Event().wait(0.1)  # waits for the window to close; the test's timeout bounds it
    assert after["samples"] == before["samples"]


def test_a_chunked_body_over_the_limit_is_refused_before_it_ends(cluster: ServeProcess) -> None:
    host, port = httpx.URL(cluster.url).host, httpx.URL(cluster.url).port
    chunk = b"1" * 65536
    answer = b""
    with socket.create_connection((host, port)) as sock:
        sock.sendall(f"POST {URL} HTTP/1.1\r\nHost: {host}\r\nTransfer-Encoding: chunked\r\n\r\n".encode())
        for _ in range(64):  # 4 MiB, never terminated: only a server that stops reading can answer
            sock.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            if select.select([sock], [], [], 0.05)[0]:
                break
        sock.settimeout(60)
        while b"\r\n\r\n" not in answer and (part := sock.recv(65536)):
            answer += part
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
    with httpx.Client(base_url=cluster.url, timeout=60) as client:
        assert client.get("/v2/health/live").status_code == 200
        response = client.post(URL, json=infer_body(*random_batch(SPEC, 2, seed=9)))
        assert response.status_code == 200, response.text


def test_a_request_arriving_while_the_ranker_is_full_is_refused_from_its_headers(
    cluster: ServeProcess,
) -> None:
    """Requests of one sample wait in the batch window until as many are in flight as the latency
    limit allows; one more is answered 429 though its body never comes (a server that waited for
    it would never answer: the probe gives up after 10 s and tries again with a fresh window)."""
    host, port = httpx.URL(cluster.url).host, httpx.URL(cluster.url).port
    before = admission_stats(cluster.url)
    holders: list[threading.Thread] = []

    def hold(seed: int) -> None:
        with httpx.Client(base_url=cluster.url, timeout=60) as client:
            client.post(URL, json=infer_body(*random_batch(SPEC, 1, seed=seed)))

    def probe() -> bytes:
        with socket.create_connection((host, port)) as sock:
            sock.sendall(f"POST {URL} HTTP/1.1\r\nHost: {host}\r\nContent-Length: 900000\r\n\r\n".encode())
            sock.settimeout(10)
            answer = b""
            try:
                while b"retry later" not in answer and (part := sock.recv(65536)):
                    answer += part
            except TimeoutError:
                pass
            return answer

    answer = b""
    for _ in range(5):
        while (now := admission_stats(cluster.url))["requests_in_flight"] < now["requests_limit"]:
            missing = now["requests_limit"] - sum(h.is_alive() for h in holders)
            for _ in range(max(missing, 0)):
                holders.append(threading.Thread(target=hold, args=(200 + len(holders),)))
                holders[-1].start()
            threading.Event().wait(0.01)
        if (answer := probe()).startswith(b"HTTP/1.1 429"):
            break
    assert answer.startswith(b"HTTP/1.1 429"), answer[:200]
    assert b"retry-after: 1" in answer.lower()
    for holder in holders:
        holder.join(120)
    after = admission_stats(cluster.url)
    assert after["refused_requests"] > before["refused_requests"]
    assert after["requests_in_flight"] == 0 and after["samples_in_flight"] == 0
