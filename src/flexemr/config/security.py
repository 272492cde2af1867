"""Who a node is: the shared secret, the fingerprint of what a server holds, TLS contexts."""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import hmac
import ipaddress
import json
import os
import socket
import ssl
from dataclasses import dataclass
from pathlib import Path

from flexemr.config import SecurityConfig
from flexemr.config.model import ModelSource
from flexemr.config.plan import ShardingPlan
from flexemr.config.spec import ClusterSpec


@dataclass(frozen=True)
class Identity:
    """What an embedding server holds: its index in the plan, its rows, the columns of its answers
    (its widest shard's), and a fingerprint of its shards and weights
    (`flexemr.config.security.fingerprint`)."""

    server: int
    rows: int
    dim: int
    fingerprint: str


def load_secret(config: SecurityConfig) -> bytes | None:
    """The cluster's shared secret, from its file or the environment; None when neither is set."""
    if config.secret_file is not None:
        secret = Path(config.secret_file).read_bytes().strip()
        if not secret:
            raise ValueError(f"the secret file {config.secret_file} is empty")
        return secret
    value = os.environ.get(config.secret_env, "").strip()
    return value.encode() if value else None


def admin_token(secret: bytes) -> str:
    """The bearer token of the ranker's admin API (model load/unload, row updates): derived from the
    cluster secret, so a holder of the secret can compute it, while the token itself, sent over
    HTTP, does not give away the secret that node links prove."""
    return hmac.new(secret, b"flexemr admin api v1", hashlib.sha256).hexdigest()


def fingerprint(model: ModelSource, plan: ShardingPlan, server: int) -> str:
    """A digest of the shards `server` holds and of the weights they come from.

    A preset's tables are fixed by its name, row scale and seed; a checkpoint's by its bytes
    (hashed once per process and file version); the row formats decide the stored bytes. The dense
    model's options (interaction, pooling) are the ranker's alone. Two servers agree only when they
    would serve the same rows."""
    weights: dict[str, object] = {"preset": model.preset, "row_scale": model.row_scale, "seed": model.seed}
    if model.checkpoint is not None:
        path = Path(model.checkpoint).resolve()
        stat = path.stat()
        weights = {"checkpoint": _file_digest(str(path), stat.st_size, stat.st_mtime_ns)}
    # A whole-width shard is fingerprinted without its columns, as before column-wise sharding, so
    # update logs written by then still match.
    shards = [
        dataclasses.astuple(s)[: 5 if (s.col_start, s.col_end) == (0, None) else None]
        for s in plan.shards_of(server)
    ]
    facts = {
        "weights": weights,
        "row_dtype": model.row_dtype,
        "dim": plan.dim,
        "tables": plan.table_rows,
        "shards": shards,
    }
    return hashlib.sha256(json.dumps(facts, sort_keys=True).encode()).hexdigest()


@functools.lru_cache(maxsize=8)
def _file_digest(path: str, size: int, mtime_ns: int) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "blake2b").hexdigest()


def identities(spec: ClusterSpec) -> list[Identity]:
    """What each embedding server of `spec` must prove it holds."""
    plan = spec.sharding
    return [
        Identity(s, plan.server_rows(s), plan.server_width(s), fingerprint(spec.model, plan, s))
        for s in range(plan.num_servers)
    ]


def check_bind(host: str, secret: bytes | None, transport: str = "tcp") -> None:
    """Without a secret a server proves nothing, so it may listen on loopback only; a UCX
    listener accepts on every interface (ucxx has no bind address), so it needs the secret."""
    if secret is not None:
        return
    if transport == "ucx":
        raise ValueError(
            "refusing to serve --transport ucx without a shared secret: a UCX listener accepts on "
            "every interface (it has no bind address); set one (--secret-file, or the FLEXEMR_SECRET "
            "environment variable)"
        )
    addresses = {str(info[4][0]).split("%")[0] for info in socket.getaddrinfo(host, None)}
    if not all(ipaddress.ip_address(a).is_loopback for a in addresses):
        raise ValueError(
            f"refusing to listen on {host} without a shared secret: set one (--secret-file, or the "
            "FLEXEMR_SECRET environment variable) or bind a loopback address"
        )


def server_tls(config: SecurityConfig) -> ssl.SSLContext | None:
    """Mutual TLS, server side: our certificate, and clients' checked against the CA."""
    if not config.tls:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=config.tls_ca)
    context.load_cert_chain(str(config.tls_cert), str(config.tls_key))
    context.verify_mode = ssl.CERT_REQUIRED
    return context


def client_tls(config: SecurityConfig) -> ssl.SSLContext | None:
    """Mutual TLS, ranker side: the server's certificate must name the host we dial."""
    if not config.tls:
        return None
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=config.tls_ca)
    context.load_cert_chain(str(config.tls_cert), str(config.tls_key))
    return context
