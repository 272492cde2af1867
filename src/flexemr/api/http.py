"""The ranker's HTTP front end: KServe v2 / Open Inference Protocol.

Client mistakes get 400 with a message naming the field and value; a lookup that cannot complete
gets 503 (the request fails, nothing is scored from partial rows); anything else is a 500 that is
logged with its traceback. Scoring runs in the thread pool so requests overlap.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from flexemr.api.kserve import (
    HEADER_LENGTH,
    encode_infer_response,
    model_config,
    model_inputs,
    model_metadata,
    parse_infer_request,
)
from flexemr.api.metrics import RequestMetrics
from flexemr.ranker.batch import InvalidRequest
from flexemr.ranker.batcher import Overloaded
from flexemr.ranker.ranker import Ranker
from flexemr.transport.base import LookupFailed, ServerUnavailable

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 256 * 2**20


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


def create_app(ranker: Ranker, model_name: str) -> FastAPI:
    spec = ranker.spec
    inputs = model_inputs(spec)
    app = FastAPI(title="flexemr", description="DLRM serving over the KServe v2 protocol")

    @app.exception_handler(StarletteHTTPException)
    def no_such_endpoint(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        # KServe's error shape ({"error": ...}), which tritonclient reads, instead of FastAPI's.
        return _error(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}")

    metrics = RequestMetrics(ranker)

    def failure(status: int, kind: str, message: str) -> JSONResponse:
        metrics.requests.labels(str(status)).inc()
        metrics.errors.labels(kind).inc()
        return _error(status, message)

    @app.get("/v2")
    def server_metadata() -> dict[str, Any]:
        return {"name": "flexemr", "version": "0.1.0", "extensions": ["binary_tensor_data"]}

    @app.get("/v2/health/live")
    def live() -> dict[str, bool]:
        return {"live": True}

    @app.get("/v2/health/ready", response_model=None)
    def ready() -> JSONResponse | dict[str, bool]:
        if ranker.ready():
            return {"ready": True}
        down = [i for i, up in enumerate(ranker.transport.connected()) if not up]
        return _error(503, f"embedding server(s) {down} not connected")

    def unknown(name: str, version: str) -> JSONResponse | None:
        if name != model_name:
            return failure(400, "unknown_model", f"unknown model {name!r}; this server serves {model_name!r}")
        if version not in ("", "1"):
            return failure(400, "unknown_model", f"model {name!r} has version '1' only, not {version!r}")
        return None

    @app.get("/v2/models/{name}", response_model=None)
    @app.get("/v2/models/{name}/versions/{version}", response_model=None)
    def get_model_metadata(name: str, version: str = "") -> JSONResponse | dict[str, Any]:
        return unknown(name, version) or model_metadata(spec, model_name, ranker.config.max_batch)

    @app.get("/v2/models/{name}/ready", response_model=None)
    @app.get("/v2/models/{name}/versions/{version}/ready", response_model=None)
    def model_ready(name: str, version: str = "") -> JSONResponse | dict[str, Any]:
        return unknown(name, version) or ready()

    @app.get("/v2/models/{name}/config", response_model=None)
    @app.get("/v2/models/{name}/versions/{version}/config", response_model=None)
    def get_model_config(name: str, version: str = "") -> JSONResponse | dict[str, Any]:
        return unknown(name, version) or model_config(spec, model_name)

    @app.post("/v2/repository/index")
    def repository_index() -> list[dict[str, str]]:
        state = "READY" if ranker.ready() else "UNAVAILABLE"
        return [{"name": model_name, "version": "1", "state": state}]

    @app.get("/v2/stats")
    def stats() -> dict[str, Any]:
        return ranker.stats()

    @app.get("/metrics")
    def prometheus() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.post("/v2/models/{name}/infer")
    async def infer(name: str, request: Request) -> Response:
        if name != model_name:
            return failure(400, "unknown_model", f"unknown model {name!r}; this server serves {model_name!r}")
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > MAX_BODY_BYTES:
            return failure(413, "too_large", f"request body of {declared} bytes exceeds {MAX_BODY_BYTES}")
        body = await request.body()
        try:
            with metrics.latency.time():
                response = await run_in_threadpool(_infer, body, request.headers.get(HEADER_LENGTH))
        except InvalidRequest as exc:
            return failure(400, "invalid_input", str(exc))
        except Overloaded as exc:
            return failure(503, "overloaded", str(exc))
        except ServerUnavailable as exc:
            return failure(503, "server_unavailable", f"lookup failed, nothing was scored: {exc}")
        except LookupFailed as exc:
            return failure(503, "lookup_failed", f"lookup failed, nothing was scored: {exc}")
        except Exception:
            log.exception("inference failed")
            return failure(500, "internal", "internal error; see the ranker's log")
        metrics.requests.labels("200").inc()
        return response

    def _infer(body: bytes, header_length: str | None) -> Response:
        with ranker.turns.turn():
            parsed = parse_infer_request(body, header_length, inputs)
            dense = parsed.tensors["dense_features"]
            scores = ranker.score(dense, parsed.tensors["sparse_indices"], parsed.tensors["sparse_lengths"])
            metrics.batch_size.observe(dense.shape[0])
            content, headers = encode_infer_response(
                model_name, parsed.id, "scores", scores, parsed.binary_output
            )
        return Response(content, headers=headers)

    return app
