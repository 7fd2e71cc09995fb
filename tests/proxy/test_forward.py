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


class Burst(httpx.AsyncByteStream):
    """An event stream whose events are all there at once (a child that writes faster than
    corral relays); ``produced`` says how far it has been read."""

    def __init__(self, events: int) -> None:
        self.events = events
        self.produced = 0

    async def __aiter__(self) -> AsyncIterator[bytes]:
        for i in range(self.events):
            self.produced += 1
            yield b"data: %d\n\n" % i


def sse(body: httpx.AsyncByteStream) -> httpx.Response:
    return httpx.Response(200, headers={"content-type": "text/event-stream"}, stream=body)


async def never_leaves() -> dict[str, Any]:
    await asyncio.sleep(3600)
    return {"type": "http.disconnect"}


async def test_events_read_together_go_to_the_client_in_one_write() -> None:
    sent: list[bytes] = []

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.body" and message.get("body"):
            sent.append(message["body"])

    await UpstreamResponse(sse(Burst(10)), lambda: None)(
        {"type": "http"}, never_leaves, send)  # type: ignore[arg-type]
    assert b"".join(sent) == b"".join(b"data: %d\n\n" % i for i in range(10))
    assert len(sent) < 10  # batched: fewer writes than events


async def test_a_client_that_reads_nothing_holds_the_child_back() -> None:
    body = Burst(1000)
    unblock = asyncio.Event()
    sent: list[bytes] = []

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.body" and message.get("body"):
            await unblock.wait()  # a client that reads nothing: the write waits
            sent.append(message["body"])

    relay = asyncio.create_task(UpstreamResponse(sse(body), lambda: None)(
        {"type": "http"}, never_leaves, send))  # type: ignore[arg-type]
    for _ in range(50):
        await asyncio.sleep(0.01)
    # One batch in the stalled write (at most 64 events), at most 64 more waiting for it, and
    # the one in the reader's hand: not the whole answer.
    assert body.produced <= 2 + 2 * 64
    unblock.set()
    await relay
    assert b"".join(sent) == b"".join(b"data: %d\n\n" % i for i in range(1000))
