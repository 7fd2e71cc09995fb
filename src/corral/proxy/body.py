"""Reading a request body within the limits: size, time, and a JSON content type."""

from __future__ import annotations

import asyncio

from starlette.requests import ClientDisconnect, Request

from corral.errors import ClientGoneError, RequestTimeoutError, RequestTooLargeError
from corral.proxy.websafety import json_media_problem


async def read_body(request: Request, max_body: int, timeout: float) -> bytes:
    """The whole body; 415 for a non-JSON content type, 413 when too large, 408 when slow."""
    refused = json_media_problem(request.headers.get("content-type"))
    if refused is not None:
        raise refused
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
