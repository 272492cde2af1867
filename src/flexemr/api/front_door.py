"""The ranker process's front door: every request, HTTP or gRPC, enters through it.

    front end (decode)           FrontDoor                                   front end (encode)
    model name/version   ->  check_model        (UNKNOWN_MODEL)
    deadline             ->  request(timeout)   admission.arrive  (REFUSED)
    body read                    |
    worker thread        ->  score(ticket, version, decode):
                                 one turn: ticket.check (DEADLINE, DISCONNECTED), decode (INVALID_INPUT),
                                 admission.admit (REFUSED), the version's ranker (SERVER_UNAVAILABLE, ...)
    any exception        ->  failure(exc) -> Failure(kind, message)   ->  kind -> status table

It owns what is per process, not per model version: the admission bound, the turns (one
interpreter lock), the default deadline and the loaded versions. Front ends only decode, encode
and map an `ErrorKind` to their status codes.
"""

from __future__ import annotations

import enum
import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np

from flexemr.api.kserve import InferRequest, parse_decimal
from flexemr.batch import InvalidRequest
from flexemr.config import RankerConfig
from flexemr.ranker.admission import Admission, Dropped, Refused, Ticket
from flexemr.ranker.model_versions import ModelVersionConflict, ModelVersions, UnknownModelVersion
from flexemr.ranker.ranker import Ranker
from flexemr.ranker.row_versions import WAIT_S
from flexemr.ranker.turns import PROCESS_TURNS
from flexemr.transport.base import LookupFailed, ServerUnavailable

log = logging.getLogger(__name__)

MAX_REQUESTS_BEING_READ = 64
"""Requests whose bodies are being received or parsed at once (each at most the body limit)."""


class ErrorKind(enum.StrEnum):
    INVALID_INPUT = "invalid_input"
    UNKNOWN_MODEL = "unknown_model"
    TOO_LARGE = "too_large"
    UNAUTHORIZED = "unauthorized"
    FORBIDDEN = "forbidden"
    CONFLICT = "conflict"
    REFUSED = "refused"
    DEADLINE = "deadline"
    DISCONNECTED = "disconnected"
    SERVER_UNAVAILABLE = "server_unavailable"
    LOOKUP_FAILED = "lookup_failed"
    INTERNAL = "internal"


class Rejected(Exception):
    """A request turned away by a front end before it reached the model (a body over the limit, a
    missing admin token), with its kind."""

    def __init__(self, kind: ErrorKind, message: str) -> None:
        super().__init__(message)
        self.kind = kind


def classify(exc: BaseException) -> ErrorKind:
    """What went wrong, in the words every front end maps to its status codes."""
    if isinstance(exc, Rejected):
        return exc.kind
    if isinstance(exc, InvalidRequest):
        return ErrorKind.INVALID_INPUT
    if isinstance(exc, UnknownModelVersion):
        return ErrorKind.UNKNOWN_MODEL
    if isinstance(exc, ModelVersionConflict):
        return ErrorKind.CONFLICT
    if isinstance(exc, Refused):
        return ErrorKind.REFUSED
    if isinstance(exc, Dropped):
        return ErrorKind.DEADLINE if exc.reason == "deadline" else ErrorKind.DISCONNECTED
    if isinstance(exc, ServerUnavailable):
        return ErrorKind.SERVER_UNAVAILABLE
    if isinstance(exc, LookupFailed):
        return ErrorKind.LOOKUP_FAILED
    return ErrorKind.INTERNAL


@dataclass(frozen=True)
class Failure:
    kind: ErrorKind
    message: str


@dataclass(frozen=True)
class Scored:
    request: InferRequest
    scores: np.ndarray
    version: str
    """The model version that scored them."""


MIN_ROW_VERSION = "flexemr-min-row-version"
"""HTTP header and gRPC metadata key: score with rows at this row version or later (the `version`
a row update answered); the ranker syncs first, within the request's deadline (10 s at most),
else 503 / UNAVAILABLE."""


