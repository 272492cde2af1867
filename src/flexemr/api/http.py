"""The ranker's HTTP front end: KServe v2 / Open Inference Protocol.

Requests enter through the process's front door (`flexemr.api.front_door`), which admits, decides
the deadline and version, and names what went wrong; this module decodes, encodes and maps each
error kind to its status (`STATUS`): 400 for bad input, 413 for a body over the limit (chunked too,
refused as soon as it passes), 429 with Retry-After when admission refuses, 504 when the request's
deadline (`Flexemr-Timeout-Ms` header, or the configured default) passed before its work started,
503 for a lookup that cannot complete (nothing is scored from partial rows), and a logged 500 for
anything else. The infer route is served outside FastAPI's middleware and routing (the hot path);
scoring runs in a worker thread so requests overlap; health, metadata and stats run on the event
loop, so inference never delays them.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Receive, Scope, Send

from flexemr.api.admin import admin_routes
from flexemr.api.bodies import BodyTooLarge, read_body
from flexemr.api.front_door import MIN_ROW_VERSION, ErrorKind, FrontDoor, Rejected, min_row_version_of
from flexemr.api.http_protocol import BodyReader, ClientGone
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
from flexemr.ranker.admission import Dropped, Ticket
from flexemr.ranker.range_stats import gather_range_counts

log = logging.getLogger(__name__)

TIMEOUT_HEADER = "flexemr-timeout-ms"
MAX_TIMEOUT_MS = 3_600_000
JSON_EXPANSION = 16
"""JSON bodies may be this much smaller than binary ones: orjson makes each number a Python object."""
INFER_PATH = re.compile(r"/v2/models/([^/]+)(?:/versions/([^/]+))?/infer")

STATUS = {
    ErrorKind.INVALID_INPUT: 400,
    ErrorKind.UNKNOWN_MODEL: 400,
    ErrorKind.TOO_LARGE: 413,
    ErrorKind.REFUSED: 429,
    ErrorKind.DISCONNECTED: 499,  # nobody reads it
    ErrorKind.SERVER_UNAVAILABLE: 503,
    ErrorKind.LOOKUP_FAILED: 503,
    ErrorKind.DEADLINE: 504,
}
"""HTTP status of each kind of failed inference; any other is a 500."""


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


_REFUSED_BODY = b'{"error":"the ranker is full or behind; retry later"}'
REFUSED_AT_ONCE = (
    b"HTTP/1.1 429 Too Many Requests\r\ncontent-type: application/json\r\nretry-after: 1\r\n"
    b"content-length: %d\r\n\r\n" % len(_REFUSED_BODY)
) + _REFUSED_BODY
"""The 429 of a request refused from its headers, encoded once: a refusal is one write."""


@dataclass(frozen=True)
class HttpApp:
    asgi: ASGIApp
    is_infer: Callable[[str], bool]
    """Whether a path is the infer route."""
    refusal: Callable[[float], bytes | None]
    """`REFUSED_AT_ONCE` for an infer request whose headers were just read, after it waited the
    given seconds, when the process is full or it waited too long (counted as refused), else None:
    the protocol answers with it before reading the body."""


def create_app(door: FrontDoor, workers: Executor) -> HttpApp:
    """The KServe v2 HTTP app: the infer route served directly, every other route by FastAPI;
    inference is scored on `workers` (one thread hop per request)."""
    models, model_name, config = door.models, door.model_name, door.config
    inputs = model_inputs(models.ranker.spec)  # every version takes the same inputs
    app = FastAPI(title="flexemr", description="DLRM serving over the KServe v2 protocol")

    @app.exception_handler(StarletteHTTPException)
    def no_such_endpoint(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        # KServe's error shape ({"error": ...}), which tritonclient reads, instead of FastAPI's.
        return _error(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}")

    metrics = RequestMetrics(door.stats)
    app.include_router(admin_routes(door))
    app.include_router(update_routes(door, metrics.registry))

    def failure(exc: BaseException) -> JSONResponse:
        failed = door.failure(exc)
        status = STATUS.get(failed.kind, 500)
        metrics.requests.labels(str(status)).inc()
        metrics.errors.labels(failed.kind).inc()
        response = _error(status, failed.message)
        if failed.kind is ErrorKind.REFUSED:
            response.headers["retry-after"] = "1"
        return response

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
        try:
            door.check_model(name, version)
        except Rejected as exc:
            return failure(exc)
        return None

    @app.get("/v2/models/{name}", response_model=None)
    @app.get("/v2/models/{name}/versions/{version}", response_model=None)
    async def get_model_metadata(name: str, version: str = "") -> JSONResponse | dict[str, Any]:
        return unknown(name, version) or model_metadata(
            models.ranker.spec, model_name, config.max_batch, models.names(), models.serving.name
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
        return door.stats()

    @app.get("/v2/stats/ranges", response_model=None)
    async def range_stats() -> JSONResponse | dict[str, Any]:
        """Rows looked up per row range, from every embedding server (`flexemr plan --from-stats`)."""
        try:
            return await asyncio.to_thread(gather_range_counts, models.ranker)
        except ValueError as exc:  # no embedding servers (a local tier)
            return JSONResponse({"error": str(exc)}, status_code=404)

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    async def infer(request: Request, name: str, version: str) -> Response:
        limit = config.max_body_bytes
        json_limit = limit // JSON_EXPANSION
        json_error = (
            f"the JSON part of a request may be at most {json_limit} bytes (1/{JSON_EXPANSION} of the body "
            "limit: parsed JSON numbers take about that many times their text); send binary tensors"
        )
        declared = request.headers.get("content-length")
        header_length = request.headers.get(HEADER_LENGTH)
        watcher: asyncio.Task[None] | None = None
        reader: BodyReader | None = request.scope.get("extensions", {}).get("flexemr.body")
        try:
            door.check_model(name, version)
            if declared is not None and parse_decimal(declared, "header Content-Length") > limit:
                raise Rejected(ErrorKind.TOO_LARGE, f"request body of {declared} bytes exceeds {limit}")
            if header_length is None and reader is not None and reader.length > json_limit:
                raise Rejected(ErrorKind.TOO_LARGE, json_error)
            if (
                header_length is not None
                and parse_decimal(header_length, "header Inference-Header-Content-Length") > json_limit
            ):
                raise Rejected(ErrorKind.TOO_LARGE, json_error)
            timeout_s = request_timeout(request.headers.get(TIMEOUT_HEADER), config.deadline_s)
            min_row_version = min_row_version_of(request.headers.get(MIN_ROW_VERSION))
            with door.request(timeout_s) as ticket:
                body: bytearray | memoryview
                try:
                    if reader is not None:  # one buffer of the declared length (`api.http_protocol`)
                        body = await reader.read()
                    else:
                        body = await read_body(request, limit if header_length is not None else json_limit)
                except BodyTooLarge:
                    message = (
                        f"request body exceeds {limit} bytes" if header_length is not None else json_error
                    )
                    raise Rejected(ErrorKind.TOO_LARGE, message) from None
                except (ClientDisconnect, ClientGone):
                    raise Dropped("disconnected", "the client disconnected") from None
                watcher = asyncio.create_task(watch_disconnect(request, ticket))
                with metrics.latency.time():
                    loop = asyncio.get_running_loop()
                    response = await loop.run_in_executor(
                        workers, score, ticket, version, body, header_length, min_row_version
                    )
        except Exception as exc:  # every failure gets its status; internal ones are logged
            return failure(exc)
        finally:
            if watcher is not None:
                watcher.cancel()
        metrics.requests.labels("200").inc()
        return response

    def score(
        ticket: Ticket,
        version: str,
        body: bytearray | memoryview,
        header_length: str | None,
        min_row_version: int | None,
    ) -> Response:
        # Binary tensors are views of `body`: it lives (unresized) until they are scored.
        scored = door.score(
            ticket, version, lambda: parse_infer_request(body, header_length, inputs), min_row_version
        )
        metrics.batch_size.observe(scored.scores.shape[0])
        content, headers = encode_infer_response(
            model_name,
            scored.request.id,
            "scores",
            scored.scores,
            scored.request.binary_output,
            scored.version,
        )
        return Response(content, headers=headers)

    refused_requests = metrics.requests.labels(str(STATUS[ErrorKind.REFUSED]))
    refused_errors = metrics.errors.labels(ErrorKind.REFUSED)

    def refusal(waited_s: float) -> bytes | None:
        if door.refusal(waited_s) is None:
            return None
        refused_requests.inc()
        refused_errors.inc()
        return REFUSED_AT_ONCE

    async def serve(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST":
            route = INFER_PATH.fullmatch(scope["path"])
            if route is not None:
                response = await infer(Request(scope, receive), route[1], route[2] or "")
                await response(scope, receive, send)
                return
        await app(scope, receive, send)

    return HttpApp(serve, lambda path: INFER_PATH.fullmatch(path) is not None, refusal)
