"""`answer_or_raise`: a server's answer, or the exception its ERROR or STALE stands for."""

from __future__ import annotations

import io

import numpy as np
import pytest

from flexemr.config import FrameLimits
from flexemr.protocol.answers import LookupFailed, Stale, SubrequestRefused, answer_or_raise
from flexemr.protocol.frames import Frame, MessageType, error_frame, read_frame


def frame(kind: MessageType, *buffers: np.ndarray) -> Frame:
    return Frame(kind, 7, 0, list(buffers))


def test_the_expected_answer_comes_back_unchanged() -> None:
    result = frame(MessageType.RESULT, np.ones((2, 4), dtype=np.float32))
    assert answer_or_raise(result, MessageType.RESULT, server=3) is result
    pong = frame(MessageType.PONG)
    assert answer_or_raise(pong, MessageType.PONG, server=3) is pong


def test_an_error_raises_with_the_servers_reason() -> None:
    wire = b"".join(error_frame(7, "embedding server 1: row 99 is outside this server's 10 rows"))
    error = read_frame(io.BytesIO(wire).readinto, FrameLimits())  # as a client receives it
    with pytest.raises(SubrequestRefused, match="row 99 is outside this server's 10 rows"):
        answer_or_raise(error, MessageType.RESULT, server=1)
    with pytest.raises(SubrequestRefused, match="unknown error"):
        answer_or_raise(frame(MessageType.ERROR), MessageType.COMMIT, server=1)


def test_a_stale_answer_raises_with_the_servers_version() -> None:
    stale = frame(MessageType.STALE, np.array([41], dtype=np.int64))
    with pytest.raises(Stale, match="embedding server 2 is at version 41") as caught:
        answer_or_raise(stale, MessageType.RESULT, server=2)
    assert (caught.value.server, caught.value.version) == (2, 41)
    assert isinstance(caught.value, LookupFailed) and not isinstance(caught.value, SubrequestRefused)


@pytest.mark.parametrize(
    "buffers",
    [
        [],
        [np.array([1, 2], dtype=np.int64)],
        [np.array([1.0], dtype=np.float32)],
        [np.zeros(1, np.int64)] * 2,
    ],
)
def test_a_malformed_stale_answer_is_refused_not_trusted(buffers: list[np.ndarray]) -> None:
    with pytest.raises(SubrequestRefused, match="malformed STALE"):
        answer_or_raise(frame(MessageType.STALE, *buffers), MessageType.RESULT, server=0)


def test_any_other_answer_is_refused_naming_what_was_expected() -> None:
    with pytest.raises(SubrequestRefused, match="server 5: unexpected PONG answer \\(expected RESULT\\)"):
        answer_or_raise(frame(MessageType.PONG), MessageType.RESULT, server=5)
    with pytest.raises(SubrequestRefused, match="unexpected RESULT answer \\(expected COMMIT\\)"):
        answer_or_raise(frame(MessageType.RESULT, np.zeros((1, 1), np.float32)), MessageType.COMMIT, 5)


def test_the_transport_exports_the_same_exceptions() -> None:
    """Callers catch them from `flexemr.transport.base`: the very classes the answers raise."""
    from flexemr.transport import base

    assert (base.LookupFailed, base.Stale, base.SubrequestRefused) == (LookupFailed, Stale, SubrequestRefused)
