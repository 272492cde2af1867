"""The handshake that opens every ranker <-> embedding server connection: mutual HMAC proof of a
shared secret, then the server's identity checked against the ranker's plan.

    ranker                                        embedding server
      HELLO Hello(role, session, conn, credits, nonce_c)  -->
                                                     <--  HELLO Welcome(identity, nonce_s, proof_s)
                                                            proof_s = HMAC(k, "server", nonce_c,
                                                                           nonce_s, identity)
      checks proof_s (only a holder of the secret can make it) and the identity (model and plan)
      AUTH {proof: HMAC(k, "client", nonce_c, nonce_s)}   -->
                                                     <--  AUTH (accepted), or ERROR and close

Both sides pick a fresh 32-byte nonce, so no proof can be replayed; the two proofs are labelled
differently, so a server's proof can never be reflected back as a client's. Nothing but HELLO and
AUTH is read before the client's proof checks out. With no secret configured the key is empty:
the handshake still checks identities, but proves nothing (servers then bind loopback only).
The messages are small JSON objects in one uint8 buffer, validated field by field on decode.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
import socket
from dataclasses import asdict, dataclass
from typing import Any, Literal

import numpy as np

from flexemr.config import FrameLimits
from flexemr.config.security import Identity
from flexemr.protocol.frames import (
    MessageType,
    ProtocolError,
    encode,
    error_frame,
    error_text,
    recv_frame,
    send_frame,
)

Role = Literal["data", "control"]
NONCE_BYTES = 32
MAX_CREDITS = 1 << 16
"""The most response credits a data connection may ask for: bounds what a server holds for it."""


class HandshakeRefused(Exception):
    """The peer failed the handshake: it holds another secret, or another shard set or model."""


class NotAuthenticated(HandshakeRefused):
    """The peer could not prove the shared secret."""


class IdentityMismatch(HandshakeRefused):
    """The server proved the secret but holds other shards or another model than the plan says."""


@dataclass(frozen=True)
class Hello:
    """ranker -> server: what this connection is for, and the ranker's nonce."""

    role: Role
    session: str
    nonce: str
    conn: int = 0
    """The data connection's id within the session (named by CREDIT frames)."""
    credits: int | None = None
    """Response credits the data connection starts with; None: no flow control."""

    def __post_init__(self) -> None:
        _check(self.role in ("data", "control"), f"role must be data or control, got {self.role!r}")
        _check(_is_text(self.session, 64), "session must be a string of at most 64 characters")
        _check(_is_nonce(self.nonce), "nonce must be 64 hex digits")
        _check(_is_int(self.conn) and self.conn >= 0, "conn must be a non-negative integer")
        _check(
            self.credits is None or (_is_int(self.credits) and 1 <= self.credits <= MAX_CREDITS),
            f"credits must be null or 1..{MAX_CREDITS}",
        )


@dataclass(frozen=True)
class Welcome:
    """server -> ranker: the server's identity, its nonce, and its proof of the secret."""

    identity: Identity
    nonce: str
    proof: str

    def __post_init__(self) -> None:
        ident = self.identity
        _check(
            all(_is_int(v) and v >= 0 for v in (ident.server, ident.rows, ident.dim)),
            "server, rows and dim must be non-negative integers",
        )
        _check(_is_text(ident.fingerprint, 128), "fingerprint must be a string of at most 128 characters")
        _check(_is_nonce(self.nonce) and _is_nonce(self.proof), "nonce and proof must be 64 hex digits")


def new_nonce() -> str:
    return secrets.token_hex(NONCE_BYTES)


def server_proof(key: bytes, hello: Hello, nonce: str, identity: Identity) -> str:
    ident = json.dumps(asdict(identity), sort_keys=True)
    return _mac(key, "server", hello.nonce, nonce, ident)


def client_proof(key: bytes, hello: Hello, welcome: Welcome) -> str:
    return _mac(key, "client", hello.nonce, welcome.nonce)


def _mac(key: bytes, *parts: str) -> str:
    return hmac.new(key, "\0".join(parts).encode(), hashlib.sha256).hexdigest()


# -- the two sides, on blocking sockets ------------------------------------------------------------------


