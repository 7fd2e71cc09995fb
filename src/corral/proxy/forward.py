"""Forwarding one request to a child and streaming its answer back, untouched.

This is the hot path: the request body goes upstream as the client sent it, and the response
body comes back as raw chunks (``aiter_raw``: no decoding, no re-encoding, no buffering), so an
SSE token reaches the client as soon as llama-server writes it.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import ClassVar

import anyio
import anyio.abc
import httpx
from anyio.streams.memory import MemoryObjectSendStream
from starlette.types import Receive, Scope, Send

from corral.errors import (
    ModelUnavailableError,
    UpstreamError,
    UpstreamTimeoutError,
    out_of_files,
)
from corral.proxy.clientwatch import ClientWatch
from corral.supervisor.childhttp import ChildResponse, ChildSession, Upstream

# Never forwarded: connection-level headers, and the client's credentials (the child has its own
# private key, which the pooled client adds).
_DROP_REQUEST = frozenset({
    b"host", b"content-length", b"connection", b"keep-alive", b"proxy-authorization",
    b"proxy-connection", b"te", b"trailer", b"transfer-encoding", b"upgrade",
    b"authorization", b"x-api-key", b"accept-encoding",
})
# Events read from a child but not yet written to the client, at most (see _relay_batched).
_BATCH_CHUNKS = 64
_DROP_RESPONSE = frozenset({
    "connection", "keep-alive", "proxy-authenticate", "trailer", "transfer-encoding", "upgrade",
    "server", "date",
})


async def send_upstream(
    client: ChildSession,
    model: str,
    method: str,
    path: str,
    query: bytes,
    headers: list[tuple[bytes, bytes]],
    body: bytes,
    answer_within: float | None = None,
) -> ChildResponse:
    """Send the request to the child; the response is open for streaming (close it!).

    ``answer_within`` (seconds, 0 for no limit) replaces the client's read timeout, the longest
    silence between two chunks, for an answer that is silent until complete.
    """
    read = client.read_timeout if answer_within is None else (answer_within or None)
    forwarded = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in headers
                 if k.lower() not in _DROP_REQUEST]
    try:
        return await client.send(method, path, query, forwarded, body, read)
    except httpx.ReadTimeout:
        if answer_within is None:
            raise UpstreamError(model, "ReadTimeout: no answer within upstream.read_timeout") \
                from None
        raise UpstreamTimeoutError(model, answer_within) from None
    except httpx.HTTPError as exc:
        if out_of_files(exc):
            # No socket for the child, not a child that failed: a 503 to retry, not a 502.
            raise ModelUnavailableError(
                model, f"corral has run out of file descriptors ({exc})", 1.0) from None
        # Refused, or closed before any answer: a pooled connection the child had just closed,
        # or a child that died. Either way it produced nothing for this request.
        unanswered = isinstance(exc, httpx.ConnectError | httpx.RemoteProtocolError)
        raise UpstreamError(model, f"{type(exc).__name__}: {exc}", delivered=not unanswered,
                            refused=isinstance(exc, httpx.ConnectError)) from None


class UpstreamResponse:
    """An ASGI response that streams an open upstream response through, then cleans up.

    ``on_close`` runs exactly once, whether the stream ends, the client goes away (the upstream
    request is closed at once, freeing the child's slot) or the child fails mid-stream.
    """

    # The body goes to the client as the child wrote it (a subclass that translates it does not).
    untouched: ClassVar[bool] = True

    def __init__(
        self,
        upstream: Upstream,
        on_close: Callable[[], None],
        extra_headers: list[tuple[bytes, bytes]] = (),  # type: ignore[assignment]
    ) -> None:
        self.upstream = upstream
        self.on_close = on_close
        self.headers = [
            (k.encode("latin-1"), v.encode("latin-1"))
            for k, v in upstream.headers.multi_items()
            if k.lower() not in _DROP_RESPONSE
        ]
        self.headers.extend(extra_headers)
        content_type = upstream.headers.get("content-type", "")
        self.is_sse = content_type.startswith("text/event-stream")
        self.client_gone = False
        self._finished = False
        self._closed = False
        self.upstream_error: str | None = None
        self.first_chunk_at: float | None = None
        self._between_events = True  # whether what was sent so far ends with a whole event
        self._read_error: httpx.HTTPError | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        arrived = (self.upstream.arrived_body() if self.untouched and not self.is_sse
                   and isinstance(self.upstream, ChildResponse) else None)
        if arrived is not None:
            await self._send_arrived(send, arrived)
            return
        try:
            async with anyio.create_task_group() as group:
                group.start_soon(self._watch_disconnect, receive, group.cancel_scope)
                await self._stream(send, group)
                group.cancel_scope.cancel()
        finally:
            await self._close()

    async def _send_arrived(self, send: Send, body: bytes) -> None:
        """A body that arrived whole with its headers: nothing left to wait for from the child,
        so no task watches the client (a 1-token answer saves the task group and a task)."""
        try:
            await send({"type": "http.response.start", "status": self.upstream.status_code,
                        "headers": self.headers})
            self._finished = True
        finally:
            await self._close()  # the slot is free before the body's last byte goes out
        await send({"type": "http.response.body", "body": body, "more_body": False})

    async def _close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            await self.upstream.aclose()
        finally:
            self.on_close()  # the lease and the slot, even when a leaving client cancels this

    async def _stream(self, send: Send, group: anyio.abc.TaskGroup) -> None:
        await send({"type": "http.response.start", "status": self.upstream.status_code,
                    "headers": self.headers})
        failure: httpx.HTTPError | None = None
        try:
            if self.is_sse:
                await self._relay_batched(send, group)
            else:
                async for chunk in self.upstream.aiter_raw():
                    await self._send_chunk(send, chunk)
        except httpx.HTTPError as exc:
            failure = exc
        if failure is None:
            failure = self._read_error
        if failure is not None:
            self.upstream_error = f"{type(failure).__name__}: {failure}"
            if not self.is_sse:
                # Headers are out and the body is cut: only closing the connection tells the
                # client the response is incomplete.
                raise failure
            # A child that died mid-write left half an event: end it, or the client's parser
            # would read the error event as more of that one.
            cut = b"" if self._between_events else b"\n\n"
            await send({"type": "http.response.body", "body": cut + sse_error(
                f"the model failed mid-stream: {self.upstream_error}"), "more_body": True})
        self._finished = True
        # Release the slot before the last frame: a client that sees its response end and sends
        # the next one at once must find the slot (and the admin counts) already free.
        await self._close()
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    async def _send_chunk(self, send: Send, chunk: bytes) -> None:
        if self.first_chunk_at is None:
            self.first_chunk_at = time.perf_counter()
        await send({"type": "http.response.body", "body": chunk, "more_body": True})
        self._between_events = chunk.endswith(b"\n\n")

    async def _relay_batched(self, send: Send, group: anyio.abc.TaskGroup) -> None:
        """Relay an event stream, one write to the client per read from the child.

        The child's client hands over one chunk of its chunked encoding at a time, one SSE
        event. Written one by one, a stream that the child writes faster than corral relays
        costs one send (a system call and a wake-up of the client) per event, where nginx
        writes what one read brought. A reader task pulls every chunk already read (without
        waiting, they are buffered) and this task sends them joined: one write per read when
        behind, the same as before when not. At most ``_BATCH_CHUNKS`` wait, so a client
        that reads slowly still holds the child back.
        """
        sender, receiver = anyio.create_memory_object_stream[bytes](_BATCH_CHUNKS)
        group.start_soon(self._read_into, sender)
        async with receiver:
            async for chunk in receiver:
                batch = [chunk]
                while True:
                    try:
                        batch.append(receiver.receive_nowait())
                    except (anyio.WouldBlock, anyio.EndOfStream):
                        break
                await self._send_chunk(send, chunk if len(batch) == 1 else b"".join(batch))

    async def _read_into(self, sender: MemoryObjectSendStream[bytes]) -> None:
        async with sender:
            try:
                async for chunk in self.upstream.aiter_raw():
                    try:
                        sender.send_nowait(chunk)  # no checkpoint: read on while data is there
                    except anyio.WouldBlock:
                        await sender.send(chunk)
            except httpx.HTTPError as exc:
                self._read_error = exc  # reported after the chunks read before it

    async def _watch_disconnect(self, receive: Receive, scope: anyio.CancelScope) -> None:
        await ClientWatch(receive).left()
        # After the last byte uvicorn reports a disconnect too; that is no client gone.
        self.client_gone = not self._finished
        scope.cancel()


def sse_error(message: str, code: str = "upstream_failed") -> bytes:
    """An SSE ``error`` event in the OpenAI error shape."""
    payload = json.dumps({"error": {"message": message, "type": "server_error", "code": code}})
    return f"event: error\ndata: {payload}\n\n".encode()
