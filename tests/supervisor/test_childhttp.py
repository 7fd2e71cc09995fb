"""The model-request client (corral.supervisor.childhttp, on aiohttp) against a socket server
that misbehaves on purpose, through ``send_upstream``: each failure must become the error the
retry and the mid-stream handling rely on. The real llama-server cannot refuse, hang up or go
silent on demand; the integration tests (tests/supervisor/test_faults.py) cover real children."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
import pytest

from corral.errors import UpstreamError, UpstreamTimeoutError
from corral.proxy.forward import send_upstream
from corral.supervisor.childhttp import ChildResponse, ChildSession, _as_httpx

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], object]


@asynccontextmanager
async def child(tmp_path: Path, handler: Handler) -> AsyncIterator[ChildSession]:
    path = str(tmp_path / "child.sock")
    writers: list[asyncio.StreamWriter] = []
    tasks: list[asyncio.Task[object]] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writers.append(writer)
        tasks.append(asyncio.current_task())  # type: ignore[arg-type]
        await handler(reader, writer)  # type: ignore[misc]

    server = await asyncio.start_unix_server(serve, path)
    session = ChildSession(path, "key", connect_timeout=5.0, read_timeout=0.3)
    try:
        yield session
    finally:
        await session.aclose()
        for task in tasks:
            task.cancel()
        for writer in writers:
            writer.close()
        server.close()
        await server.wait_closed()


async def read_request(reader: asyncio.StreamReader) -> bytes:
    head = await reader.readuntil(b"\r\n\r\n")
    length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                   if line.lower().startswith(b"content-length:")), 0)
    return head + await reader.readexactly(length)


async def send(session: ChildSession, answer_within: float | None = None) -> ChildResponse:
    return await send_upstream(session, "m", "POST", "/v1/chat/completions", b"a=1",
                               [(b"content-type", b"application/json"),
                                (b"authorization", b"Bearer client-key")],
                               b'{"x": 1}', answer_within)


async def test_the_request_arrives_with_the_child_key_and_the_answer_streams_back(
        tmp_path: Path) -> None:
    seen: list[bytes] = []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        seen.append(await read_request(reader))
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                     b"Transfer-Encoding: chunked\r\n\r\n"
                     b"9\r\ndata: 1\n\n\r\n9\r\ndata: 2\n\n\r\n0\r\n\r\n")
        await writer.drain()

    async with child(tmp_path, handler) as session:
        response = await send(session)
        body = b"".join([chunk async for chunk in response.aiter_raw()])
        await response.aclose()
    assert (response.status_code, response.headers["content-type"]) == (200, "text/event-stream")
    assert body == b"data: 1\n\ndata: 2\n\n"
    request = seen[0].lower()
    assert request.startswith(b"post /v1/chat/completions?a=1 http/1.1")
    assert b"authorization: bearer key\r\n" in request and b"client-key" not in request
    assert request.endswith(b'{"x": 1}')


async def test_a_decoded_question_mark_stays_in_the_path(tmp_path: Path) -> None:
    seen: list[bytes] = []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        seen.append(await read_request(reader))
        writer.write(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n")
        await writer.drain()

    async with child(tmp_path, handler) as session:
        response = await send_upstream(session, "m", "GET", "/v1/a?b c", b"q=%20x", [], b"")
        assert await response.aread() == b""
        await response.aclose()
    assert seen[0].startswith(b"GET /v1/a%3Fb%20c?q=%20x HTTP/1.1\r\n")


async def test_a_child_that_is_not_listening_refused_it(tmp_path: Path) -> None:
    session = ChildSession(str(tmp_path / "absent.sock"), "key", 5.0, 1.0)
    try:
        with pytest.raises(UpstreamError) as caught:
            await send(session)
    finally:
        await session.aclose()
    assert (caught.value.delivered, caught.value.refused) == (False, True)


async def test_a_request_to_a_child_whose_connections_were_closed_was_refused(
        tmp_path: Path) -> None:
    # The supervisor closes an exited child's connections; a request leased just before
    # must be retried on the restarted child like one its dead socket refused, not a 500.
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)

    async with child(tmp_path, handler) as session:
        await session.aclose()
        with pytest.raises(UpstreamError) as caught:
            await send(session)
    assert (caught.value.delivered, caught.value.refused) == (False, True)


async def test_a_connection_closed_without_an_answer_was_not_delivered(tmp_path: Path) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.close()

    async with child(tmp_path, handler) as session:
        with pytest.raises(UpstreamError) as caught:
            await send(session)
    assert (caught.value.delivered, caught.value.refused) == (False, False)


async def test_silence_before_the_answer_is_the_read_or_generation_timeout(
        tmp_path: Path) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        await asyncio.sleep(30)

    async with child(tmp_path, handler) as session:
        with pytest.raises(UpstreamError, match="upstream.read_timeout") as streamed:
            await send(session)
        with pytest.raises(UpstreamTimeoutError, match=r"generation_timeout \(0.2s\)"):
            await send(session, answer_within=0.2)
    assert not isinstance(streamed.value, UpstreamTimeoutError)


async def test_a_child_dying_mid_stream_is_a_read_error(tmp_path: Path) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                     b"Transfer-Encoding: chunked\r\n\r\n9\r\ndata: 1\n\n\r\n")
        await writer.drain()
        writer.close()

    async with child(tmp_path, handler) as session:
        response = await send(session)
        got: list[bytes] = []
        with pytest.raises(httpx.ReadError):
            async for chunk in response.aiter_raw():
                got.append(chunk)
        await response.aclose()
    assert got == [b"data: 1\n\n"]


async def test_what_a_dying_child_wrote_last_comes_before_the_error(tmp_path: Path) -> None:
    # The events and the lost connection arrive together before corral reads: aiohttp's own
    # reader would raise at once and drop the events.
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                     b"Transfer-Encoding: chunked\r\n\r\n9\r\ndata: 1\n\n\r\n"
                     b"9\r\ndata: 2\n\n\r\n")
        await writer.drain()
        writer.close()

    async with child(tmp_path, handler) as session:
        response = await send(session)
        content = response._response.content
        deadline = asyncio.get_running_loop().time() + 30
        while content.exception() is None:  # the connection's loss has been seen
            assert asyncio.get_running_loop().time() < deadline
            await asyncio.sleep(0.01)
        got = b""
        with pytest.raises(httpx.ReadError):
            async for chunk in response.aiter_raw():
                got += chunk
        await response.aclose()
    assert got == b"data: 1\n\ndata: 2\n\n"


class Chunks(ChildResponse):
    def __init__(self, chunks: list[bytes]) -> None:  # no aiohttp response behind it
        self.chunks = chunks

    async def aiter_raw(self) -> AsyncIterator[bytes]:
        for chunk in self.chunks:
            yield chunk


@pytest.mark.parametrize("cut", range(1, 12))
async def test_lines_split_across_reads(cut: int) -> None:
    body = b"data: \xc3\xa9\r\n\r\ndata: b\rdata: \xe2\x80\xa8c\n"
    lines = [line async for line in Chunks([body[:cut], body[cut:]]).aiter_lines()]
    # U+2028 inside a JSON string is no line end (httpx's aiter_lines splits there).
    assert lines == ["data: é", "", "data: b", "data: \u2028c"]



async def test_a_chunked_answers_connection_is_not_reused(tmp_path: Path) -> None:
    # llama-server closes the connection after every streamed (chunked) answer, though its
    # headers offer keep-alive; this fake keeps it open, so only corral's choice is seen.
    # An answer with a Content-Length leaves its connection to the next request.
    connections: list[int] = []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connections.append(id(writer))
        while True:
            try:
                request = await read_request(reader)
            except asyncio.IncompleteReadError:
                return  # corral closed it
            if b"chunked" in request:
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                             b"Transfer-Encoding: chunked\r\n\r\n9\r\ndata: 1\n\n\r\n0\r\n\r\n")
            else:
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}")
            await writer.drain()

    async def ask(session: ChildSession, path: str) -> bytes:
        response = await send_upstream(session, "m", "POST", path, b"", [], b"{}")
        try:
            return await response.aread()
        finally:
            await response.aclose()

    async with child(tmp_path, handler) as session:
        assert [await ask(session, "/whole") for _ in range(3)] == [b"{}"] * 3
        assert len(connections) == 1
        # The first goes on the pooled connection; each connection ends with its chunked answer.
        assert [await ask(session, "/chunked") for _ in range(3)] == [b"data: 1\n\n"] * 3
        assert len(connections) == 3
        assert await ask(session, "/whole") == b"{}"
        assert len(connections) == 4


async def test_a_streamed_answers_connection_is_not_reused(tmp_path: Path) -> None:
    # The answer ends only after the client has read its first event: the connection is still
    # the response's when it is marked, as with a real token stream (the test above has the
    # whole answer arrive with its headers).
    connections: list[int] = []
    first_read = asyncio.Event()

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connections.append(id(writer))
        while True:
            try:
                await read_request(reader)
            except asyncio.IncompleteReadError:
                return
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                         b"Transfer-Encoding: chunked\r\n\r\n9\r\ndata: 1\n\n\r\n")
            await writer.drain()
            await first_read.wait()
            first_read.clear()
            writer.write(b"0\r\n\r\n")
            await writer.drain()

    async with child(tmp_path, handler) as session:
        for _ in range(2):
            response = await send(session)
            chunks = response.aiter_raw()
            assert await anext(chunks) == b"data: 1\n\n"
            first_read.set()
            assert [chunk async for chunk in chunks] == []
            await response.aclose()
    assert len(connections) == 2


async def test_a_connection_reset_before_an_answer_was_not_delivered(tmp_path: Path) -> None:
    # A reset (or a pooled connection found closing as the request goes out, which aiohttp
    # reports as "Can not write request body") is the child's "no answer", as a close is.
    import aiohttp

    for lost in (aiohttp.ClientOSError(None, "Can not write request body"),
                 aiohttp.ClientConnectionResetError("Cannot write to closing transport"),
                 aiohttp.ServerDisconnectedError()):
        assert isinstance(_as_httpx(aiohttp, lost, before_answer=True),
                          httpx.RemoteProtocolError)
        assert isinstance(_as_httpx(aiohttp, lost, before_answer=False), httpx.ReadError)

    # For real: a child that closes with the request's body unread resets the connection
    # (aiohttp: ClientOSError, "Connection reset by peer"), before any answer.
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.close()

    async with child(tmp_path, handler) as session:
        with pytest.raises(UpstreamError) as caught:
            await send_upstream(session, "m", "POST", "/v1/completions", b"", [],
                                b"x" * 8_000_000)
    assert (caught.value.delivered, caught.value.refused) == (False, False)
    assert "ClientOSError" in str(caught.value)


async def test_a_large_body_arrives_whole(tmp_path: Path) -> None:
    # Above 1 MiB the body goes in pieces (not one write): every byte, in order, once.
    received: list[bytes] = []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        request = await read_request(reader)
        received.append(request.partition(b"\r\n\r\n")[2])
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}")
        await writer.drain()

    body = bytes(range(256)) * (3 * 2**20 // 256 + 7)
    async with child(tmp_path, handler) as session:
        response = await send_upstream(session, "m", "POST", "/v1/chat/completions", b"", [],
                                       body)
        assert await response.aread() == b"{}"
        await response.aclose()
    assert received == [body]