def client_handshake(
    sock: socket.socket,
    hello: Hello,
    key: bytes,
    limits: FrameLimits,
    expected: Identity | None = None,
) -> Identity:
    """Open a connection as `hello` says; return the server's identity. Raises NotAuthenticated
    (the server cannot prove the secret, or refused ours) or IdentityMismatch (not `expected`)."""
    send_frame(sock, encode(MessageType.HELLO, 0, [_pack(asdict(hello))]))
    reply = recv_frame(sock, limits)
    if reply.type == MessageType.ERROR:
        raise NotAuthenticated(f"the server refused the handshake: {error_text(reply)}")
    welcome = decode_welcome(_one(reply.type, MessageType.HELLO, reply.buffers))
    if not hmac.compare_digest(welcome.proof, server_proof(key, hello, welcome.nonce, welcome.identity)):
        raise NotAuthenticated(
            "the server could not prove the shared secret: is it a flexemr server of this cluster?"
        )
    if expected is not None and welcome.identity != expected:
        raise IdentityMismatch(
            f"the server says it is {welcome.identity}, but the plan expects {expected}: "
            "is it serving this model and this sharding plan (the same cluster spec everywhere)?"
        )
    send_frame(sock, encode(MessageType.AUTH, 0, [_pack({"proof": client_proof(key, hello, welcome)})]))
    answer = recv_frame(sock, limits)
    if answer.type == MessageType.ERROR:
        raise NotAuthenticated(f"the server refused our proof: {error_text(answer)}")
    if answer.type != MessageType.AUTH:
        raise ProtocolError(f"expected AUTH, got {answer.type.name}")
    return welcome.identity


def server_handshake(sock: socket.socket, identity: Identity, key: bytes, limits: FrameLimits) -> Hello:
    """Answer a client's HELLO and check its proof; return its Hello. Raises NotAuthenticated
    (after telling the client) or ProtocolError."""
    frame = recv_frame(sock, limits)
    hello = decode_hello(_one(frame.type, MessageType.HELLO, frame.buffers))
    nonce = new_nonce()
    welcome = Welcome(identity, nonce, server_proof(key, hello, nonce, identity))
    send_frame(sock, encode(MessageType.HELLO, 0, [_pack(asdict(welcome))]))
    frame = recv_frame(sock, limits)
    proof = _fields(_one(frame.type, MessageType.AUTH, frame.buffers), {"proof"})["proof"]
    if not (_is_nonce(proof) and hmac.compare_digest(proof, client_proof(key, hello, welcome))):
        send_frame(sock, error_frame(0, "not authenticated: the client could not prove the shared secret"))
        raise NotAuthenticated("the client could not prove the shared secret")
    send_frame(sock, encode(MessageType.AUTH, 0, []))
    return hello


# -- encoding -------------------------------------------------------------------------------------------


def decode_hello(raw: bytes) -> Hello:
    fields = _fields(raw, {"role", "session", "nonce", "conn", "credits"})
    hello: Hello = _build(Hello, fields)
    return hello


def decode_welcome(raw: bytes) -> Welcome:
    fields = _fields(raw, {"identity", "nonce", "proof"})
    ident = fields["identity"]
    if not isinstance(ident, dict) or set(ident) != {"server", "rows", "dim", "fingerprint"}:
        raise ProtocolError("identity must have exactly server, rows, dim and fingerprint")
    welcome: Welcome = _build(Welcome, {**fields, "identity": Identity(**ident)})
    return welcome


def _build(cls: Any, fields: dict[str, Any]) -> Any:
    try:
        return cls(**fields)
    except (TypeError, ProtocolError) as exc:
        raise ProtocolError(f"bad {cls.__name__}: {exc}") from None


def _pack(value: dict[str, Any]) -> np.ndarray:
    return np.frombuffer(json.dumps(value).encode(), dtype=np.uint8)


def _one(kind: MessageType, expected: MessageType, buffers: list[np.ndarray]) -> bytes:
    if kind != expected or len(buffers) != 1 or buffers[0].dtype != np.uint8 or buffers[0].ndim != 1:
        raise ProtocolError(f"expected {expected.name} with one byte buffer, got {kind.name}")
    if buffers[0].size > 4096:
        raise ProtocolError(f"a {expected.name} message is at most 4096 bytes")
    return buffers[0].tobytes()


def _fields(raw: bytes, allowed: set[str]) -> dict[str, Any]:
    try:
        value = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise ProtocolError("a handshake message is a JSON object") from None
    if not isinstance(value, dict) or not set(value) <= allowed:
        raise ProtocolError(f"a handshake message is a JSON object with fields among {sorted(allowed)}")
    return value


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ProtocolError(message)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value < 2**63


def _is_text(value: Any, most: int) -> bool:
    return isinstance(value, str) and 0 < len(value) <= most


def _is_nonce(value: Any) -> bool:
    return (
        isinstance(value, str)
        and len(value) == 2 * NONCE_BYTES
        and all(c in "0123456789abcdef" for c in value)
    )
