"""uvicorn's httptools protocol, with the infer route served by the protocol itself.

An infer request with a Content-Length (`POST /v2/models/<name>[/versions/<v>]/infer`) never
enters the ASGI app: no task, no middleware, no request or response objects, no asyncio future.

    headers (httptools)  ->  refused now? canned 429, body skipped      (`InferRoute.refusal`: the
                             process is full, or the request already waited too long to be read,
                             `flexemr.api.request_age`; with no request cycle built when nothing
                             earlier on the connection is unanswered, `refuse_at_once`)
    its turn comes       ->  checks, admission (`InferRoute.start`)    ->  400/413/429 answered
    body                 ->  one buffer of the declared length, filled as bytes arrive (`BodyReader`):
                             what follows the headers' read is received into it by the kernel itself
                             (`BodyReceiver`), with no copies
    worker thread        ->  decode (binary tensors are views of the buffer), score, encode (or 504, ...)
    one call_soon_threadsafe  ->  status line, headers and body written to the transport at once

Requests keep uvicorn's per-connection order: each is a `RequestResponseCycle` that uvicorn
starts, queues behind a pipelined predecessor, answers 400 for bad framing, closes on
`Connection: close` or shutdown, and marks disconnected; `_start_asgi_task` starts a direct one
instead of running an app. Every other request, and an infer request with a chunked body, goes to
the ASGI app as before.
"""

from __future__ import annotations

import asyncio
import urllib.parse
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Any, Protocol

import httptools
import numpy as np
from uvicorn.protocols.http.flow_control import FlowControl
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol, RequestResponseCycle
from uvicorn.protocols.utils import get_client_addr, get_path_with_query_string

from flexemr.api.request_age import waited_s

HIGH_WATER = 65536
"""Body bytes held before the request's turn comes (then reading pauses, as uvicorn's does)."""


@dataclass(frozen=True)
class Answer:
    """A response of the direct path: its status, headers (but Content-Length) and body."""

    status: int
    body: bytes
    headers: tuple[tuple[bytes, bytes], ...]


class InferCall(Protocol):
    """One admitted infer request (`flexemr.api.http`)."""

    def score(self, body: memoryview) -> Answer:
        """Decode and score the body; runs in a worker thread."""

    def failed(self, exc: BaseException) -> Answer:
        """The answer to whatever `score` (or the body's arrival) raised."""

    def client_gone(self) -> None:
        """The client closed its connection: drop the request's work."""

    def close(self) -> None:
        """The request is answered: free its place."""


class InferRoute(Protocol):
    """What the protocol needs of the infer route (`flexemr.api.http`)."""

    def match(self, path: str) -> tuple[str, str] | None:
        """The model name and version ("": any) of an infer path, or None."""

    def refusal(self, waited_s: float) -> Answer | None:
        """The 429 a request whose headers were just read, after it waited `waited_s` to be read,
        gets when the process is full or it waited too long (counted), else None."""

    def start(self, name: str, version: str, headers: dict[str, str]) -> InferCall | Answer:
        """Checks the request's headers and admits it, or answers it (400, 413, 429)."""


class BodyReader:
    """One request's body, received into one preallocated buffer once the request's turn comes."""

    def __init__(self, length: int, flow: FlowControl) -> None:
        self.length = length
        self._flow = flow
        self._early: list[bytes] = []  # bytes that came before the claim (at most HIGH_WATER + one read)
        self._early_size = 0
        self._buffer: memoryview | None = None  # set once claimed
        self._filled = 0
        self._ended = False  # the message ended, or the connection
        self._done: Callable[[memoryview | None], None] | None = None

    def feed(self, data: bytes) -> None:
        if self._buffer is None:
            self._early.append(data)
            self._early_size += len(data)
            if self._early_size > HIGH_WATER:
                self._flow.pause_reading()
            return
        end = min(self._filled + len(data), self.length)
        self._buffer[self._filled : end] = data[: end - self._filled]
        self._filled = end

    def end(self) -> None:
        """The message ended (or the connection: then fewer bytes than declared came)."""
        self._ended = True
        self._deliver()

    def claim(self, done: Callable[[memoryview | None], None]) -> None:
        """Receive the body into one buffer and call `done` with it, writable, once it is whole
        (None if the client left first). Its memory is not zeroed first (a 1.4 MB memset per
        request): every byte is written before it is handed over."""
        self._buffer = np.empty(self.length, dtype=np.uint8).data
        early, self._early = self._early, []
        for data in early:
            self.feed(data)
        self._done = done
        self._deliver()
        self._flow.resume_reading()

    def missing(self) -> memoryview | None:
        """The part of the claimed buffer still to come (None: not claimed, or no longer awaited)."""
        if self._buffer is None or self._ended or self._filled == self.length:
            return None
        return self._buffer[self._filled :]

    def received(self, size: int) -> None:
        """`size` more bytes were written into `missing()`."""
        self._filled += size

    def _deliver(self) -> None:
        if self._ended and self._done is not None:
            done, self._done = self._done, None
            done(self._buffer if self._filled == self.length else None)


