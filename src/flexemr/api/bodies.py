"""Request bodies read with a bound: refused as soon as they pass it (chunked or not)."""

from __future__ import annotations

from starlette.requests import Request


class BodyTooLarge(Exception):
    pass


async def read_body(request: Request, limit: int) -> bytearray:
    """The body, chunked or not, into one buffer; `BodyTooLarge` as soon as it passes `limit`."""
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise BodyTooLarge
    return body
