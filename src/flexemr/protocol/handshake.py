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
differently, so a server's proof can never be reflected back as a client's. With no secret
configured the key is empty: the handshake still checks identities, but proves nothing (servers
then bind loopback only). The messages are small JSON objects in one uint8 buffer, validated field
by field on decode.

What a peer costs before its proof is bounded on both sides: the whole handshake must end by a
`Deadline` (every read and write gets only the time left), a message of another type than the step
expects, or whose header declares more than `MAX_HANDSHAKE_BYTES`, is refused from its header
before its body is read (so nothing but HELLO and AUTH is ever read before the proof), and a server
answers a broken handshake with one ERROR and closes.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
import socket
import time
from dataclasses import asdict, dataclass
from typing import Any, Literal

import numpy as np

from flexemr.config import FrameLimits
from flexemr.config.security import Identity
from flexemr.protocol.frames import (
    Frame,
    MessageType,
    ProtocolError,
    encode,
    error_frame,
    error_text,
    read_frame,
    send_frame,
)

Role = Literal["data", "control"]
NONCE_BYTES = 32
MAX_CREDITS = 1 << 16
"""The most response credits a data connection may ask for: bounds what a server holds for it."""
MAX_HANDSHAKE_BYTES = 4096
"""The most bytes of a handshake message: a header that declares more is refused from the header."""
MAX_REASON_CHARS = 256
"""How much of a refusal's reason goes into the ERROR answer (a peer's own values may be quoted)."""


class HandshakeRefused(Exception):
    """The peer failed the handshake: it holds another secret, or another shard set or model."""


class NotAuthenticated(HandshakeRefused):
    """The peer could not prove the shared secret."""


class IdentityMismatch(HandshakeRefused):
    """The server proved the secret but holds other shards or another model than the plan says."""


class HandshakeTimeout(TimeoutError):
    """The handshake did not end by its deadline."""


@dataclass(frozen=True)
class Deadline:
    """When a whole handshake must be over (`time.monotonic()` seconds). Every read and write gets
    only the time left, so a peer that sends a byte now and then cannot stretch the handshake."""

    at: float

    @classmethod
    def after(cls, seconds: float) -> Deadline:
        return cls(time.monotonic() + seconds)

    def arm(self, sock: socket.socket) -> None:
        """Give `sock` the time left as its timeout; HandshakeTimeout when none is left."""
        left = self.at - time.monotonic()
        if left <= 0:
            raise HandshakeTimeout("the handshake did not end by its deadline")
        sock.settimeout(left)


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
    deadline: Deadline | None = None,
) -> Identity:
    """Open a connection as `hello` says; return the server's identity. Raises NotAuthenticated
    (the server cannot prove the secret, or refused ours), IdentityMismatch (not `expected`),
    ProtocolError, or HandshakeTimeout past `deadline` (None: the socket's own timeout, per read).
    The server's messages are held to `limits` and to MAX_HANDSHAKE_BYTES."""
    messages = _Messages(sock, limits, deadline)
    messages.send(encode(MessageType.HELLO, 0, [_pack(asdict(hello))]))
    reply = messages.receive(MessageType.HELLO, MessageType.ERROR)
    if reply.type == MessageType.ERROR:
        raise NotAuthenticated(f"the server refused the handshake: {error_text(reply)}")
    welcome = decode_welcome(_body(reply))
    if not hmac.compare_digest(welcome.proof, server_proof(key, hello, welcome.nonce, welcome.identity)):
        raise NotAuthenticated(
            "the server could not prove the shared secret: is it a flexemr server of this cluster?"
        )
    if expected is not None and welcome.identity != expected:
        raise IdentityMismatch(
            f"the server says it is {welcome.identity}, but the plan expects {expected}: "
            "is it serving this model and this sharding plan (the same cluster spec everywhere)?"
        )
    messages.send(encode(MessageType.AUTH, 0, [_pack({"proof": client_proof(key, hello, welcome)})]))
    answer = messages.receive(MessageType.AUTH, MessageType.ERROR)
    if answer.type == MessageType.ERROR:
        raise NotAuthenticated(f"the server refused our proof: {error_text(answer)}")
    return welcome.identity


def server_handshake(
    sock: socket.socket,
    identity: Identity,
    key: bytes,
    limits: FrameLimits,
    deadline: Deadline | None = None,
) -> Hello:
    """Answer a client's HELLO and check its proof; return its Hello. A client that breaks the
    handshake gets one ERROR (as far as the deadline allows), then NotAuthenticated or
    ProtocolError is raised; HandshakeTimeout past `deadline`, ConnectionClosed if it hangs up."""
    messages = _Messages(sock, limits, deadline)
    try:
        hello = decode_hello(_body(messages.receive(MessageType.HELLO)))
        nonce = new_nonce()
        welcome = Welcome(identity, nonce, server_proof(key, hello, nonce, identity))
        messages.send(encode(MessageType.HELLO, 0, [_pack(asdict(welcome))]))
        proof = decode_proof(_body(messages.receive(MessageType.AUTH)))
        if not hmac.compare_digest(proof, client_proof(key, hello, welcome)):
            raise NotAuthenticated("the client could not prove the shared secret")
    except NotAuthenticated as exc:
        messages.refuse(f"not authenticated: {exc}")
        raise
    except ProtocolError as exc:
        messages.refuse(f"malformed handshake: {exc}")
        raise
    messages.send(encode(MessageType.AUTH, 0, []))
    return hello


class _Messages:
    """The handshake's messages on one socket: every read and write within the deadline, every
    message of the expected type and at most MAX_HANDSHAKE_BYTES, both checked from its header."""

    def __init__(self, sock: socket.socket, limits: FrameLimits, deadline: Deadline | None) -> None:
        self._sock = sock
        self._deadline = deadline
        most = min(limits.max_frame_bytes, MAX_HANDSHAKE_BYTES)
        self._limits = FrameLimits(max_buffers=1, max_frame_bytes=most, max_dim=most)

    def send(self, views: list[memoryview]) -> None:
        self._arm()
        send_frame(self._sock, views)

    def receive(self, *expected: MessageType) -> Frame:
        return read_frame(self._read_into, self._limits, expected)

    def refuse(self, reason: str) -> None:
        """Tell the peer why, if it still listens; the caller closes the connection."""
        try:
            self.send(error_frame(0, reason[:MAX_REASON_CHARS]))
        except OSError:
            pass

    def _read_into(self, view: memoryview) -> int:
        self._arm()
        return self._sock.recv_into(view)

    def _arm(self) -> None:
        if self._deadline is not None:
            self._deadline.arm(self._sock)


# -- encoding -------------------------------------------------------------------------------------------


def decode_hello(raw: bytes) -> Hello:
    fields = _fields(raw, {"role", "session", "nonce", "conn", "credits"})
    hello: Hello = _build(Hello, fields)
    return hello


def decode_proof(raw: bytes) -> str:
    proof = _fields(raw, {"proof"}).get("proof")
    if not _is_nonce(proof):
        raise ProtocolError('an AUTH message is {"proof": 64 hex digits}')
    return str(proof)


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


def _body(frame: Frame) -> bytes:
    buffers = frame.buffers
    if len(buffers) != 1 or buffers[0].dtype != np.uint8 or buffers[0].ndim != 1:
        raise ProtocolError(f"a {frame.type.name} message is one byte buffer")
    return buffers[0].tobytes()


def _fields(raw: bytes, allowed: set[str]) -> dict[str, Any]:
    try:
        value = json.loads(raw)
    except (ValueError, RecursionError):  # RecursionError: nested deeper than the parser goes
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