class DirectInfer:
    """One infer request served by the protocol, from its headers to its response."""

    def __init__(
        self, protocol: InferProtocol, name: str, version: str, reader: BodyReader, refused: Answer | None
    ) -> None:
        self.protocol = protocol
        self.name, self.version = name, version
        self.headers = header_values(protocol.headers)
        self.reader = reader
        self.refused = refused
        """Decided on arrival: a request that comes while the process is full, or that already
        waited too long before it was read (in the kernel's queues, behind the event loop), is
        refused."""
        self.cycle: RequestResponseCycle | None = None
        self.call: InferCall | None = None

    def start(self, cycle: RequestResponseCycle) -> None:
        """Its turn on the connection (at once, or once its pipelined predecessor is answered)."""
        self.cycle = cycle
        self.protocol.active = self
        if self.refused is not None:
            self.answer(self.refused)
            return
        started = self.protocol.route.start(self.name, self.version, self.headers)
        if isinstance(started, Answer):
            self.answer(started)
            return
        self.call = started
        if cycle.waiting_for_100_continue and not cycle.transport.is_closing():
            cycle.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")  # as uvicorn on the first read
            cycle.waiting_for_100_continue = False
        self.reader.claim(self._body_received)

    def _body_received(self, body: memoryview | None) -> None:
        assert self.call is not None
        if body is None:
            self.client_gone()
            self._finish(ClientGone())
            return
        self.protocol.workers.submit(self._score, self.call, body)

    def _score(self, call: InferCall, body: memoryview) -> None:
        """In a worker thread: the answer, handed to the event loop in one wake-up."""
        result: Answer | BaseException
        try:
            result = call.score(body)
        except Exception as exc:  # answered by its status; internal errors are logged by `failed`
            result = exc
        self.protocol.loop.call_soon_threadsafe(self._finish, result)

    def _finish(self, result: Answer | BaseException) -> None:
        assert self.call is not None
        answer = result if isinstance(result, Answer) else self.call.failed(result)
        self.call.close()
        self.answer(answer)

    def client_gone(self) -> None:
        self.reader.end()  # a body not yet whole never will be
        if self.call is not None:
            self.call.client_gone()

    def answer(self, answer: Answer) -> None:
        """Write the whole response at once (unless the client left) and start the next request."""
        cycle = self.cycle
        assert cycle is not None
        protocol = self.protocol
        if protocol.active is self:
            protocol.active = None
        cycle.response_complete = True
        if cycle.disconnected or cycle.transport.is_closing():
            return
        cycle.waiting_for_100_continue = False
        cycle.transport.write(response_bytes(answer, cycle.default_headers, cycle.keep_alive))
        if cycle.access_log:
            cycle.access_logger.info(
                '%s - "POST %s HTTP/%s" %d',
                get_client_addr(cycle.scope),
                get_path_with_query_string(cycle.scope),
                cycle.scope["http_version"],
                answer.status,
            )
        if not cycle.keep_alive:
            cycle.transport.close()
        cycle.on_response()


class BodyReceiver(asyncio.BufferedProtocol):
    """The connection's protocol while the rest of a direct request's body comes: the event loop
    receives it straight into the request's buffer (otherwise each read is copied into a bytes
    object, httptools copies each piece into another, and `BodyReader.feed` copies that into the
    buffer: three copies of 270 pairs' 1.5 MB), then hands the connection back to the HTTP protocol.
    No byte past the body is read: a pipelined request's bytes wait in the kernel until then."""

    def __init__(self, http: InferProtocol, reader: BodyReader) -> None:
        self.http, self.reader = http, reader

    def get_buffer(self, sizehint: int) -> memoryview:
        missing = self.reader.missing()
        assert missing is not None, "installed only while the body is missing bytes"
        return missing

    def buffer_updated(self, nbytes: int) -> None:
        self.reader.received(nbytes)
        if self.reader.missing() is None:
            self.http.body_received()

    def eof_received(self) -> None:
        self.http.eof_received()  # the transport closes: `connection_lost` follows

    def connection_lost(self, exc: Exception | None) -> None:
        self.http.connection_lost(exc)

    def pause_writing(self) -> None:
        self.http.pause_writing()

    def resume_writing(self) -> None:
        self.http.resume_writing()


class ClientGone(Exception):
    """The connection closed before the whole body came."""


