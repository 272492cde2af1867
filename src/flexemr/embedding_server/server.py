"""The embedding server process: holds its shards and answers lookup subrequests over TCP.

Every connection opens with the handshake (`protocol.handshake`): the client proves the cluster's
secret and learns what this server holds; nothing else is read before. One thread per connection
reads frames, runs the lookup kernel (which releases the GIL, so connections use the cores in
parallel) and writes the answer. A bad subrequest gets an ERROR frame and the connection lives on;
a malformed frame closes that connection only, with its reason logged (rate-limited).

Bounds (`NodeLimits`): at most `max_connections` connections, of which at most `max_handshakes`
not yet authenticated (`slots.py`: a new connection takes the slot of the oldest handshake, so
peers without the secret never lock out those with it); the whole handshake within
`handshake_timeout_s` of accept; an idle timeout; and `max_held_bytes` of answers held per
connection. Before its proof a peer costs a thread, a socket and at most one handshake message of
`MAX_HANDSHAKE_BYTES`; a broken handshake gets one ERROR and a close, and every refusal is counted
and logged at most once per 10 s per reason. When accept fails for want of file descriptors, the
server drops its oldest handshake and backs off; the process and the connections it holds carry on.

Credit-based flow control (the ranker's I/O engine asks for it in its HELLO): a credited data
connection sends a response only against a credit, from its reading thread when it has one (no
thread hop); answers beyond the credits wait in a bounded queue for a writer thread
(`CreditedAnswers`); when that is full the connection stops reading (TCP pushes back on the
ranker). Credits arrive on a control connection of the same session (CREDIT frames naming the
data connection), or piggybacked on the data connection itself (LOOKUP flag CREDIT, or a bare
CREDIT frame).
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import socket
import ssl
import threading
import time
from collections import Counter, deque
from typing import Any, cast

import numpy as np

from flexemr.config import Endpoint, FrameLimits, NodeLimits, TransportKind
from flexemr.config.security import Identity, check_bind
from flexemr.embedding_server.range_counts import RangeCounts
from flexemr.embedding_server.slots import ConnectionSlots, SlotsFull
from flexemr.embedding_server.store import BadSubrequest, RowImage, ShardStore
from flexemr.embedding_server.versions import RowVersions, StaleVersion
from flexemr.logs import RateLimitedWarnings
from flexemr.protocol.frames import (
    MAX_QUEUED_RESPONSES,
    ConnectionClosed,
    Flags,
    Frame,
    FrameReader,
    MessageType,
    ProtocolError,
    encode,
    error_frame,
    send_frame,
)
from flexemr.protocol.handshake import (
    MAX_REASON_CHARS,
    Deadline,
    Hello,
    NotAuthenticated,
    server_handshake,
)
from flexemr.protocol.updates import BadUpdate, StagedRows, int64s, parse_commit, version_buffer

log = logging.getLogger(__name__)
log.addFilter(RateLimitedWarnings())  # peers can cause refusals in a loop


class CreditedAnswers:
    """The answers of one credited data connection and its response credits, under one lock.

    An answer goes out only against a credit. The reader sends it itself when it can (a credit,
    nothing held, no send under way): no thread hop. Otherwise it is held (bounded in count and
    in bytes; one answer alone may exceed the bytes) and the writer thread sends it, in order,
    once a credit comes. `put` waits while the held answers are full: the reader stops reading
    and TCP pushes back on the ranker.
    """

    def __init__(self, credits: int, max_bytes: int) -> None:
        self._cond = threading.Condition()
        self._credits = credits
        self._held: deque[tuple[list[memoryview], int]] = deque()
        self._bytes = 0
        self._max_bytes = max_bytes
        self._sending = False
        self._closed = False
        self.granted = credits
        self.sent = 0
        self.waits = 0
        """Answers that waited for a credit."""

    def grant(self, n: int) -> None:
        with self._cond:
            self._credits += n
            self.granted += n
            self._cond.notify_all()

    def put(self, answer: list[memoryview]) -> bool | None:
        """True: `answer` is the caller's to send now, then `sent_one`; False: held for the
        writer; None: closed. Waits while the held answers are full."""
        size = sum(v.nbytes for v in answer)
        with self._cond:
            while (
                self._held
                and not self._closed
                and (len(self._held) >= MAX_QUEUED_RESPONSES or self._bytes + size > self._max_bytes)
            ):
                self._cond.wait()
            if self._closed:
                return None
            if not self._held and not self._sending and self._credits > 0:
                self._spend()
                return True
            if self._credits <= 0:
                self.waits += 1
            self._held.append((answer, size))
            self._bytes += size
            self._cond.notify_all()
            return False

    def take(self) -> list[memoryview] | None:
        """The writer's next answer to send (then `sent_one`), once it has a credit and no other
        send is under way; None once closed."""
        with self._cond:
            while not self._closed and (not self._held or self._sending or self._credits <= 0):
                self._cond.wait()
            if self._closed:
                return None
            answer, size = self._held.popleft()
            self._bytes -= size
            self._spend()
            self._cond.notify_all()
            return answer

    def _spend(self) -> None:
        self._credits -= 1
        self.sent += 1
        self._sending = True
        assert self.sent <= self.granted, "sent a response without a credit"

    def sent_one(self) -> None:
        with self._cond:
            self._sending = False
            if self._held:
                self._cond.notify_all()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._held.clear()
            self._cond.notify_all()


class EmbeddingServer:
    def __init__(
        self,
        store: ShardStore,
        endpoint: Endpoint,
        identity: Identity,
        secret: bytes | None = None,
        limits: NodeLimits | None = None,
        frame_limits: FrameLimits | None = None,
        tls: ssl.SSLContext | None = None,
        versions: RowVersions | None = None,
        transport: TransportKind = "tcp",
    ) -> None:
        """`versions`: the rows' versions and update log (default: none, updates refused);
        `transport`: tcp, or ucx (`protocol.ucx_stream`; a secret is required, TLS refused)."""
        check_bind(endpoint.host, secret, transport)
        self.store = store
        self.versions = versions or RowVersions(store)
        self.identity = identity
        self._key = secret or b""
        self.node_limits = limits or NodeLimits()
        self.limits = frame_limits or FrameLimits()
        self._tls = tls
        self._read_ahead = transport == "tcp"  # a UCX stream fills all of the view it is given
        self._listener = self._listen(endpoint, transport)
        self.endpoint = Endpoint(endpoint.host, self._listener.getsockname()[1])
        self._slots = ConnectionSlots(self.node_limits.max_connections, self.node_limits.max_handshakes)
        self._lock = threading.Lock()
        self._closed = threading.Event()
        self._sessions: dict[str, dict[int, CreditedAnswers]] = {}
        self._credit_latencies: dict[str, deque[int]] = {}
        """Per session, grant-to-arrival times of recent credits (meaningful with same-host clocks)."""
        self.lookups = 0
        """Lookup subrequests answered with rows (for tests and stats)."""
        self.range_counts = RangeCounts(
            store.shards, store.table_rows, store.dim, self.node_limits.range_sample
        )
        """Rows looked up per row range, from a sample of the lookups (the control channel's stats,
        for `plan --from-stats`)."""
        self.refused: Counter[str] = Counter()
        """Connections refused or closed early, by reason."""

    def _listen(self, endpoint: Endpoint, transport: TransportKind) -> socket.socket:
        if transport == "tcp":
            return socket.create_server((endpoint.host, endpoint.port), backlog=128)
        from flexemr.protocol import ucx_stream

        if self._tls is not None:
            raise ValueError("--transport ucx has no TLS: serve it on a private fabric, without TLS")
        # The listener and its endpoints have every socket method this class uses.
        return cast(socket.socket, ucx_stream.UcxListener(endpoint.port))

    def serve_forever(self) -> None:
        """Accept connections until `close`. Out of file descriptors (or memory for a socket), it
        drops its oldest handshake and backs off, while the process and its connections live on."""
        backoff = 0.0
        while not self._closed.is_set():
            try:
                conn, peer = self._listener.accept()
            except OSError as exc:
                if self._closed.is_set():
                    break
                exhausted = exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)
                reason = "out of file descriptors or socket memory" if exhausted else "accept failed"
                if exhausted and self._slots.drop_oldest_handshake():
                    self._refuse(reason, f"{exc}; dropped the oldest handshake, backing off")
                else:
                    self._refuse(reason, f"{exc}; refusing new connections, backing off")
                backoff = min(1.0, max(0.01, 2 * backoff))
                time.sleep(backoff)
                continue
            backoff = 0.0
            deadline = Deadline.after(self.node_limits.handshake_timeout_s)
            try:
                dropped = self._slots.admit(conn)
            except SlotsFull as exc:
                conn.close()
                self._refuse("connection limit", str(exc))
                continue
            if dropped is not None:
                self._refuse(dropped, "dropped the oldest connection still in its handshake")
            try:
                threading.Thread(
                    target=self._serve_connection, args=(conn, peer, deadline), daemon=True
                ).start()
            except RuntimeError as exc:  # no thread to be had
                self._slots.release(conn)
                conn.close()
                self._refuse("no thread for a connection", str(exc))

    def _refuse(self, reason: str, detail: str) -> None:
        """Count a refusal and log it with the count so far, at most once per 10 s per reason."""
        self.refused[reason] += 1
        log.warning(
            "embedding server %d: %s (%s); %d so far",
            self.store.server, reason, detail[:MAX_REASON_CHARS], self.refused[reason],
            extra={"rate_key": reason},
        )  # fmt: skip

    def close(self) -> None:
        self._closed.set()
        try:
            self._listener.shutdown(socket.SHUT_RDWR)  # wakes a thread blocked in accept()
        except OSError:
            pass
        self._listener.close()
        self._slots.shut_all()
        with self._lock:
            for connections in self._sessions.values():
                for answers in connections.values():
                    answers.close()
        self.versions.close()

    def _serve_connection(self, conn: socket.socket, peer: tuple[str, int], deadline: Deadline) -> None:
        """Handshake by the deadline, then serve the connection as its HELLO says."""
        raw = conn
        try:
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            conn, hello = self._handshake(conn, f"{peer[0]}:{peer[1]}", deadline)
            if hello is None or not self._slots.prove(conn):
                return
            conn.settimeout(self.node_limits.idle_timeout_s)
            if hello.role == "control":
                self._serve_control(conn, hello.session)
            elif hello.credits is not None:
                self._serve_credited(conn, hello.session, hello.conn, hello.credits)
            else:
                frames = self._frames(conn)
                while True:
                    frame = frames.read()
                    if frame.type != MessageType.PING:  # a keepalive: never answered
                        reply, looked_up = self._reply(frame)
                        try:
                            send_frame(conn, reply)
                        finally:
                            self._count(looked_up)
        except ProtocolError as exc:
            self._refuse("malformed frame", f"{peer[0]}:{peer[1]}: {exc}")
        except (ConnectionClosed, OSError, ValueError):
            pass
        finally:
            for sock in {raw, conn}:
                self._slots.release(sock)
                sock.close()

    def _handshake(
        self, conn: socket.socket, peer: str, deadline: Deadline
    ) -> tuple[socket.socket, Hello | None]:
        """The connection (in TLS, if configured) and, once the peer has proven the secret, its
        HELLO; None when it did not by the deadline (a refusal, counted and logged)."""
        try:
            if self._tls is not None:
                deadline.arm(conn)
                conn = self._slots.replace(conn, self._tls.wrap_socket(conn, server_side=True))
            return conn, server_handshake(conn, self.identity, self._key, self.limits, deadline)
        except NotAuthenticated as exc:
            self._refuse("not authenticated", f"{peer}: {exc}")
        except ProtocolError as exc:
            self._refuse("malformed handshake", f"{peer}: {exc}")
        except TimeoutError:
            self._refuse(
                "handshake deadline",
                f"{peer}: no handshake {self.node_limits.handshake_timeout_s} s after accept",
            )
        return conn, None

    def _serve_credited(self, conn: socket.socket, session: str, index: int, credits: int) -> None:
        """Read and answer lookups, sending each answer at once when a credit allows; a writer
        thread sends those held for want of credits (`CreditedAnswers`)."""
        answers = CreditedAnswers(credits, self.node_limits.max_held_bytes)
        with self._lock:
            self._sessions.setdefault(session, {})[index] = answers
        writer = threading.Thread(target=self._write_credited, args=(conn, answers), daemon=True)
        writer.start()
        frames = self._frames(conn)
        try:
            while True:
                frame = frames.read()
                if frame.type == MessageType.CREDIT:
                    self._piggybacked(session, answers, frame.buffers[0] if frame.buffers else None)
                    continue
                if frame.type == MessageType.PING:
                    continue
                if frame.type == MessageType.LOOKUP and frame.flags & Flags.CREDIT and frame.buffers:
                    self._piggybacked(session, answers, frame.buffers.pop())
                    frame.flags &= ~Flags.CREDIT
                reply, looked_up = self._reply(frame)
                try:
                    now = answers.put(reply)
                    if now:
                        try:
                            send_frame(conn, reply)
                        finally:
                            answers.sent_one()
                finally:
                    self._count(looked_up)
                if now is None:
                    break
        finally:
            with self._lock:
                self._sessions.get(session, {}).pop(index, None)
            answers.close()
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
            writer.join()

    def _frames(self, conn: socket.socket) -> FrameReader:
        """The connection's frames; a lookup's arrays are views into its receive buffer, used up
        (looked up, counted) before the next frame is read."""
        return FrameReader(conn.recv_into, self.limits, (MessageType.LOOKUP,), self._read_ahead)

    def _piggybacked(self, session: str, answers: CreditedAnswers, grant: np.ndarray | None) -> None:
        """A grant on a data connection: int64 [credits] or [credits, sent at monotonic_ns]."""
        if grant is None or grant.dtype != np.int64 or grant.ndim != 1 or grant.size < 1 or grant[0] < 0:
            raise ProtocolError("a piggybacked credit is int64 [credits] or [credits, sent at ns]")
        answers.grant(int(grant[0]))
        if grant.size > 1:
            self._latencies(session).append(time.monotonic_ns() - int(grant[1]))

    def _latencies(self, session: str) -> deque[int]:
        with self._lock:
            return self._credit_latencies.setdefault(session, deque(maxlen=4096))

    def _write_credited(self, conn: socket.socket, answers: CreditedAnswers) -> None:
        try:
            while (answer := answers.take()) is not None:
                try:
                    send_frame(conn, answer)
                finally:
                    answers.sent_one()
        except OSError:  # gone, or not reading for the idle timeout: stop the reader too
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        answers.close()

    def _serve_control(self, conn: socket.socket, session: str) -> None:
        """Apply CREDIT frames to the session's data connections; answer PING with credit stats."""
        frames = self._frames(conn)
        while True:
            frame = frames.read()
            if frame.type == MessageType.CREDIT:
                ids, grants, sent_at = _credit_buffers(frame)
                self._latencies(session).append(time.monotonic_ns() - int(sent_at[0]))
                with self._lock:
                    connections = self._sessions.get(session, {})
                    for index, n in zip(ids.tolist(), grants.tolist(), strict=True):
                        if index in connections:
                            connections[index].grant(n)
            elif frame.type == MessageType.PING:
                stats = [_json(self.credit_stats(session))] if frame.flags & Flags.STATS else []
                send_frame(conn, encode(MessageType.PONG, frame.request_id, stats))
            else:
                send_frame(conn, self.answer(frame))

    def credit_stats(self, session: str) -> dict[str, Any]:
        """What a control channel's PING with flag STATS gets: the session's credits, the update
        log, and the rows looked up per row range (`range_counts`)."""
        with self._lock:
            connections = dict(self._sessions.get(session, {}))
        latencies = list(self._latencies(session))
        return {
            "connections": {
                i: {"granted": a.granted, "sent": a.sent, "waits": a.waits} for i, a in connections.items()
            },
            "credit_latency_ns": latencies,
            "updates": self.versions.stats(),
            "ranges": self.range_counts.stats(),
        }

    def answer(self, frame: Frame) -> list[memoryview]:
        """The reply to one well-formed frame."""
        reply, looked_up = self._reply(frame)
        self._count(looked_up)
        return reply

    def _count(self, looked_up: np.ndarray | None) -> None:
        """Count a sampled lookup's rows (`range_counts`) once its answer is on its way (always,
        once `_reply` has announced it: `stats` waits for it)."""
        if looked_up is not None:
            self.range_counts.count(looked_up)

    def _reply(self, frame: Frame) -> tuple[list[memoryview], np.ndarray | None]:
        """The reply to one well-formed frame, and the rows it looked up to be counted (None: not
        a lookup answered with rows, or one the range counts' sample left out)."""
        if frame.type == MessageType.LOOKUP:
            try:
                values = self._lookup(frame)
            except StaleVersion as exc:
                return encode(MessageType.STALE, frame.request_id, [version_buffer(exc.version)]), None
            except BadSubrequest as exc:
                return error_frame(frame.request_id, f"embedding server {self.store.server}: {exc}"), None
            self.lookups += 1
            counted = frame.buffers[0] if self.range_counts.expect() else None
            return encode(MessageType.RESULT, frame.request_id, [values]), counted
        return self._other(frame), None

    def _other(self, frame: Frame) -> list[memoryview]:
        """The reply to an update, commit, abort, changelog or rows request (or an ERROR)."""
        rid, versions = frame.request_id, self.versions
        try:
            if frame.type == MessageType.UPDATE:
                applied = versions.stage(StagedRows.parse(frame, self.store.dim))
                return encode(MessageType.UPDATE, rid, [version_buffer(applied)])
            if frame.type == MessageType.COMMIT:
                applied = versions.commit(*parse_commit(frame, self.store.server + 1))
                return encode(MessageType.COMMIT, rid, [version_buffer(versions.version, applied)])
            if frame.type == MessageType.ABORT:
                version, token = int64s(frame, 2, "an ABORT")
                return encode(MessageType.ABORT, rid, [version_buffer(int(versions.abort(version, token)))])
            if frame.type == MessageType.CHANGES:
                (since,) = int64s(frame, 1, "a CHANGES request")
                return versions.changes(since).frame(rid)
            if frame.type == MessageType.ROWS:
                version, start, stop = int64s(frame, 3, "a ROWS request")
                return versions.rows_at(version, start, stop).frame(rid)
        except StaleVersion as exc:
            return encode(MessageType.STALE, rid, [version_buffer(exc.version)])
        except (BadSubrequest, BadUpdate) as exc:
            return error_frame(rid, f"embedding server {self.store.server}: {exc}")
        return error_frame(rid, f"unexpected message type {frame.type.name}")

    def _lookup(self, frame: Frame) -> np.ndarray:
        """Pooled or raw rows, at the version the lookup names (flag VERSIONED) or, without one, at
        whatever version is committed; never during a commit, nor a resync (STALE)."""
        read = None
        if frame.flags & Flags.VERSIONED:
            if not frame.buffers or frame.buffers[-1].dtype != np.int64 or frame.buffers[-1].shape != (1,):
                raise BadSubrequest("a versioned lookup ends with int64 [version]")
            read = int(frame.buffers.pop()[0])
        with self.versions.lock.shared():
            return self._rows(frame, self.versions.image_at(read))

    def _rows(self, frame: Frame, image: RowImage | None) -> np.ndarray:
        weighted = bool(frame.flags & Flags.WEIGHTED)
        index = frame.buffers[0].dtype if frame.buffers else None
        expected = (index, index, np.float32)[: 3 if weighted else 2]
        if (
            index not in (np.int32, np.int64)
            or len(frame.buffers) != len(expected)
            or any(b.ndim != 1 or b.dtype != d for b, d in zip(frame.buffers, expected, strict=True))
        ):
            raise BadSubrequest(
                "a lookup carries rows and offsets (both int32 or both int64) and optional float32 weights"
            )
        rows, offsets = frame.buffers[0], frame.buffers[1]
        if frame.flags & Flags.RAW:
            values = self.store.raw(rows, image)
        else:
            values = self.store.pooled(rows, offsets, frame.buffers[2] if weighted else None, image)
        return values


def _json(value: Any) -> np.ndarray:
    return np.frombuffer(json.dumps(value).encode(), dtype=np.uint8)


def _credit_buffers(frame: Frame) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A control connection's CREDIT: int64 data connection ids (k), grants >= 0 (k), sent at (1)."""
    buffers = frame.buffers
    if not (
        len(buffers) == 3
        and all(b.dtype == np.int64 and b.ndim == 1 for b in buffers)
        and buffers[0].size == buffers[1].size
        and buffers[2].size == 1
        and (buffers[1] >= 0).all()
    ):
        raise ProtocolError("a CREDIT is int64 [ids (k), grants >= 0 (k), sent at ns (1)]")
    return buffers[0], buffers[1], buffers[2]
