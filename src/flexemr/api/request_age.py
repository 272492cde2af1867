"""How long a request has waited in the kernel before the process read it (Linux TCP_INFO).

Under overload the queue grows before admission can see it: in the listen and receive queues and
behind a busy event loop. The kernel knows when a connection's last bytes came; admission uses it
to refuse requests that already waited too long (`flexemr.ranker.latency_limit.WaitBound`).
"""

from __future__ import annotations

import asyncio
import socket
import struct

_TCP_INFO = getattr(socket, "TCP_INFO", None)  # Linux only
_LAST_DATA_RECV = struct.Struct("=I")
_LAST_DATA_RECV_OFFSET = 52
"""Of tcpi_last_data_recv (milliseconds since the last data came) in `struct tcp_info`."""


def waited_s(transport: asyncio.BaseTransport) -> float:
    """Seconds since `transport`'s last received bytes came (0 where the kernel does not say): for
    a request whose headers were just read, how long it waited to be read."""
    sock = transport.get_extra_info("socket")
    if _TCP_INFO is None or sock is None:
        return 0.0
    try:
        info = sock.getsockopt(socket.IPPROTO_TCP, _TCP_INFO, _LAST_DATA_RECV_OFFSET + 4)
    except OSError:
        return 0.0
    if len(info) < _LAST_DATA_RECV_OFFSET + 4:
        return 0.0
    return float(_LAST_DATA_RECV.unpack_from(info, _LAST_DATA_RECV_OFFSET)[0]) / 1000
