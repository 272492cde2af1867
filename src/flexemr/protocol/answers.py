"""An embedding server's answer, decoded once for every client of a server: the answer itself, or
the exception its ERROR or STALE frame stands for.

    answer_or_raise(frame, MessageType.RESULT, server)
        RESULT            -> the frame
        ERROR  [reason]   -> SubrequestRefused(the server's reason)
        STALE  [version]  -> Stale(server, version)
        anything else     -> SubrequestRefused("unexpected ... answer")

The I/O engine's data connections, the blocking `ServerLink` (updates, commits, changelogs) and the
control channel (heartbeats) all read answers through it, so an ERROR or a STALE means the same
everywhere. The exceptions live here, below every client; `flexemr.transport.base` exports them.
"""

from __future__ import annotations

import numpy as np

from flexemr.protocol.frames import Frame, MessageType, error_text


class LookupFailed(RuntimeError):
    """A subrequest could not complete, for a reason other than an unreachable server."""


class SubrequestRefused(LookupFailed):
    """The server refused the subrequest (it named rows it does not hold...) or answered it with
    a malformed result."""


class Stale(LookupFailed):
    """The server is at another version than the subrequest reads: nothing was looked up."""

    def __init__(self, server: int, version: int) -> None:
        super().__init__(f"embedding server {server} is at version {version}")
        self.server = server
        self.version = version


def answer_or_raise(frame: Frame, expected: MessageType, server: int) -> Frame:
    """`frame` when it is an answer of type `expected` from embedding server `server`; raises
    `SubrequestRefused` for an ERROR (with the server's reason), `Stale` for a STALE (with the
    server's version) and `SubrequestRefused` for any other answer, a malformed STALE included."""
    if frame.type == expected:
        return frame
    if frame.type == MessageType.ERROR:
        raise SubrequestRefused(error_text(frame))
    if frame.type == MessageType.STALE:
        version = frame.buffers[0] if len(frame.buffers) == 1 else None
        if version is not None and version.dtype == np.int64 and version.shape == (1,):
            raise Stale(server, int(version[0]))
        raise SubrequestRefused(f"embedding server {server}: malformed STALE answer (not int64 [version])")
    raise SubrequestRefused(
        f"embedding server {server}: unexpected {frame.type.name} answer (expected {expected.name})"
    )
