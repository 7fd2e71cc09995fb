"""The model-request path to a child over its Unix socket, on aiohttp's client.

httpx (httpcore, h11 in pure Python) cost about 0.9 ms of corral's CPU per request and 14 us
per relayed event (bench/upstream_clients.py); aiohttp's client, with its C parser, about
0.15 ms and 2 us. Health checks, ``/slots`` and ``/metrics`` stay on the child's httpx client.

``ChildResponse`` offers the few members of ``httpx.Response`` that ``UpstreamResponse`` and
the Ollama translation use, and raises httpx's exception types for the failures they handle,
so the guarantees of that code (the mid-stream error event, the slot released before the last
frame, cleanup exactly once) are unchanged.
"""

from __future__ import annotations

import asyncio
import codecs
import functools
import io
import re
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

import httpx

if TYPE_CHECKING:
    import aiohttp


# Seconds to send a request to a child (httpx's write timeout before).
WRITE_TIMEOUT = 60.0
_PATH_SAFE = "/:@!$&'()*+,;=-._~"
# Larger bodies (images in a chat, up to listen.max_body) go as a stream of 64 KiB writes with
# a turn of the loop between them, not one write (aiohttp warns of the latter above 1 MiB).
_LARGE_BODY = 2**20
_LINE_END = re.compile(r"\r\n|\r|\n")


class ChildSession:
    """A pool of keep-alive connections to one child's Unix socket, for model requests."""

    def __init__(self, socket: str, api_key: str, connect_timeout: float,
                 read_timeout: float | None) -> None:
        # Imported with the first child, not before corral listens (0.1-0.3 s).
        import aiohttp
        import yarl

        self._aiohttp = aiohttp
        self._url = yarl.URL
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        # llama-server (cpp-httplib) closes idle connections after 5 s: forget them sooner, so
        # a request does not pick a connection the child is closing.
        connector = aiohttp.UnixConnector(path=socket, limit=0, keepalive_timeout=2.0)
        self.session = aiohttp.ClientSession(
            connector=connector, auto_decompress=False, response_class=_one_use_if_chunked(),
            headers={"Authorization": f"Bearer {api_key}"},
            skip_auto_headers=("Accept-Encoding", "User-Agent", "Content-Type"),
        )

    async def send(self, method: str, path: str, query: bytes,
                   headers: list[tuple[str, str]], body: bytes,
                   read_timeout: float | None) -> ChildResponse:
        """Send the request; the response is open for streaming (close it!).

        Raises httpx's ``ConnectError`` (refused), ``RemoteProtocolError`` (closed before any
        answer), ``ReadTimeout``, ``ConnectTimeout`` or ``WriteError`` / ``ReadError`` for the
        failures ``send_upstream`` tells apart.
        """
        aiohttp = self._aiohttp
        # The path as the client's request decoded it, quoted again (a decoded "?" stays in
        # the path); the query as the client sent it, as httpx passed both.
        target = "http://llama-server" + quote(path, safe=_PATH_SAFE)
        url = self._url(target + (f"?{query.decode('latin-1')}" if query else ""), encoded=True)
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=self.connect_timeout,
                                        sock_read=read_timeout)
        # aiohttp starts the read timeout once the body is written and bounds the writing by
        # nothing: a child that stops reading the body must not hold the request forever.
        bound = None if read_timeout is None else WRITE_TIMEOUT + read_timeout
        try:
            async with asyncio.timeout(bound) as scope:
                response = await self.session.request(
                    method, url, data=body if len(body) <= _LARGE_BODY else io.BytesIO(body),
                    headers=headers, timeout=timeout,
                    allow_redirects=False, compress=None)
        except TimeoutError as exc:
            if scope.expired():
                raise httpx.WriteTimeout(f"the request not sent within {WRITE_TIMEOUT:g}s") \
                    from exc
            raise _as_httpx(aiohttp, exc, before_answer=True) from exc
        except BaseException as exc:
            if self.session.closed and isinstance(exc, RuntimeError | aiohttp.ClientError):
                # The child exited and its connections were closed (the supervisor does so)
                # while this request was on its way: it never reached the child, as when its
                # socket refuses a connection, so it is retried on the restarted child.
                raise httpx.ConnectError("the child has exited") from exc
            mapped = _as_httpx(aiohttp, exc, before_answer=True)
            if mapped is exc:
                raise
            raise mapped from exc
        return ChildResponse(aiohttp, response)

    async def aclose(self) -> None:
        await self.session.close()


