"""The ranker's HTTP front end: KServe v2 / Open Inference Protocol.

Requests enter through the process's front door (`flexemr.api.front_door`), which admits, decides
the deadline and version, and names what went wrong; this module decodes, encodes and maps each
error kind to its status (`STATUS`): 400 for bad input, 413 for a body over the limit (chunked too,
refused as soon as it passes), 429 with Retry-After when admission refuses, 504 when the request's
deadline (`Flexemr-Timeout-Ms` header, or the configured default) passed before its work started,
503 for a lookup that cannot complete (nothing is scored from partial rows), and a logged 500 for
anything else. The infer route (`InferRoute`) is served by the HTTP protocol itself, outside the
ASGI app (`flexemr.api.http_protocol`; the app serves it only for chunked bodies and under h11);
scoring runs in a worker thread so requests overlap; health, metadata and stats run on the event
loop, so inference never delays them.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import re
from collections.abc import Mapping
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Any

import orjson
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Receive, Scope, Send

from flexemr.api.admin import admin_routes
from flexemr.api.bodies import BodyTooLarge, read_body
from flexemr.api.front_door import MIN_ROW_VERSION, ErrorKind, FrontDoor, Rejected, min_row_version_of
from flexemr.api.http_protocol import Answer, ClientGone
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


def _response(answer: Answer) -> Response:
    headers = {name.decode("latin-1"): value.decode("latin-1") for name, value in answer.headers}
    return Response(answer.body, status_code=answer.status, headers=headers)


@dataclass(frozen=True)
class InferHead:
    """What an infer request's headers ask for, checked."""

    timeout_s: float
    min_row_version: int | None
    header_length: str | None
    """Its Inference-Header-Content-Length (None: a JSON body)."""
    body_limit: int
    """The most body bytes it may send (binary or JSON), and what a body over it is told."""
    too_large: str


REFUSED_AT_ONCE = Answer(
    429,
    b'{"error":"the ranker is full or behind; retry later"}',
    ((b"content-type", b"application/json"), (b"retry-after", b"1")),
)
"""The 429 of a request refused from its headers, built once: a refusal is one write."""


class InferRoute:
    """The infer route, whichever way a request comes in: the protocol's direct path
    (`flexemr.api.http_protocol`: httptools, a body with a Content-Length) or the ASGI app (h11, a
    chunked body). Checks headers, scores through the front door, answers every error kind with
    its status (`STATUS`)."""

    def __init__(self, door: FrontDoor, metrics: RequestMetrics) -> None:
        self.door = door
        self.metrics = metrics
        self.inputs = model_inputs(door.models.ranker.spec)  # every version takes the same inputs
        self._ok = metrics.requests.labels("200")
        self._refused = metrics.requests.labels(str(STATUS[ErrorKind.REFUSED]))
        self._refused_kind = metrics.errors.labels(ErrorKind.REFUSED)

    def match(self, path: str) -> tuple[str, str] | None:
        route = INFER_PATH.fullmatch(path)
        return None if route is None else (route[1], route[2] or "")

    def check(self, name: str, version: str, headers: Mapping[str, str]) -> InferHead:
        """The request's deadline, versions and body limit, or `Rejected` / `InvalidRequest`."""
        config = self.door.config
        limit = config.max_body_bytes
        json_limit = limit // JSON_EXPANSION
        json_error = (
            f"the JSON part of a request may be at most {json_limit} bytes (1/{JSON_EXPANSION} of the body "
            "limit: parsed JSON numbers take about that many times their text); send binary tensors"
        )
        self.door.check_model(name, version)
        declared = headers.get("content-length")
        size = None if declared is None else parse_decimal(declared, "header Content-Length")
        if size is not None and size > limit:
            raise Rejected(ErrorKind.TOO_LARGE, f"request body of {declared} bytes exceeds {limit}")
        header_length = headers.get(HEADER_LENGTH)
        if header_length is None and size is not None and size > json_limit:
            raise Rejected(ErrorKind.TOO_LARGE, json_error)
        if (
            header_length is not None
            and parse_decimal(header_length, "header Inference-Header-Content-Length") > json_limit
        ):
            raise Rejected(ErrorKind.TOO_LARGE, json_error)
        return InferHead(
            request_timeout(headers.get(TIMEOUT_HEADER), config.deadline_s),
            min_row_version_of(headers.get(MIN_ROW_VERSION)),
            header_length,
            limit if header_length is not None else json_limit,
            f"request body exceeds {limit} bytes" if header_length is not None else json_error,
        )

    def refusal(self, waited_s: float) -> Answer | None:
        if self.door.refusal(waited_s) is None:
            return None
        self._refused.inc()
        self._refused_kind.inc()
        return REFUSED_AT_ONCE

    def start(self, name: str, version: str, headers: Mapping[str, str]) -> DirectCall | Answer:
        """A request of the direct path, checked and admitted, or its answer."""
        admitted = contextlib.ExitStack()
        try:
            head = self.check(name, version, headers)
            ticket = admitted.enter_context(self.door.request(head.timeout_s))
        except Exception as exc:
            return self.failure(exc)
        return DirectCall(self, version, head, ticket, admitted)

    def score(self, ticket: Ticket, version: str, head: InferHead, body: bytearray | memoryview) -> Answer:
        """Decode and score a body in one turn (call it in a worker thread); binary tensors are
        views of `body`: it lives (unresized) until they are scored."""
        with self.metrics.latency.time():
            decode = functools.partial(parse_infer_request, body, head.header_length, self.inputs)
            scored = self.door.score(ticket, version, decode, head.min_row_version)
            content, headers = encode_infer_response(
                self.door.model_name,
                scored.request.id,
                "scores",
                scored.scores,
                scored.request.binary_output,
                scored.version,
            )
        self.metrics.batch_size.observe(scored.scores.shape[0])
        self._ok.inc()
        return Answer(200, content, tuple((name.encode(), value.encode()) for name, value in headers.items()))

    def failure(self, exc: BaseException) -> Answer:
        """The answer to a failed request: its kind's status and a KServe error ({"error": ...})."""
        if isinstance(exc, ClientGone):
            exc = Dropped("disconnected", "the client disconnected")
        failed = self.door.failure(exc)
        status = STATUS.get(failed.kind, 500)
        self.metrics.requests.labels(str(status)).inc()
        self.metrics.errors.labels(failed.kind).inc()
        headers: tuple[tuple[bytes, bytes], ...] = ((b"content-type", b"application/json"),)
        if failed.kind is ErrorKind.REFUSED:
            headers += ((b"retry-after", b"1"),)
        return Answer(status, orjson.dumps({"error": failed.message}), headers)


