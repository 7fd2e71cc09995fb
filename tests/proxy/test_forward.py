"""UpstreamResponse's clean-up, driven through its ASGI interface without any server."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import httpx

from corral.proxy.forward import UpstreamResponse


class SlowClose(httpx.AsyncByteStream):
    """An upstream body that breaks mid-stream and whose close takes a while: a client may
    leave meanwhile. (A body that ends normally is closed by httpx itself, before corral's own
    close, so only a broken one puts corral's close in the client's way.)"""

    def __init__(self) -> None:
        self.closing = asyncio.Event()

    async def __aiter__(self) -> AsyncIterator[bytes]:
        yield b"data: one\n\n"
        raise httpx.ReadError("the child went away")

    async def aclose(self) -> None:
        self.closing.set()
        await asyncio.sleep(0.2)


async def test_a_client_leaving_while_upstream_closes_still_releases_once() -> None:
    body = SlowClose()
    upstream = httpx.Response(200, headers={"content-type": "text/event-stream"}, stream=body)
    released: list[str] = []
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        await body.closing.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    response = UpstreamResponse(upstream, lambda: released.append("released"))
    await response({"type": "http"}, receive, send)  # type: ignore[arg-type]
    assert released == ["released"]  # the lease and the slot, exactly once
    bodies = [m.get("body", b"") for m in sent if m["type"] == "http.response.body"]
    assert bodies[0] == b"data: one\n\n"
    assert bodies[1].startswith(b"event: error\ndata: ") and b"the child went away" in bodies[1]


async def test_the_slot_is_released_before_the_last_frame() -> None:
    upstream = httpx.Response(200, headers={"content-type": "application/json"},
                              stream=httpx.ByteStream(b'{"ok": true}'))
    events: list[str] = []

    async def receive() -> dict[str, Any]:
        await asyncio.sleep(3600)
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.body" and not message.get("more_body"):
            events.append("last frame")

    response = UpstreamResponse(upstream, lambda: events.append("released"))
    await response({"type": "http"}, receive, send)  # type: ignore[arg-type]
    assert events == ["released", "last frame"]
