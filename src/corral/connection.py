"""Every phase of a client connection bounded in size or time, whatever the client does.

uvicorn bounds none of them by itself: it waits for headers forever, accumulates headers of any
size, keeps a connection whose request body was left unread open forever (any byte that arrives
cancels its keep-alive timer), and waits forever for a client that does not read its response.
``guarded_protocol`` returns uvicorn's httptools protocol with these bounds, all read from
``limits`` when they are armed, so a reload applies to the next request:

- request line and headers: ``max_header_bytes`` and ``max_headers`` (431), ``header_timeout``
  (the connection is closed);
- a request body the handler never read: after the response, ``body_timeout`` for the rest of
  it to arrive (it is discarded), then the connection is closed;
- idle between requests: ``idle_timeout``;
- a response the client does not read: once more than the transport's high-water mark waits to
  be sent, ``write_timeout`` for the client to read it down to the low-water mark; then the
  connection is aborted, which ends the request and frees its slot.

One timer per connection for the phase it is in, one more only while a write is stalled:
nothing runs per chunk written or read.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any, cast

import structlog

from corral.config.schema import LimitSettings
from corral.proxy.errors import error_body

try:
    # httptools is a dependency of corral's own (pyproject.toml): without it uvicorn would fall
    # back to h11, where none of these bounds would hold.
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
except ImportError as exc:  # pragma: no cover - only on a broken installation
    raise ImportError(
        f"corral needs httptools for its HTTP connection limits ({exc}); "
        "install it with `pip install httptools`"
    ) from exc

log = structlog.get_logger("corral")

# After a 431, how long what the client still sends is read and dropped before the connection
# is closed: closing a socket with unread data makes the kernel send a reset, which can destroy
# the answer before the client has read it.
LINGER = 2.0


def guarded_protocol(limits_of: Callable[[], LimitSettings]) -> type[asyncio.Protocol]:
    """uvicorn's httptools protocol with corral's connection limits, read from ``limits_of()``
    (asked once per request, and at each arming, so a reload applies to the next request)."""

    class Guarded(GuardedHttpProtocol):
        limits = staticmethod(limits_of)

    return Guarded


class GuardedHttpProtocol(HttpToolsProtocol):
    """The protocol ``guarded_protocol`` configures; ``limits`` is set by a subclass."""

    limits: Callable[[], LimitSettings]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._timer: asyncio.TimerHandle | None = None
        self._write_timer: asyncio.TimerHandle | None = None
        self._limits = self.limits()
        self._head_open = False  # a request line and headers are arriving
        self._head_raw = 0  # bytes of whole reads that fell inside an unfinished head
        self._head_parsed = 0  # bytes of the URL and header lines parsed so far
        self._head_lines = 0
        self._message_done = True  # the last request's body has been read to its end
        self._refusal: str | None = None

    # The connection

    def connection_made(self, transport: Any) -> None:
        super().connection_made(transport)
        self._arm(self._limits.header_timeout, "headers not received in time")

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        if self._write_timer is not None:
            self._write_timer.cancel()
            self._write_timer = None
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._refusal is not None:
            return  # answered 431: what still comes is dropped until the linger ends
        # A read that starts inside a head and leaves it unfinished is head through and through.
        # (The read a head starts in is left out: it may end the previous request's body.)
        counted = self._head_open
        super().data_received(data)
        if counted and self._head_open and self._refusal is None:
            self._head_raw += len(data)
            self._check_head()
        if self._refusal is not None:
            self._refuse(self._refusal)

    # The parser's callbacks, in the order it makes them

    def on_message_begin(self) -> None:
        if self._refusal is not None:
            return
        super().on_message_begin()
        self._limits = self.limits()
        self._head_open = True
        self._head_raw = self._head_parsed = self._head_lines = 0
        self._message_done = False
        self._arm(self._limits.header_timeout, "headers not received in time")

    def on_url(self, url: bytes) -> None:
        if self._refusal is None:
            self._head_parsed += len(url)
            if self._check_head():
                super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        if self._refusal is None:
            self._head_lines += 1
            self._head_parsed += len(name) + len(value) + 4  # ": " and the line's end
            if self._check_head():
                super().on_header(name, value)

    def on_headers_complete(self) -> None:
        self._head_open = False
        if self._refusal is None:
            self._disarm()  # the handler reads the body within limits.body_timeout itself
            super().on_headers_complete()
            if self.cycle is not None:
                self.cycle.transport = cast(asyncio.Transport,
                                            HeadHeld(self.transport, self.loop))

    def on_body(self, body: bytes) -> None:
        if self._refusal is None:
            super().on_body(body)

    def on_message_complete(self) -> None:
        if self._refusal is not None:
            return
        self._message_done = True
        super().on_message_complete()
        if self.cycle is not None and self.cycle.response_complete and not self._head_open:
            # The rest of a body the handler left unread is in: the connection may be reused.
            self._arm(self._limits.idle_timeout, None)

    # The response

    def on_response_complete(self) -> None:
        pipelined = bool(self.pipeline)
        super().on_response_complete()
        self._unset_keepalive_if_required()  # uvicorn's keep-alive timer: this one replaces it
        if pipelined or self._head_open or self.transport.is_closing():
            return  # a queued request starts now, or the next head has its own timer
        if self._message_done:
            self._arm(self._limits.idle_timeout, None)
        else:
            # Answered before its body was read (an error, or a handler that takes none): the
            # rest is discarded as it comes, but only for so long.
            self._arm(self._limits.body_timeout, "request body not received in time")

    def pause_writing(self) -> None:
        super().pause_writing()
        if self._write_timer is None:
            self._write_timer = self.loop.call_later(
                self.limits().write_timeout, self._write_stalled)

    def resume_writing(self) -> None:
        super().resume_writing()
        if self._write_timer is not None:
            self._write_timer.cancel()
            self._write_timer = None

    # Timers and refusals

    def _arm(self, seconds: float, reason: str | None) -> None:
        """Close the connection after ``seconds`` (logged with ``reason``, if any) unless
        re-armed or disarmed before."""
        self._disarm()
        self._timer = self.loop.call_later(seconds, self._expired, seconds, reason)

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _expired(self, seconds: float, reason: str | None) -> None:
        self._timer = None
        if reason is not None:
            log.info("connection_closed", reason=reason, timeout=seconds,
                     client=_address(self.client))
        # A client that reads nothing would keep a closing transport with unsent data forever.
        if self.transport.get_write_buffer_size():
            self.transport.abort()
        else:
            self.transport.close()

    def _write_stalled(self) -> None:
        self._write_timer = None
        timeout = self.limits().write_timeout
        log.info("connection_closed", reason="the client did not read its response",
                 timeout=timeout, client=_address(self.client),
                 path=self.scope.get("path") if self.scope else None)
        # Not close(): that would wait for the unread data to be sent, forever. The request sees
        # its client gone, which ends it and frees its slot.
        self.transport.abort()

    def _check_head(self) -> bool:
        limits = self._limits
        if self._head_lines > limits.max_headers:
            self._refusal = (f"the request has more than {limits.max_headers} header lines "
                             "(limits.max_headers)")
        elif max(self._head_raw, self._head_parsed) > limits.max_header_bytes:
            self._refusal = (f"the request line and headers exceed {limits.max_header_bytes} "
                             "bytes (limits.max_header_bytes)")
        return self._refusal is None

    def _refuse(self, message: str) -> None:
        self._disarm()
        log.info("request_refused", status=431, reason=message, client=_address(self.client))
        if self.cycle is not None and not self.cycle.response_complete:
            # A pipelined head, while the previous response is still going out: an answer now
            # would land in the middle of it.
            self.transport.abort()
            return
        body = error_body(message, "invalid_request_error", "headers_too_large")
        self.transport.write(
            b"HTTP/1.1 431 Request Header Fields Too Large\r\n"
            b"content-type: application/json\r\n"
            b"content-length: " + str(len(body)).encode() + b"\r\n"
            b"connection: close\r\n\r\n" + body)
        if self.transport.can_write_eof():
            self.transport.write_eof()
            self._timer = self.loop.call_later(LINGER, self._expired, LINGER, None)
        else:
            self.transport.close()


class HeadHeld:
    """The client's transport as one response sees it: its first write (the status line and
    headers) is held until the next write or the end of this turn of the event loop.

    uvicorn writes the head as soon as the response starts and the body with the next message:
    two system calls, and the client woken twice, for an answer whose body is already there (a
    non-streamed answer, P1 in docs/benchmarks.md). Held, the two go out in one write. A
    response that waits for its body (a stream) yields to the event loop first, and its head
    goes out then, as before.
    """

    __slots__ = ("_transport", "_loop", "_held", "_first")

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self._transport = transport
        self._loop = loop
        self._held: bytes | None = None
        self._first = True

    def write(self, data: bytes) -> None:
        if self._first:
            self._first = False
            self._held = bytes(data)
            self._loop.call_soon(self._flush)
            return
        if self._held is not None:
            data, self._held = self._held + data, None
        self._transport.write(data)

    def _flush(self) -> None:
        if self._held is not None:
            held, self._held = self._held, None
            self._transport.write(held)

    def __getattr__(self, name: str) -> Any:
        self._flush()  # whatever else is asked (close, is_closing) sees every write made
        return getattr(self._transport, name)


def _address(client: tuple[str, int] | None) -> str | None:
    return f"{client[0]}:{client[1]}" if client else None