@dataclass
class DirectCall:
    """An admitted request of the direct path (`flexemr.api.http_protocol.InferCall`)."""

    route: InferRoute
    version: str
    head: InferHead
    ticket: Ticket
    admitted: contextlib.ExitStack
    """Holds its place in the front door until it is answered."""

    def score(self, body: memoryview) -> Answer:
        return self.route.score(self.ticket, self.version, self.head, body)

    def failed(self, exc: BaseException) -> Answer:
        return self.route.failure(exc)

    def client_gone(self) -> None:
        self.ticket.client_gone()

    def close(self) -> None:
        self.admitted.close()


@dataclass(frozen=True)
class HttpApp:
    asgi: ASGIApp
    route: InferRoute
    """The infer route, which the protocol serves directly (`flexemr.api.http_protocol`)."""


def create_app(door: FrontDoor, workers: Executor) -> HttpApp:
    """The KServe v2 HTTP app: the infer route (`InferRoute`) outside FastAPI's routing, every other
    route by FastAPI; inference is scored on `workers` (one thread hop per request)."""
    models, model_name, config = door.models, door.model_name, door.config
    app = FastAPI(title="flexemr", description="DLRM serving over the KServe v2 protocol")

    @app.exception_handler(StarletteHTTPException)
    def no_such_endpoint(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        # KServe's error shape ({"error": ...}), which tritonclient reads, instead of FastAPI's.
        return _error(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}")

    metrics = RequestMetrics(door.stats)
    route = InferRoute(door, metrics)
    app.include_router(admin_routes(door))
    app.include_router(update_routes(door, metrics.registry))

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

    def unknown(name: str, version: str) -> Response | None:
        try:
            door.check_model(name, version)
        except Rejected as exc:
            return _response(route.failure(exc))
        return None

    @app.get("/v2/models/{name}", response_model=None)
    @app.get("/v2/models/{name}/versions/{version}", response_model=None)
    async def get_model_metadata(name: str, version: str = "") -> Response | dict[str, Any]:
        return unknown(name, version) or model_metadata(
            models.ranker.spec, model_name, config.max_batch, models.names(), models.serving.name
        )

    @app.get("/v2/models/{name}/ready", response_model=None)
    @app.get("/v2/models/{name}/versions/{version}/ready", response_model=None)
    async def model_ready(name: str, version: str = "") -> Response | dict[str, Any]:
        return unknown(name, version) or await ready()

    @app.get("/v2/models/{name}/config", response_model=None)
    @app.get("/v2/models/{name}/versions/{version}/config", response_model=None)
    async def get_model_config(name: str, version: str = "") -> Response | dict[str, Any]:
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
        """An infer request the protocol does not serve directly (h11, or a chunked body)."""
        watcher: asyncio.Task[None] | None = None
        try:
            head = route.check(name, version, request.headers)
            with door.request(head.timeout_s) as ticket:
                try:
                    body = await read_body(request, head.body_limit)
                except BodyTooLarge:
                    raise Rejected(ErrorKind.TOO_LARGE, head.too_large) from None
                except ClientDisconnect:
                    raise Dropped("disconnected", "the client disconnected") from None
                watcher = asyncio.create_task(watch_disconnect(request, ticket))
                loop = asyncio.get_running_loop()
                answer = await loop.run_in_executor(workers, route.score, ticket, version, head, body)
        except Exception as exc:  # every failure gets its status; internal ones are logged
            answer = route.failure(exc)
        finally:
            if watcher is not None:
                watcher.cancel()
        return _response(answer)

    async def serve(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST":
            matched = route.match(scope["path"])
            if matched is not None:
                response = await infer(Request(scope, receive), *matched)
                await response(scope, receive, send)
                return
        await app(scope, receive, send)

    return HttpApp(serve, route)
