"""The infer route served by the HTTP protocol itself (`flexemr.api.http_protocol`), driven byte by
byte on one connection: what goes direct and what goes to the ASGI app, pipelined requests answered
in order (direct and ASGI mixed), keep-alive and `Connection: close`, framing errors, a client
that leaves mid-body or while its request is scored, and an answer before the body."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from uvicorn.config import Config
from uvicorn.server import ServerState

from flexemr.api.http_protocol import Answer, BodyReceiver, ClientGone, InferProtocol, infer_protocol

INFER = "/v2/models/m/infer"


class Transport(asyncio.Transport):
    """What the protocol writes, and whether it closed the connection; `feed` delivers bytes as the
    event loop does, to whichever protocol the connection has (a buffered one gets at most the room
    it offers, the rest goes to the protocol that follows)."""

    def __init__(self) -> None:
        super().__init__()
        self.written = bytearray()
        self.closed = False
        self.reading = True
        self.protocol: asyncio.BaseProtocol | None = None
        self.direct_bytes = 0
        """Bytes received straight into a buffer (`BodyReceiver`)."""

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self.protocol = protocol

    def get_protocol(self) -> asyncio.BaseProtocol:
        assert self.protocol is not None
        return self.protocol

    def feed(self, data: bytes) -> None:
        while data:
            protocol = self.protocol
            if isinstance(protocol, asyncio.BufferedProtocol):
                room = memoryview(protocol.get_buffer(-1))
                size = min(len(room), len(data))
                room[:size] = data[:size]
                self.direct_bytes += size
                protocol.buffer_updated(size)
                data = data[size:]
            else:
                assert isinstance(protocol, asyncio.Protocol)
                protocol.data_received(data)
                data = b""

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"sockname": ("127.0.0.1", 8000), "peername": ("127.0.0.1", 40000)}.get(name, default)

    def write(self, data: Any) -> None:
        assert not self.closed, "written after close"
        self.written += data

    def close(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        self.reading = True


class Call:
    def __init__(self, route: Route, name: str) -> None:
        self.route, self.name = route, name
        self.gone = self.closed = False

    def score(self, body: memoryview) -> Answer:
        self.route.scoring.set()
        assert self.route.release.wait(30)
        return Answer(
            200, f"{self.name}:{bytes(body).decode()}".encode(), ((b"content-type", b"text/plain"),)
        )

    def failed(self, exc: BaseException) -> Answer:
        self.route.failures.append(exc)
        return Answer(499, b"gone", ())

    def client_gone(self) -> None:
        self.gone = True

    def close(self) -> None:
        self.closed = True


class Route:
    """An infer route that answers `<model>:<body>`; `release` holds scoring until it is set."""

    def __init__(self) -> None:
        self.calls: list[Call] = []
        self.failures: list[BaseException] = []
        self.refuse = False
        self.scoring = threading.Event()
        self.release = threading.Event()
        self.release.set()

    def match(self, path: str) -> tuple[str, str] | None:
        parts = path.split("/")
        return (parts[3], "") if len(parts) == 5 and parts[4] == "infer" else None

    def refusal(self, waited_s: float) -> Answer | None:
        return Answer(429, b"full", ((b"retry-after", b"1"),)) if self.refuse else None

    def start(self, name: str, version: str, headers: dict[str, str]) -> Call | Answer:
        if "flexemr-timeout-ms" in headers:
            return Answer(400, b"bad timeout", ())
        self.calls.append(Call(self, name))
        return self.calls[-1]


async def asgi(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """Every request the ASGI app gets: `asgi <method> <path> <body>`."""
    body = b""
    while True:
        message = await receive()
        body += message.get("body", b"")
        if not message.get("more_body"):
            break
    content = f"asgi {scope['method']} {scope['path']} ".encode() + body
    await send(
        {"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"%d" % len(content))]}
    )
    await send({"type": "http.response.body", "body": content})


@pytest.fixture
def workers() -> Iterator[ThreadPoolExecutor]:
    with ThreadPoolExecutor(2) as pool:
        yield pool


def connect(route: Route, workers: ThreadPoolExecutor) -> tuple[InferProtocol, Transport]:
    config = Config(asgi, log_level="warning", access_log=False)
    config.load()
    protocol = infer_protocol(route, workers)(config=config, server_state=ServerState(), app_state={})
    transport = Transport()
    transport.set_protocol(protocol)
    protocol.connection_made(transport)
    return protocol, transport


def post(path: str, body: bytes, *headers: str) -> bytes:
    head = "".join(f"{h}\r\n" for h in (f"Content-Length: {len(body)}", *headers))
    return f"POST {path} HTTP/1.1\r\nHost: x\r\n{head}\r\n".encode() + body


def responses(data: bytes) -> list[tuple[int, bytes]]:
    """Status and body of each whole response in `data` (each has a Content-Length)."""
    out = []
    while b"\r\n\r\n" in data:
        head, data = data.split(b"\r\n\r\n", 1)
        lines = head.split(b"\r\n")
        length = next(
            int(line.split(b":")[1]) for line in lines if line.lower().startswith(b"content-length")
        )
        out.append((int(lines[0].split()[1]), data[:length]))
        data = data[length:]
    return out


async def scoring(route: Route, workers: ThreadPoolExecutor, data: bytes) -> tuple[InferProtocol, Transport]:
    """A connection that sent `data`, its first request held in scoring (until `route.release`)."""
    route.release.clear()
    protocol, transport = connect(route, workers)
    transport.feed(data)
    assert await asyncio.to_thread(route.scoring.wait, 30)
    return protocol, transport


async def settle(transport: Transport, count: int) -> list[tuple[int, bytes]]:
    """The responses once `count` have been written (or the connection closed)."""
    for _ in range(3000):
        if len(responses(bytes(transport.written))) >= count or transport.closed:
            break
        await asyncio.sleep(0.01)
    return responses(bytes(transport.written))


def test_pipelined_requests_are_answered_in_order_direct_and_asgi_mixed(workers: ThreadPoolExecutor) -> None:
    async def run() -> None:
        route = Route()
        _protocol, transport = await scoring(  # the first request is still scored when the others arrive
            route,
            workers,
            post(INFER, b"one")
            + b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n\r\n"
            + post(INFER, b"two")
            + post("/v2/models/m/other", b"three")
            + post(INFER + "?x=1", b"four"),
        )
        assert transport.written == b"" and len(route.calls) == 1  # the rest wait their turn
        route.release.set()
        assert await settle(transport, 5) == [
            (200, b"m:one"),
            (200, b"asgi GET /v2/health/live "),
            (200, b"m:two"),
            (200, b"asgi POST /v2/models/m/other three"),
            (200, b"m:four"),
        ]
        assert all(call.closed for call in route.calls) and not transport.closed  # kept alive

    asyncio.run(run())


def test_a_body_in_pieces_goes_into_one_buffer_and_keep_alive_goes_on(workers: ThreadPoolExecutor) -> None:
    async def run() -> None:
        route = Route()
        _protocol, transport = connect(route, workers)
        body = bytes(range(48, 58)) * 20_000  # over the high-water mark before its turn
        request = post(INFER, body)
        for start in range(0, len(request), 7_000):
            transport.feed(request[start : start + 7_000])
        transport.feed(post(INFER, b"next", "Connection: close"))
        answers = await settle(transport, 2)
        assert answers == [(200, b"m:" + body), (200, b"m:next")]
        assert transport.closed  # Connection: close is honoured after its answer
        assert b"connection: close" in transport.written.rsplit(b"HTTP/1.1", 1)[1]

    asyncio.run(run())


def test_the_rest_of_a_body_is_received_straight_into_its_buffer_and_what_follows_is_parsed(
    workers: ThreadPoolExecutor,
) -> None:
    """After the read that holds the headers, the body's bytes go from the event loop into the
    request's buffer (`BodyReceiver`), no further: the pipelined requests behind it are parsed by
    the HTTP protocol (with a fresh parser), in order."""

    async def run() -> None:
        route = Route()
        protocol, transport = connect(route, workers)
        body = bytes(range(65, 91)) * 4_000
        first = post(INFER, body)
        transport.feed(first[:300])
        assert isinstance(transport.get_protocol(), BodyReceiver)
        transport.feed(first[300:] + post(INFER, b"two") + post("/v2/models/m/other", b"three"))
        answers = await settle(transport, 3)
        assert answers == [(200, b"m:" + body), (200, b"m:two"), (200, b"asgi POST /v2/models/m/other three")]
        assert transport.direct_bytes == len(first) - 300
        assert transport.get_protocol() is protocol and not transport.closed

    asyncio.run(run())


def test_a_chunked_infer_body_goes_to_the_asgi_app(workers: ThreadPoolExecutor) -> None:
    async def run() -> None:
        route = Route()
        _protocol, transport = connect(route, workers)
        head = f"POST {INFER} HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
        transport.feed(head.encode() + b"3\r\nabc\r\n0\r\n\r\n")
        assert await settle(transport, 1) == [(200, f"asgi POST {INFER} abc".encode())]
        assert route.calls == []

    asyncio.run(run())


def test_answers_from_headers_skip_the_body_and_keep_the_connection(workers: ThreadPoolExecutor) -> None:
    async def run() -> None:
        route = Route()
        _protocol, transport = connect(route, workers)
        route.refuse = True
        transport.feed(post(INFER, b"x" * 100_000))  # refused on arrival: the body is skipped
        route.refuse = False
        transport.feed(post(INFER, b"y" * 100_000, "Flexemr-Timeout-Ms: soon"))
        transport.feed(post(INFER, b"z"))
        answers = await settle(transport, 3)
        assert answers == [(429, b"full"), (400, b"bad timeout"), (200, b"m:z")]
        assert b"retry-after: 1" in transport.written and not transport.closed
        assert transport.reading

    asyncio.run(run())


def test_a_refusal_waits_for_the_request_before_it_and_closes_the_connection_if_asked(
    workers: ThreadPoolExecutor,
) -> None:
    """Refused at once (no request cycle built) only when nothing earlier on the connection is
    unanswered; else in its turn, after the earlier answer."""

    async def run() -> None:
        route = Route()
        protocol, transport = await scoring(route, workers, post(INFER, b"one"))
        route.refuse = True
        protocol.data_received(post(INFER, b"two"))  # pipelined behind one: waits for its answer
        assert transport.written == b""
        route.release.set()
        assert await settle(transport, 2) == [(200, b"m:one"), (429, b"full")]
        protocol.data_received(post(INFER, b"three", "Connection: close"))  # refused at once
        assert responses(bytes(transport.written))[2] == (429, b"full")
        assert transport.written.endswith(b"connection: close\r\n\r\nfull") and transport.closed
        assert len(route.calls) == 1
        fresh, fresh_transport = connect(route, workers)
        fresh.data_received(post(INFER, b"four"))
        assert responses(bytes(fresh_transport.written)) == [(429, b"full")]
        assert fresh.cycle is None and not fresh_transport.closed  # nothing built; kept alive

    asyncio.run(run())


def test_bad_framing_gets_400_and_the_connection_closes(workers: ThreadPoolExecutor) -> None:
    async def run() -> None:
        route = Route()
        _protocol, transport = connect(route, workers)
        transport.feed(
            f"POST {INFER} HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcd".encode()
        )
        assert transport.written.startswith(b"HTTP/1.1 400") and transport.closed
        assert route.calls == []

    asyncio.run(run())


def test_a_client_that_leaves_mid_body_is_dropped_and_nothing_is_written(workers: ThreadPoolExecutor) -> None:
    async def run() -> None:
        route = Route()
        _protocol, transport = connect(route, workers)
        transport.feed(post(INFER, b"x" * 1000)[:-500])
        assert len(route.calls) == 1  # admitted from its headers, waiting for its body
        assert isinstance(transport.get_protocol(), BodyReceiver)  # which the event loop tells
        transport.closed = True
        transport.get_protocol().connection_lost(None)
        (call,) = route.calls
        assert call.gone and call.closed
        assert [type(exc) for exc in route.failures] == [ClientGone]
        assert transport.written == b""

    asyncio.run(run())


def test_a_client_that_leaves_while_scored_has_its_work_dropped(workers: ThreadPoolExecutor) -> None:
    async def run() -> None:
        route = Route()
        protocol, transport = await scoring(route, workers, post(INFER, b"abc"))
        transport.closed = True
        protocol.connection_lost(None)
        (call,) = route.calls
        assert call.gone and not call.closed  # told at once; its place is freed when scoring ends
        route.release.set()
        for _ in range(3000):
            if call.closed:
                break
            await asyncio.sleep(0.01)
        assert call.closed and transport.written == b""

    asyncio.run(run())


def test_expect_100_continue_is_answered_when_the_body_is_claimed(workers: ThreadPoolExecutor) -> None:
    async def run() -> None:
        route = Route()
        _protocol, transport = connect(route, workers)
        transport.feed(post(INFER, b"abc", "Expect: 100-continue")[:-3])
        assert transport.written == b"HTTP/1.1 100 Continue\r\n\r\n"
        transport.feed(b"abc")
        for _ in range(3000):
            if b"m:abc" in transport.written:
                break
            await asyncio.sleep(0.01)
        assert transport.written.endswith(b"m:abc")

    asyncio.run(run())


def test_the_path_is_matched_as_the_app_would_see_it(workers: ThreadPoolExecutor) -> None:
    async def run() -> None:
        route = Route()
        _protocol, transport = connect(route, workers)
        transport.feed(post("/v2/models/%6d/infer", b"a") + post("/v2/models/m/infer/", b"b"))
        assert await settle(transport, 2) == [(200, b"m:a"), (200, b"asgi POST /v2/models/m/infer/ b")]

    asyncio.run(run())