class ChildResponse:
    """An open response from a child, with the ``httpx.Response`` members corral uses."""

    def __init__(self, aiohttp: Any, response: aiohttp.ClientResponse) -> None:
        self._aiohttp = aiohttp
        self._response = response
        self.status_code = response.status
        self.headers = httpx.Headers(list(response.raw_headers))

    def arrived_body(self) -> bytes | None:
        """The whole body if it has already arrived (read without waiting), else ``None``.

        A non-streamed answer usually comes in the same read as its headers.
        """
        content = self._response.content
        if not content.is_eof() or content.exception() is not None:
            return None
        return content.read_nowait()

    async def aiter_raw(self) -> AsyncIterator[bytes]:
        """The body as read (chunked encoding removed, nothing decoded), each read's bytes."""
        content = self._response.content
        try:
            while True:
                chunk = await content.readany()
                if not chunk:
                    return
                yield chunk
        except BaseException as exc:
            mapped = _as_httpx(self._aiohttp, exc, before_answer=False)
            if mapped is exc:
                raise
            # aiohttp raises a lost connection before the bytes that arrived with it (its
            # readany checks for an error first): the events a dying child wrote last must
            # still reach the client, before the error event.
            rest = _buffered(content)
            if rest:
                yield rest
            raise mapped from exc

    async def aiter_lines(self) -> AsyncIterator[str]:
        """The body as UTF-8 text, line by line, without line endings (as httpx's)."""
        decoder = codecs.getincrementaldecoder("utf-8")("replace")
        pending = ""
        async for chunk in self.aiter_raw():
            # Only \n, \r\n and \r end a line (str.splitlines would split a JSON string at
            # U+2028); a "\r" at the end may be half of "\r\n" and waits for the next read.
            text = pending + decoder.decode(chunk)
            held = text.endswith("\r")
            *lines, pending = _LINE_END.split(text[:-1] if held else text)
            pending += "\r" if held else ""
            for line in lines:
                yield line
        tail = (pending + decoder.decode(b"", final=True)).rstrip("\r")
        if tail:
            yield tail

    async def aread(self) -> bytes:
        return b"".join([chunk async for chunk in self.aiter_raw()])

    async def aclose(self) -> None:
        # Closes the connection unless the body was read to its end (then it is pooled).
        self._response.release() if self._response.content.at_eof() else self._response.close()


@functools.cache
def _one_use_if_chunked() -> type[aiohttp.ClientResponse]:
    """aiohttp's response, except that a chunked answer's connection is never pooled.

    llama-server (515e855) ends the connection after every chunked (streamed) answer, though
    its headers offer keep-alive. aiohttp pools a connection when its body ends, and the next
    request sent on it before the child's FIN arrived failed ("Server disconnected" or "Can
    not write request body"): measured on every request so sent, each then retried.
    """
    import aiohttp  # with the first child, as in ChildSession

    class OneUseIfChunked(aiohttp.ClientResponse):
        async def start(self, connection: aiohttp.connector.Connection) -> OneUseIfChunked:
            protocol = connection.protocol
            await super().start(connection)
            if protocol is not None and "chunked" in self.headers.get(
                    "Transfer-Encoding", "").lower():
                protocol.force_close()  # closed, not pooled, when the body ends
                if self.connection is None:
                    # The whole body came with the headers: already pooled, in this same
                    # step of the loop, so no other request can have taken it yet.
                    protocol.close()
            return self

    return OneUseIfChunked


def _buffered(content: Any) -> bytes:
    """What aiohttp read from the socket but has not handed over (its private buffer)."""
    if not getattr(content, "_buffer", None):
        return b""
    return b"".join(content._buffer)[getattr(content, "_buffer_offset", 0):]


def _as_httpx(aiohttp: Any, exc: BaseException, before_answer: bool) -> BaseException:
    """httpx's exception for what aiohttp raised; anything else (cancellation) unchanged."""
    if isinstance(exc, aiohttp.ClientConnectorError):
        return httpx.ConnectError(str(exc))
    if isinstance(exc, aiohttp.ConnectionTimeoutError):
        return httpx.ConnectTimeout(str(exc))
    if isinstance(exc, aiohttp.ServerTimeoutError | asyncio.TimeoutError):
        return httpx.ReadTimeout(str(exc) or "no data within the read timeout")
    if isinstance(exc, aiohttp.ClientConnectionError) and before_answer:
        # Closed or reset before any answer (aiohttp says "Server disconnected", "Can not
        # write request body" or "Cannot write to closing transport" for a connection that was
        # closing when the request went out): the child produced nothing for it. The retry
        # sends it again only to a child still alive.
        return httpx.RemoteProtocolError(
            f"the child closed the connection without answering ({type(exc).__name__}: {exc})")
    if isinstance(exc, aiohttp.ClientError):
        kind = httpx.WriteError if before_answer else httpx.ReadError
        return kind(f"{type(exc).__name__}: {exc}")
    return exc


# What UpstreamResponse streams: a child's response, or httpx's (tests build those).
Upstream = httpx.Response | ChildResponse
