"""The ranker's HTTP front end: KServe v2 / Open Inference Protocol.

Client mistakes get a 4xx with a message naming the field and value, and are not logged: 400 for
bad input, 413 for a body over the limit (chunked too, refused as soon as it passes), 429 with
Retry-After when admission refuses (`flexemr.ranker.admission`), 504 when the request's deadline
(`Flexemr-Timeout-Ms` header, or the configured default) passed before its work started. A lookup
that cannot complete gets 503 (nothing is scored from partial rows); anything else is a 500 logged
with its traceback. Scoring runs in the thread pool so requests overlap; health, metadata and stats
run on the event loop, so inference never delays them.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from flexemr.api.admin import admin_routes
from flexemr.api.bodies import BodyTooLarge, read_body
from flexemr.api.kserve import (
    HEADER_LENGTH,
    encode_infer_response,
    model_config,
    model_inputs,
    model_metadata,
    parse_decimal,
    parse_infer_request,
)
from flexemr.api.metrics import RequestMetrics
from flexemr.api.updates import update_routes
from flexemr.batch import InvalidRequest
from flexemr.logs import RateLimitedWarnings as RateLimitedWarnings  # re-exported for the launchers
from flexemr.ranker.admission import Dropped, Refused, Ticket
from flexemr.ranker.model_versions import ModelVersions, UnknownVersion
from flexemr.ranker.ranker import Ranker
from flexemr.transport.base import LookupFailed, ServerUnavailable

log = logging.getLogger(__name__)

TIMEOUT_HEADER = "flexemr-timeout-ms"
MAX_TIMEOUT_MS = 3_600_000
JSON_EXPANSION = 16
"""JSON bodies may be this much smaller than binary ones: orjson makes each number a Python object."""


async def watch_disconnect(request: Request, ticket: Ticket) -> None:
    """Mark the ticket when the client goes, so its work is dropped rather than computed.
    Runs once the body is read: uvicorn's next message is then the disconnect."""
    while (await request.receive())["type"] != "http.disconnect":
        pass
    ticket.client_gone()


def request_timeout(header: str | None, default_s: float) -> float:
    """The request's time budget in seconds: its Flexemr-Timeout-Ms header, or the default."""
    if header is None:
        return default_s
    ms = parse_decimal(header, "header Flexemr-Timeout-Ms")
    if not 0 < ms <= MAX_TIMEOUT_MS:
        raise InvalidRequest(
            f"header Flexemr-Timeout-Ms must be milliseconds in (0, {MAX_TIMEOUT_MS}], got {header!r}"
        )
    return ms / 1000


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


