"""A blocking request/answer connection to one embedding server, for rare messages: updates,
commits, changelogs. Lookups never use it (they go through the I/O threads); it is authenticated
like every node link, opened on first use and opened again after a failure."""

from __future__ import annotations

import itertools
import socket
import threading
import uuid
from collections.abc import Sequence

import numpy as np

from flexemr.config import Endpoint
from flexemr.config.security import Identity, client_tls, identities, load_secret
from flexemr.config.spec import ClusterSpec
from flexemr.engine.dial import Dialer
from flexemr.protocol.answers import SubrequestRefused, answer_or_raise
from flexemr.protocol.frames import (
    Frame,
    MessageType,
    ProtocolError,
    encode,
    recv_frame,
    send_frame,
)
from flexemr.protocol.updates import Changes, RowsCopy, StagedRows, commit_buffer, version_buffer
from flexemr.transport.base import ServerUnavailable


class ServerLink:
    def __init__(
        self, dialer: Dialer, endpoint: Endpoint, identity: Identity, timeout_s: float = 30.0
    ) -> None:
        self.server = identity.server
        self.endpoint = endpoint
        self._dialer = dialer
        self._identity = identity
        self._timeout_s = timeout_s
        self._sock: socket.socket | None = None
        self._lock = threading.Lock()
        self._ids = itertools.count(1)

    def request(self, msg_type: MessageType, buffers: Sequence[np.ndarray]) -> Frame:
        """Send one message and return its answer. Raises ServerUnavailable (not reachable, or no
        answer within the timeout), Stale (the server answered STALE: its version is not the one
        the message names) or SubrequestRefused (an ERROR, with the server's reason)."""
        with self._lock:
            request_id = next(self._ids)
            # A connection kept from before may have died with its server (restarted since):
            # one more try on a fresh one (every message is idempotent).
            for fresh in (self._sock is None, True):
                try:
                    if self._sock is None:
                        self._sock = self._dialer.open(
                            self.endpoint, self._identity, "data", timeout_s=self._timeout_s
                        )
                    send_frame(self._sock, encode(msg_type, request_id, buffers))
                    frame = recv_frame(self._sock, self._dialer.limits)
                    break
                except (OSError, ProtocolError) as exc:
                    self._close()
                    if fresh:
                        raise ServerUnavailable(
                            self.server, str(self.endpoint), str(exc) or type(exc).__name__
                        ) from None
        answer = MessageType.RESULT if msg_type == MessageType.LOOKUP else msg_type
        answer_or_raise(frame, answer, self.server)
        if frame.request_id != request_id:
            raise SubrequestRefused(
                f"embedding server {self.server}: answer to request {frame.request_id}, not {request_id}"
            )
        return frame

    def changes(self, since: int) -> Changes:
        """The server's version and what its commits after `since` changed."""
        return Changes.parse(self.request(MessageType.CHANGES, [version_buffer(since)]))

    def stage(self, staged: StagedRows) -> int:
        """UPDATE; 0 (staged), or the version that already applied its (source, sequence)."""
        return int(self.request(MessageType.UPDATE, staged.buffers()).buffers[0][0])

    def commit(self, version: int, token: int, written: np.ndarray) -> int:
        """COMMIT (version, token) with its write set; returns the version the update is applied
        at (Stale: taken, or behind; SubrequestRefused: this server cannot commit it)."""
        return int(self.request(MessageType.COMMIT, [commit_buffer(version, token, written)]).buffers[0][1])

    def abort(self, version: int, token: int) -> bool:
        """ABORT (version, token); True when that attempt is committed on this server."""
        return bool(self.request(MessageType.ABORT, [version_buffer(version, token)]).buffers[0][0])

    def rows(self, version: int, start: int, stop: int) -> RowsCopy:
        """The server's local rows [start, stop) as stored at committed `version` (what a server
        resyncing from this replica copies; Stale when it cannot answer at that version)."""
        return RowsCopy.parse(self.request(MessageType.ROWS, [version_buffer(version, start, stop)]))

    def catch_up(self, version: int, decided: Changes) -> None:
        """Commit on this server, at `version`, the versions after it that `decided` (an up-to-date
        server's changelog since at most `version`) lists, in order: what a committer that died
        half-way, or this server's downtime, left undone."""
        for i, v in enumerate(decided.versions.tolist()):
            if v > version:
                self.commit(v, int(decided.tokens[i]), decided.written[i])

    def _close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def close(self) -> None:
        with self._lock:
            self._close()


def links(spec: ClusterSpec, timeout_s: float = 30.0) -> list[ServerLink]:
    """One link per embedding server of `spec` (nothing is opened yet)."""
    dialer = Dialer(
        uuid.uuid4().hex, load_secret(spec.security) or b"", spec.frames, client_tls(spec.security)
    )
    return [
        ServerLink(dialer, endpoint, identity, timeout_s)
        for endpoint, identity in zip(spec.embedding_servers, identities(spec), strict=True)
    ]
