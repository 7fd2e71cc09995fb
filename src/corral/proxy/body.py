"""Reading a request body within the limits: size, time, JSON content type, and parse cost.

The body is parsed by ``json.loads`` on the event loop (a thread would not help: the C decoder
holds the GIL throughout), and a small body can cost far more than its size: ``[],`` is three
bytes and a 64-byte list. So the values it can hold are bounded before it is parsed, counted
while it arrives: one per ``,`` ``:`` ``[`` ``{`` byte (strings included, which only
overcounts), at most one per ``VALUE_BYTES`` of ``limits.max_body``. That bounds both the time
one request holds the event loop and the memory its parse takes, to a small multiple of
``max_body`` (docs/benchmarks.md). A body shorter than the bound cannot exceed it and is not
counted at all, so ordinary requests pay nothing for this.
"""

from __future__ import annotations

import asyncio

from starlette.requests import ClientDisconnect, Request

from corral.errors import ClientGoneError, RequestTimeoutError, RequestTooLargeError
from corral.proxy.websafety import json_media_problem

VALUE_BYTES = 32
_STRUCTURE = b",:[{"


async def read_body(request: Request, max_body: int, timeout: float) -> bytes:
    """The whole body; 415 for a non-JSON content type, 413 when too large, 408 when slow."""
    refused = json_media_problem(request.headers.get("content-type"))
    if refused is not None:
        raise refused
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_body:
        raise RequestTooLargeError(_too_large(int(declared), max_body))
    chunks: list[bytes] = []
    size = values = counted = 0
    max_values = max_body // VALUE_BYTES
    try:
        async with asyncio.timeout(timeout):
            async for chunk in request.stream():
                size += len(chunk)
                if size > max_body:
                    raise RequestTooLargeError(_too_large(size, max_body))
                chunks.append(chunk)
                # A body of max_values bytes or fewer cannot hold more values: most are never
                # counted at all.
                if size > max_values:
                    values += sum(map(_structural, chunks[counted:]))
                    counted = len(chunks)
                    if values > max_values:
                        raise RequestTooLargeError(
                            f"the request body holds more than {max_values} JSON values "
                            f"(counting each , : [ {{); the limit is one per {VALUE_BYTES} "
                            "bytes of limits.max_body")
    except TimeoutError:
        raise RequestTimeoutError(f"the request body was not received within {timeout:g}s") \
            from None
    except ClientDisconnect:
        # Gone half-way through its body: nobody to answer, but counted and logged as such.
        raise ClientGoneError("client disconnected while sending its request body") from None
    return b"".join(chunks)


def _structural(chunk: bytes) -> int:
    # One pass in C (bytes.count would take four, each slower than this one).
    return len(chunk) - len(chunk.translate(None, _STRUCTURE))


def _too_large(size: int, limit: int) -> str:
    return f"the request body has {size} bytes or more; the limit is {limit} (limits.max_body)"