def create_app(models: ModelVersions, model_name: str) -> FastAPI:
    # Admission, turns and config are shared by every version; scoring, health, metadata are each one's.
    ranker = models.ranker
    spec = ranker.spec
    inputs = model_inputs(spec)
    app = FastAPI(title="flexemr", description="DLRM serving over the KServe v2 protocol")

    @app.exception_handler(StarletteHTTPException)
    def no_such_endpoint(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        # KServe's error shape ({"error": ...}), which tritonclient reads, instead of FastAPI's.
        return _error(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}")

    metrics = RequestMetrics(models.stats)
    app.include_router(admin_routes(models, model_name))
    app.include_router(update_routes(models, model_name, metrics.registry))

    def failure(status: int, kind: str, message: str) -> JSONResponse:
        metrics.requests.labels(str(status)).inc()
        metrics.errors.labels(kind).inc()
        return _error(status, message)

    @app.get("/v2")
    async def server_metadata() -> dict[str, Any]:
        return {"name": "flexemr", "version": "0.1.0", "extensions": ["binary_tensor_data"]}

    @app.get("/v2/health/live")
    async def live() -> dict[str, bool]:
        return {"live": True}

    @app.get("/v2/health/ready", response_model=None)
    async def ready() -> JSONResponse | dict[str, Any]:
        serving = models.ranker
        health = serving.replica_health()
        if serving.ready():  # with replicas, still ready (and degraded) while every row has one
            return {"ready": True, **health}
        return _error(
            503, f"embedding server(s) {health['servers_down']} not connected, and no replica covers them"
        )

    def unknown(name: str, version: str) -> JSONResponse | None:
        if name != model_name:
            return failure(400, "unknown_model", f"unknown model {name!r}; this server serves {model_name!r}")
        loaded = models.names()
        if version and version not in loaded:
            return failure(400, "unknown_model", f"model {name!r} has versions {loaded}, not {version!r}")
        return None

    @app.get("/v2/models/{name}", response_model=None)
    @app.get("/v2/models/{name}/versions/{version}", response_model=None)
    async def get_model_metadata(name: str, version: str = "") -> JSONResponse | dict[str, Any]:
        return unknown(name, version) or model_metadata(
            models.ranker.spec, model_name, ranker.config.max_batch, models.names(), models.serving.name
        )

    @app.get("/v2/models/{name}/ready", response_model=None)
    @app.get("/v2/models/{name}/versions/{version}/ready", response_model=None)
    async def model_ready(name: str, version: str = "") -> JSONResponse | dict[str, Any]:
        return unknown(name, version) or await ready()

    @app.get("/v2/models/{name}/config", response_model=None)
    @app.get("/v2/models/{name}/versions/{version}/config", response_model=None)
    async def get_model_config(name: str, version: str = "") -> JSONResponse | dict[str, Any]:
        return unknown(name, version) or model_config(models.ranker.spec, model_name)

    @app.post("/v2/repository/index")
    async def repository_index() -> list[dict[str, str]]:
        return models.index()

    @app.get("/v2/stats")
    async def stats() -> dict[str, Any]:
        return models.stats()

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.post("/v2/models/{name}/infer")
    @app.post("/v2/models/{name}/versions/{version}/infer")
    async def infer(name: str, request: Request, version: str = "") -> Response:
        refusal = unknown(name, version)
        if refusal is not None:
            return refusal
        try:
            with models.use(version) as chosen:  # requests in flight finish on the version they took
                return await infer_with(chosen.ranker, chosen.name, request)
        except UnknownVersion as exc:  # unloaded since `unknown` looked
            return failure(400, "unknown_model", str(exc))

    async def infer_with(scorer: Ranker, version: str, request: Request) -> Response:
        limit = ranker.config.max_body_bytes
        json_limit = limit // JSON_EXPANSION
        json_error = (
            f"the JSON part of a request may be at most {json_limit} bytes (1/{JSON_EXPANSION} of the body "
            "limit: parsed JSON numbers take about that many times their text); send binary tensors"
        )
        declared = request.headers.get("content-length")
        header_length = request.headers.get(HEADER_LENGTH)
        try:
            if declared is not None and parse_decimal(declared, "header Content-Length") > limit:
                return failure(413, "too_large", f"request body of {declared} bytes exceeds {limit}")
            if (
                header_length is not None
                and parse_decimal(header_length, "header Inference-Header-Content-Length") > json_limit
            ):
                return failure(413, "too_large", json_error)
            timeout_s = request_timeout(request.headers.get(TIMEOUT_HEADER), ranker.config.deadline_s)
            ticket = ranker.admission.arrive(timeout_s)
        except InvalidRequest as exc:
            return failure(400, "invalid_input", str(exc))
        except Refused as exc:
            return refused(exc)
        watcher: asyncio.Task[None] | None = None
        try:
            body = await read_body(request, limit if header_length is not None else json_limit)
            watcher = asyncio.create_task(watch_disconnect(request, ticket))
            with metrics.latency.time():
                response = await run_in_threadpool(_infer, scorer, version, body, header_length, ticket)
        except BodyTooLarge:
            message = f"request body exceeds {limit} bytes" if header_length is not None else json_error
            return failure(413, "too_large", message)
        except ClientDisconnect:
            ranker.admission.dropped(Dropped("disconnected", "the client disconnected"))
            return failure(499, "disconnected", "the client disconnected")  # nobody reads it
        except Exception as exc:  # every failure gets its status; internal ones are logged
            return error_response(exc)
        finally:
            if watcher is not None:
                watcher.cancel()
            ranker.admission.release(ticket)
        metrics.requests.labels("200").inc()
        return response

    def error_response(exc: Exception) -> JSONResponse:
        """The client's mistakes are 4xx and not logged; failed lookups 503; anything else a logged 500."""
        if isinstance(exc, InvalidRequest):
            return failure(400, "invalid_input", str(exc))
        if isinstance(exc, Refused):
            return refused(exc)
        if isinstance(exc, Dropped):
            ranker.admission.dropped(exc)
            if exc.reason == "deadline":
                return failure(504, "deadline", f"{exc}; nothing was computed")
            return failure(499, "disconnected", str(exc))
        if isinstance(exc, ServerUnavailable):
            return failure(503, "server_unavailable", f"lookup failed, nothing was scored: {exc}")
        if isinstance(exc, LookupFailed):
            return failure(503, "lookup_failed", f"lookup failed, nothing was scored: {exc}")
        log.error("inference failed", exc_info=exc)
        return failure(500, "internal", "internal error; see the ranker's log")

    def refused(exc: Refused) -> JSONResponse:
        response = failure(429, "refused", str(exc))
        response.headers["retry-after"] = "1"
        return response

    def _infer(
        scorer: Ranker, version: str, body: bytearray, header_length: str | None, ticket: Ticket
    ) -> Response:
        with ranker.turns.turn():
            ticket.check()  # the turn may have come late
            parsed = parse_infer_request(body, header_length, inputs)
            body.clear()  # parsed: the raw bytes are not needed while scoring
            dense = parsed.tensors["dense_features"]
            ranker.admission.admit(ticket, dense.shape[0])
            scores = scorer.score(
                dense, parsed.tensors["sparse_indices"], parsed.tensors["sparse_lengths"], ticket
            )
            metrics.batch_size.observe(dense.shape[0])
            content, headers = encode_infer_response(
                model_name, parsed.id, "scores", scores, parsed.binary_output, version
            )
        return Response(content, headers=headers)

    return app
