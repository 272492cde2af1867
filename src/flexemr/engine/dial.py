"""Opening a connection to an embedding server: TCP, socket options, optional TLS, the handshake."""

from __future__ import annotations

import socket
import ssl
from dataclasses import dataclass
from typing import cast

from flexemr.config import Endpoint, FrameLimits, TransportKind
from flexemr.config.security import Identity
from flexemr.engine.credits import mark_high_priority
from flexemr.protocol.handshake import (
    Deadline,
    HandshakeRefused,
    Hello,
    Role,
    client_handshake,
    new_nonce,
)
from flexemr.transport.base import ConfigMismatch


@dataclass(frozen=True)
class Dialer:
    """Everything the engine needs to open its connections: they all share one session."""

    session: str
    key: bytes
    """The cluster's shared secret (empty: none configured; identities are still checked)."""
    limits: FrameLimits
    tls: ssl.SSLContext | None = None
    transport: TransportKind = "tcp"

    def open(
        self,
        endpoint: Endpoint,
        expected: Identity,
        role: Role,
        conn: int = 0,
        credits: int | None = None,
        timeout_s: float = 5.0,
    ) -> socket.socket:
        """A connected, authenticated socket to the server `expected` describes, blocking with a
        `timeout_s` timeout; connecting and the whole handshake take at most `timeout_s`, whatever
        the peer sends. Raises OSError (HandshakeTimeout past that), ProtocolError, or
        ConfigMismatch when the peer is not that server of this cluster."""
        deadline = Deadline.after(timeout_s)
        sock = self._connect(endpoint, timeout_s)
        try:
            if role == "control":
                mark_high_priority(sock)
            if self.tls is not None:
                deadline.arm(sock)
                sock = self.tls.wrap_socket(sock, server_hostname=endpoint.host)
            hello = Hello(role, self.session, new_nonce(), conn, credits)
            client_handshake(sock, hello, self.key, self.limits, expected, deadline)
            sock.settimeout(timeout_s)
        except HandshakeRefused as exc:
            sock.close()
            raise ConfigMismatch(expected.server, str(endpoint), str(exc)) from exc
        except BaseException:
            sock.close()
            raise
        return sock

    def _connect(self, endpoint: Endpoint, timeout_s: float) -> socket.socket:
        if self.transport == "ucx":
            from flexemr.protocol import ucx_stream

            # A UcxSocket has every socket method the frames, the handshake and the engine use.
            return cast(socket.socket, ucx_stream.connect(endpoint, timeout_s))
        sock = socket.create_connection((endpoint.host, endpoint.port), timeout=timeout_s)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock
