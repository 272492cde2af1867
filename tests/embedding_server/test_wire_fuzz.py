"""Seeded fuzzing of the wire format against a real embedding-server process: malformed frames and
handshakes, before and after authentication, never kill it, and it keeps serving a good client."""

from __future__ import annotations

import json
import random
import socket
from pathlib import Path

import numpy as np
import pytest

from flexemr.config import Endpoint, FrameLimits
from flexemr.config.model import ModelSource
from flexemr.config.spec import ClusterSpec
from flexemr.embedding_server.store import ShardStore
from flexemr.model.source import load_weights, model_spec
from flexemr.protocol.frames import DESCRIPTOR, HEADER, MAGIC, VERSION, MessageType, recv_frame, send_frame
from flexemr.protocol.handshake import Hello, client_handshake, new_nonce
from flexemr.sharding.plan import make_plan
from flexemr.transport.base import LookupRequest
from tests.engine.helpers import dial, lookup_frame, reference, server_process

SECRET = b"fuzzing-secret"
CASES = 240


def random_frame(rng: random.Random) -> bytes:
    """A frame that is well-formed or nearly so: a header, descriptors and bytes, any of them off."""
    count = rng.choice([0, 1, 2, 3, rng.randrange(0, 12)])
    descriptors, body = b"", b""
    for _ in range(count):
        code, ndim = rng.choice([1, 2, 3, 4, 5, rng.randrange(256)]), rng.choice([1, 2, rng.randrange(256)])
        dims = (rng.choice([0, 1, 3, 8, rng.randrange(2**32)]), rng.choice([0, 8, rng.randrange(2**32)]))
        descriptors += DESCRIPTOR.pack(code, ndim, *dims)
        body += rng.randbytes(rng.choice([0, 4, 8, 24, 64]))
    kind = rng.choice([*MessageType, rng.randrange(256)])
    declared = rng.choice([len(body), len(body) + 1, rng.randrange(2**32)])
    magic = MAGIC if rng.random() < 0.9 else rng.randbytes(4)
    header = HEADER.pack(magic, VERSION if rng.random() < 0.9 else rng.randrange(256), kind,
                         rng.randrange(2**16), rng.randrange(2**64), count, declared)  # fmt: skip
    frame = header + descriptors + body
    return frame[: rng.randrange(len(frame) + 1)] if rng.random() < 0.2 else frame


def random_json(rng: random.Random) -> bytes:
    values = [None, True, 1, -1, 2**70, 1.5, "x" * rng.randrange(100), [], {}, "data", "control", new_nonce()]
    keys = ["role", "session", "nonce", "conn", "credits", "proof", "identity", "extra"]
    value = {k: rng.choice(values) for k in rng.sample(keys, rng.randrange(len(keys)))}
    raw = json.dumps(value).encode() if rng.random() < 0.9 else rng.randbytes(rng.randrange(64))
    header = HEADER.pack(MAGIC, VERSION, rng.choice([MessageType.HELLO, MessageType.AUTH]), 0, 0, 1, len(raw))
    return header + DESCRIPTOR.pack(4, 1, len(raw), 0) + raw


def fuzz_one(endpoint: Endpoint, rng: random.Random) -> None:
    """One connection: maybe a real handshake first (data, credited data or control), then junk."""
    stage = rng.randrange(4)
    sock = socket.create_connection((endpoint.host, endpoint.port), timeout=5)
    with sock:
        try:
            if stage == 0:
                sock.sendall(rng.choice([random_json(rng), rng.randbytes(rng.randrange(1, 300))]))
            else:
                role, credits = [("data", None), ("data", 4), ("control", None)][stage - 1]
                hello = Hello(role, f"fuzz{rng.randrange(3)}", new_nonce(), rng.randrange(4), credits)  # type: ignore[arg-type]
                client_handshake(sock, hello, SECRET, FrameLimits())
            for _ in range(rng.randrange(1, 4)):
                sock.sendall(random_frame(rng))
            sock.settimeout(0.05)
            sock.recv(1 << 16)
        except (OSError, ValueError):
            pass


def test_malformed_wire_input_never_kills_the_server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLEXEMR_SECRET", SECRET.decode())
    source = ModelSource(preset="tiny")
    plan = make_plan("table", model_spec(source).table_rows, model_spec(source).dim, 1)
    spec = ClusterSpec(source, plan, (Endpoint(),))
    with server_process(spec, tmp_path, max_fds=1024) as (spec, lines):  # asserts it is alive after
        endpoint = spec.embedding_servers[0]
        rng = random.Random(20261201)
        for _ in range(CASES):
            fuzz_one(endpoint, rng)
        store = ShardStore(spec.sharding, 0, load_weights(spec.model), progress=False)
        with dial(endpoint, SECRET) as good:
            request = LookupRequest(np.array([1, 2, 7], np.int64), np.array([0, 1], np.int64))
            send_frame(good, lookup_frame(1, request))
            frame = recv_frame(good, FrameLimits())
            assert frame.type == MessageType.RESULT
            np.testing.assert_allclose(frame.buffers[0], reference(store, request), rtol=1e-6)
    assert not any("Traceback" in line for line in lines), "".join(lines[-40:])
    assert any("malformed frame" in line for line in lines)  # the fuzz reached the frame checks