def min_row_version_of(text: str | None) -> int | None:
    """The row version a request needs at least (its Flexemr-Min-Row-Version), or None."""
    return None if text is None else parse_decimal(text, "header Flexemr-Min-Row-Version")


def _await_rows(ranker: Ranker, min_row_version: int, ticket: Ticket) -> None:
    """Wait (outside any turn, within the request's deadline) until `ranker` reads row version
    `min_row_version` or later (`BehindVersion`, a 503, if it does not): read-your-writes for a
    client that carries the version a push answered, through whichever ranker of the cluster."""
    if ranker.row_version is None:
        raise InvalidRequest(
            "header Flexemr-Min-Row-Version: this model's rows take no updates (they have no versions)"
        )
    remaining = max(0.0, ticket.deadline - time.monotonic())
    ranker.row_version.require(min_row_version, min(remaining, WAIT_S))


class FrontDoor:
    def __init__(self, models: ModelVersions, config: RankerConfig) -> None:
        self.models = models
        self.config = config
        self.model_name = config.model_name
        self.admission = Admission(config.in_flight_limit, MAX_REQUESTS_BEING_READ)
        self.turns = PROCESS_TURNS

    def check_model(self, name: str, version: str = "") -> None:
        """`Rejected` (UNKNOWN_MODEL) unless this process serves model `name` at `version` ("": any)."""
        if name != self.model_name:
            raise Rejected(
                ErrorKind.UNKNOWN_MODEL, f"unknown model {name!r}; this server serves {self.model_name!r}"
            )
        loaded = self.models.names()
        if version and version not in loaded:
            raise Rejected(ErrorKind.UNKNOWN_MODEL, f"model {name!r} has versions {loaded}, not {version!r}")

    @contextmanager
    def request(self, timeout_s: float | None = None) -> Iterator[Ticket]:
        """A place for one request (`Refused` at once when the process is full), with its deadline
        (`timeout_s` from now; None: the configured default), freed when the block ends."""
        ticket = self.admission.arrive(self.config.deadline_s if timeout_s is None else timeout_s)
        try:
            yield ticket
        finally:
            self.admission.release(ticket)

    def refusal(self, waited_s: float = 0.0) -> Refused | None:
        """The refusal a request whose headers were just read gets (counted), when the process is
        full or the request already waited `waited_s` too long before they were read: front ends
        answer it before reading the body. None: `request` may still refuse it."""
        return self.admission.refusal(waited_s)

    def score(
        self,
        ticket: Ticket,
        version: str,
        decode: Callable[[], InferRequest],
        min_row_version: int | None = None,
    ) -> Scored:
        """Decode and score one request in one turn, on `version` ("": the serving one), which it
        holds until it is answered, with rows at `min_row_version` or later (None: the ranker's
        current ones). Call it in a worker thread: it computes."""
        with self.models.use(version) as chosen:
            if min_row_version is not None:
                _await_rows(chosen.ranker, min_row_version, ticket)
            with self.turns.turn():
                ticket.check()  # the turn may have come late
                request = decode()
                dense = request.tensors["dense_features"]
                self.admission.admit(ticket, dense.shape[0])
                indices, lengths = request.tensors["sparse_indices"], request.tensors["sparse_lengths"]
                return Scored(request, chosen.ranker.score(dense, indices, lengths, ticket), chosen.name)

    def failure(self, exc: BaseException) -> Failure:
        """The kind and message of a failed request; what broke inside is logged."""
        kind = classify(exc)
        if isinstance(exc, Dropped):
            self.admission.dropped(exc)
        if kind is ErrorKind.DEADLINE:
            return Failure(kind, f"{exc}; nothing was computed")
        if kind in (ErrorKind.SERVER_UNAVAILABLE, ErrorKind.LOOKUP_FAILED):
            return Failure(kind, f"lookup failed, nothing was scored: {exc}")
        if kind is ErrorKind.INTERNAL:
            log.error("request failed", exc_info=exc)
            return Failure(kind, "internal error; see the ranker's log")
        return Failure(kind, str(exc))

    def stats(self) -> dict[str, Any]:
        return {**self.models.stats(), "admission": self.admission.stats()}