class InferProtocol(HttpToolsProtocol):
    """The protocol of one connection; `infer_protocol` makes the class for one server."""

    route: InferRoute
    workers: Executor
    direct: DirectInfer | None = None
    """The request whose body is being parsed, if it takes the direct path."""
    active: DirectInfer | None = None
    """The direct request being answered (started, not yet answered)."""
    refused_at_once: bool = False
    """The request being parsed was answered 429 from its headers (`refuse_at_once`)."""

    def on_headers_complete(self) -> None:
        self.direct = None
        self.refused_at_once = False
        length = content_length(self.headers)
        route = None
        if length is not None and self.parser.get_method() == b"POST" and not self.parser.should_upgrade():
            path = self.url.split(b"?", 1)[0].decode("latin-1")
            route = self.route.match(urllib.parse.unquote(path) if "%" in path else path)  # as uvicorn
        if length is None or route is None:
            super().on_headers_complete()
            return
        refused = self.route.refusal(waited_s(self.transport))
        if refused is not None and self.refuse_at_once(refused):
            return
        self.direct = DirectInfer(self, *route, BodyReader(length, self.flow), refused)
        app, self.app = self.app, self.direct  # started by _start_asgi_task
        try:
            super().on_headers_complete()
        finally:
            self.app = app

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        # httptools is done with this read: the rest of a claimed body goes straight into its buffer.
        if (
            self.direct is not None
            and self.direct.reader.missing() is not None
            and not self.transport.is_closing()
        ):
            self.transport.set_protocol(BodyReceiver(self, self.direct.reader))

    def body_received(self) -> None:
        """The rest of the body came through `BodyReceiver`: this protocol reads again, with a fresh
        parser (the old one still waits for those bytes), and the message is complete."""
        self.transport.set_protocol(self)
        self.parser = httptools.HttpRequestParser(self)
        self.parser.set_dangerous_leniencies(lenient_data_after_close=True)  # as uvicorn makes it
        self.on_message_complete()

    def _start_asgi_task(self, cycle: RequestResponseCycle, app: Any) -> None:
        if isinstance(app, DirectInfer):
            app.start(cycle)
        else:
            super()._start_asgi_task(cycle, app)

    def refuse_at_once(self, refused: Answer) -> bool:
        """Answer a request refused from its headers now, with nothing built for it (no request
        cycle, no body reader): most requests under overload end here, so a refusal costs the event
        loop (and the interpreter that the scoring threads share) next to nothing. Not while an
        earlier request on the connection is unanswered (False: `DirectInfer` answers it in turn)."""
        if self.pipeline or (self.cycle is not None and not self.cycle.response_complete):
            return False
        keep_alive = self.parser.get_http_version() != "1.0" and self.parser.should_keep_alive()
        self.transport.write(response_bytes(refused, self.server_state.default_headers, keep_alive))
        if not keep_alive:
            self.transport.close()
        self.refused_at_once = True  # its body is skipped
        self.on_response_complete()  # as a cycle's end: the keep-alive timer, or nothing once closing
        return True

    def on_body(self, body: bytes) -> None:
        if self.refused_at_once:
            return
        if self.direct is None or self.cycle.response_complete:
            super().on_body(body)  # a direct request answered before its body: skipped
        else:
            self.direct.reader.feed(body)

    def on_message_complete(self) -> None:
        if self.refused_at_once:
            return
        if self.direct is not None:
            self.direct.reader.end()
        super().on_message_complete()

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        for request in (self.direct, self.active):
            if request is not None:
                request.client_gone()


def infer_protocol(route: InferRoute, workers: Executor) -> type[InferProtocol]:
    """The protocol class for a server whose infer requests `route` serves, scored on `workers`."""
    return type("InferProtocol", (InferProtocol,), {"route": route, "workers": workers})


def response_bytes(answer: Answer, default_headers: list[tuple[bytes, bytes]], keep_alive: bool) -> bytes:
    """The whole HTTP/1.1 response: status line, the server's and the answer's headers, its length
    (and `connection: close` unless kept alive), then the body."""
    head = [STATUS_LINE[answer.status]]
    for name, value in (*default_headers, *answer.headers):
        head += (name, b": ", value, b"\r\n")
    head.append(b"content-length: %d\r\n" % len(answer.body))
    if not keep_alive:
        head.append(b"connection: close\r\n")
    head += (b"\r\n", answer.body)
    return b"".join(head)


def header_values(headers: list[tuple[bytes, bytes]]) -> dict[str, str]:
    """A request's (lower-case) header names and values; the first of a repeated one, as Starlette's."""
    values: dict[str, str] = {}
    for name, value in headers:
        values.setdefault(name.decode("latin-1"), value.decode("latin-1"))
    return values


def content_length(headers: list[tuple[bytes, bytes]]) -> int | None:
    """The one Content-Length of a request that has no Transfer-Encoding, or None."""
    found = None
    for name, value in headers:
        if name == b"transfer-encoding":
            return None
        if name == b"content-length":
            if found is not None or not value.isdigit():
                return None
            found = int(value)
    return found
