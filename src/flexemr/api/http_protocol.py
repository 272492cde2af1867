"""uvicorn's httptools protocol with the infer route's two costs taken out of the event loop.

- **A refusal costs next to nothing.** An infer request that arrives while the process is full,
  or that already waited too long before its headers were read (`FrontDoor.refusal`,
  `flexemr.api.request_age`), is answered 429 from its headers with pre-encoded bytes: no request
  object, no task, its body skipped by the parser (`_refuse`).
- **A body is received once, into one buffer.** uvicorn hands a body to the app in 64 KiB pieces:
  it pauses reading at each, wakes the app, and copies every byte three times (into its buffer,
  into the ASGI message, into the app's). For an infer request with a Content-Length, the app
  (after admission and the 413 checks) claims the body through `scope["extensions"]["flexemr.body"]`
  (a `BodyReader`): one buffer of that length, filled as the bytes arrive, and one wake-up when it
  is complete. Chunked bodies keep uvicorn's path (and its bound, `flexemr.api.bodies`).
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable
from typing import Any

import numpy as np
from uvicorn.protocols.http.flow_control import FlowControl
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol, RequestResponseCycle

from flexemr.api.request_age import waited_s

HIGH_WATER = 65536
"""Body bytes held before the app claims the body (then reading pauses, as uvicorn's does)."""


class ClientGone(Exception):
    """The connection closed before the whole body came."""


class BodyReader:
    """One request's body, received into one preallocated buffer once the app claims it."""

    def __init__(self, length: int, flow: FlowControl, claimed: Callable[[], None]) -> None:
        self.length = length
        self._flow = flow
        self._claimed = claimed
        self._early: list[bytes] = []  # bytes that came before the claim (at most HIGH_WATER + one read)
        self._early_size = 0
        self._buffer: memoryview | None = None  # set once the app claims the body
        self._filled = 0
        self._done: asyncio.Future[None] = asyncio.get_running_loop().create_future()

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

    def complete(self) -> None:
        if not self._done.done():
            self._done.set_result(None)

    def lost(self) -> None:
        if not self._done.done():
            self._done.set_exception(ClientGone())

    async def read(self) -> memoryview:
        """The whole body, writable (`ClientGone` if the client left first). Its memory is not
        zeroed first (a 1.4 MB memset per request): every byte is written before it is returned."""
        buffer = np.empty(self.length, dtype=np.uint8).data
        self._buffer = buffer
        early, self._early = self._early, []
        for data in early:
            self.feed(data)
        self._claimed()
        self._flow.resume_reading()
        try:
            await self._done
        finally:
            self._buffer = None
        if self._filled != self.length:
            raise ClientGone
        return buffer


class InferProtocol(HttpToolsProtocol):
    """The protocol of one connection; `infer_protocol` makes the class for one server."""

    is_infer: Callable[[str], bool]
    """Whether a request path is the infer route."""
    refusal: Callable[[float], bytes | None]
    """The pre-encoded 429 (with no Connection header) an infer request gets when it is refused,
    having waited the given seconds before its headers were read; else None."""
    reader: BodyReader | None = None
    refused_body_close: bool | None = None
    """While a refused request's body is skipped: whether to close once it has passed."""

    def on_headers_complete(self) -> None:
        self.reader = None
        if self.parser.get_method() != b"POST" or not self.is_infer(
            self.url.split(b"?", 1)[0].decode("latin-1")
        ):
            super().on_headers_complete()
            return
        if self._refuse():
            return
        super().on_headers_complete()
        length = content_length(self.headers)
        if length is not None:
            self.reader = BodyReader(length, self.flow, functools.partial(self._continue, self.cycle))
            extensions: dict[str, Any] = {**self.scope.get("extensions", {}), "flexemr.body": self.reader}
            self.scope["extensions"] = extensions

    def _continue(self, cycle: RequestResponseCycle) -> None:
        """Tell a client that waits for it (`Expect: 100-continue`) to send the body, as uvicorn
        does when an app first asks for the body."""
        if cycle.waiting_for_100_continue and not self.transport.is_closing():
            self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            cycle.waiting_for_100_continue = False

    def _refuse(self) -> bool:
        """Answer an infer request 429 from its headers when admission refuses it: pre-encoded
        bytes written at once, no request object, no task; its body is skipped (a close with
        unread bytes would reset the connection before the client read the 429). Not while an
        earlier request of the connection is being answered (pipelining): the app refuses it."""
        if (self.cycle is not None and not self.cycle.response_complete) or self.pipeline:
            return False
        response = self.refusal(waited_s(self.transport))
        if response is None:
            return False
        keep_alive = self.parser.get_http_version() != "1.0" and self.parser.should_keep_alive()
        if not keep_alive:
            response = response.replace(b"\r\n", b"\r\nconnection: close\r\n", 1)
        self.transport.write(response)
        self.refused_body_close = not keep_alive
        self.server_state.total_requests += 1
        self.timeout_keep_alive_task = self.loop.call_later(  # bounds a body that never ends
            self.timeout_keep_alive, self.timeout_keep_alive_handler
        )
        return True

    def _refused_body_passed(self) -> None:
        close, self.refused_body_close = self.refused_body_close, None
        if close:
            self.transport.close()
        elif self.timeout_keep_alive_task is None:  # reading re-armed nothing: idle from here
            self.timeout_keep_alive_task = self.loop.call_later(
                self.timeout_keep_alive, self.timeout_keep_alive_handler
            )

    def on_message_begin(self) -> None:
        self._unset_keepalive_if_required()  # a refused request's timer (`_refuse`) ends here
        super().on_message_begin()

    def on_body(self, body: bytes) -> None:
        if self.refused_body_close is not None:
            return
        if self.reader is None or self.cycle.response_complete:
            super().on_body(body)
        else:
            self.reader.feed(body)

    def on_message_complete(self) -> None:
        if self.refused_body_close is not None:
            self._refused_body_passed()
            return
        if self.reader is not None:
            self.reader.complete()
        super().on_message_complete()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.reader is not None:
            self.reader.lost()
        super().connection_lost(exc)


def infer_protocol(
    is_infer: Callable[[str], bool], refusal: Callable[[float], bytes | None]
) -> type[InferProtocol]:
    """The protocol class for a server whose infer route `is_infer` names."""
    return type(
        "InferProtocol",
        (InferProtocol,),
        {"is_infer": staticmethod(is_infer), "refusal": staticmethod(refusal)},
    )


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
