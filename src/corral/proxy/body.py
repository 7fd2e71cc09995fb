"""Reading a request body within the limits: size, time, and a JSON content type."""

from __future__ import annotations

import asyncio

from starlette.requests import ClientDisconnect, Request

from corral.errors import ClientGoneError, RequestTimeoutError, RequestTooLargeError
from corral.proxy.errors import BadRequestError


async def read_body(request: Request, max_body: int, timeout: float) -> bytes:
    """The whole body; 415 for a non-JSON content type, 413 when too large, 408 when slow."""
    content_type = request.headers.get("content-type")
    if content_type is not None:
        media = content_type.partition(";")[0].strip().lower()
        if media != "application/json" and not media.endswith("+json"):
            raise BadRequestError(
                f"Content-Type must be application/json, got {media or 'nothing'!r}",
                code="unsupported_media_type", status=415)
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_body:
        raise RequestTooLargeError(_too_large(int(declared), max_body))
    chunks: list[bytes] = []
    size = 0
    try:
        async with asyncio.timeout(timeout):
            async for chunk in request.stream():
                size += len(chunk)
                if size > max_body:
                    raise RequestTooLargeError(_too_large(size, max_body))
                chunks.append(chunk)
    except TimeoutError:
        raise RequestTimeoutError(f"the request body was not received within {timeout:g}s") \
            from None
    except ClientDisconnect:
        # Gone half-way through its body: nobody to answer, but counted and logged as such.
        raise ClientGoneError("client disconnected while sending its request body") from None
    return b"".join(chunks)


def _too_large(size: int, limit: int) -> str:
    return f"the request body has {size} bytes or more; the limit is {limit} (limits.max_body)"
