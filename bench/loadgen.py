"""A lean HTTP/1.1 load generator for bench/compare.py: keep-alive connections, chunked bodies.

The client shares the machine's cores with the servers it measures, so it does as little as it
can per byte: no header objects, no decoding of the body beyond the chunked framing, events
counted with ``bytes.count`` on what arrives. Every contender gets the same client, so its cost
is a constant that ratios against ``direct`` do not hide a proxy behind.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import time
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Reply:
    """One answer: status, timings from the moment the request was written, events seen."""

    status: int
    seconds: float  # until the whole body arrived
    first_byte: float  # until the first byte of the body
    events: int  # SSE events (``\\n\\n``) in the body
    body: bytes  # kept only for non-streamed answers

    def json(self) -> Any:
        return json.loads(self.body)


class ServerClosed(Exception):
    """The server closed the connection before answering (a stale keep-alive connection)."""


class _Body:
    """Incremental reader of a response body: Content-Length or chunked."""

    def __init__(self, chunked: bool, length: int, keep: bool) -> None:
        self.chunked = chunked
        self.left = length  # bytes of the body (or of the current chunk) still to come
        self.keep = keep
        self.kept = bytearray()
        self.events = 0
        self.last = b""  # the last payload byte, for an event end split across reads
        self.buffer = bytearray()
        self.in_chunk = False
        self.last_chunk = False
        self.done = False

    def payload(self, data: bytes | bytearray) -> None:
        if not data:
            return
        self.events += (self.last + data[:1]).count(b"\n\n") + data.count(b"\n\n")
        self.last = bytes(data[-1:])
        if self.keep:
            self.kept += data

    def feed(self, data: bytes) -> None:
        if not self.chunked:
            self.payload(data[: self.left])
            self.left -= len(data)
            self.done = self.left <= 0
            return
        buf = self.buffer
        buf += data
        while buf and not self.done:
            if self.in_chunk:
                take = min(self.left, len(buf))
                self.payload(buf[:take])
                del buf[:take]
                self.left -= take
                if self.left:
                    return
                self.in_chunk = False
                self.left = -2  # the CRLF after the chunk's data
            if self.left == -2:
                if len(buf) < 2:
                    return
                del buf[:2]
                self.left = 0
                if self.last_chunk:
                    self.done = True
                    return
            end = buf.find(b"\r\n")
            if end < 0:
                return
            size = int(bytes(buf[:end]).split(b";")[0], 16)
            del buf[: end + 2]
            if size == 0:
                # The CRLF that ends the body follows (these servers send no trailers).
                self.left, self.last_chunk = -2, True
                continue
            self.in_chunk, self.left = True, size


class Connection:
    """One keep-alive connection to ``host:port`` (reopened when the server closed it)."""

    def __init__(self, host: str, port: int, headers: dict[str, str]) -> None:
        self.host, self.port = host, port
        self.extra = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.reader = self.writer = None

    async def request(self, method: str, path: str, body: Any = None,
                      keep: bool = True) -> Reply:
        """Send one request; on a connection the server had closed, once more on a new one."""
        for attempt in (0, 1):
            fresh = self.writer is None
            if fresh:
                self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
            try:
                return await self._exchange(method, path, body, keep)
            except (ServerClosed, ConnectionResetError, BrokenPipeError):
                await self.close()
                if fresh or attempt:
                    raise
        raise AssertionError("unreachable")

    async def _exchange(self, method: str, path: str, body: Any, keep: bool) -> Reply:
        assert self.reader is not None and self.writer is not None
        payload = b"" if body is None else json.dumps(body).encode()
        head = (f"{method} {path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n{self.extra}"
                f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n\r\n")
        started = time.perf_counter()
        self.writer.write(head.encode() + payload)
        try:
            raw = await self.reader.readuntil(b"\r\n\r\n")
        except asyncio.IncompleteReadError as exc:
            if not exc.partial:
                raise ServerClosed() from None
            raise
        lines = raw.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ", 2)[1])
        headers = {k.strip().lower(): v.strip()
                   for k, _, v in (line.partition(":") for line in lines[1:] if line)}
        chunked = "chunked" in headers.get("transfer-encoding", "")
        reader = _Body(chunked, int(headers.get("content-length", "0")), keep)
        first = 0.0
        if not chunked and reader.left == 0:
            reader.done = True
        while not reader.done:
            data = await self.reader.read(262144)
            if not data:
                raise ConnectionResetError("the server closed the connection mid-body")
            if not first:
                first = time.perf_counter() - started
            reader.feed(data)
        if headers.get("connection", "").lower() == "close":
            await self.close()
        return Reply(status, time.perf_counter() - started, first, reader.events,
                     bytes(reader.kept))


@dataclass
class Burst:
    """What ``clients`` connections sending ``each`` requests apiece achieved."""

    replies: list[Reply] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    seconds: float = 0.0


async def burst(host: str, port: int, headers: dict[str, str], clients: int, each: int,
                make: Any, keep: bool = True, seconds: float | None = None) -> Burst:
    """``clients`` concurrent connections, each sending ``each`` requests (or, with
    ``seconds``, as many as fit in that time) made by ``make(client, i) -> (method, path,
    body)``, one after another."""
    result = Burst()
    deadline = None if seconds is None else time.perf_counter() + seconds

    async def client(n: int) -> None:
        conn = Connection(host, port, headers)
        i = 0
        try:
            while (i < each) if deadline is None else (time.perf_counter() < deadline):
                method, path, body = make(n, i)
                i += 1
                try:
                    reply = await conn.request(method, path, body, keep)
                except (OSError, asyncio.IncompleteReadError, ServerClosed) as exc:
                    result.failures.append(f"{type(exc).__name__}: {exc}")
                    await conn.close()
                    continue
                if reply.status != 200:
                    result.failures.append(f"HTTP {reply.status}: {reply.body[:200]!r}")
                else:
                    result.replies.append(reply)
        finally:
            await conn.close()

    started = time.perf_counter()
    await asyncio.gather(*(client(n) for n in range(clients)))
    result.seconds = time.perf_counter() - started
    return result


def percentile(values: list[float], q: float) -> float:
    """The nearest-rank percentile (``q`` in 0..1) of ``values``."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * len(ordered)) - 1))]


def summary(values: list[float]) -> tuple[float, float, float]:
    """Median, lowest and highest of per-round figures."""
    return statistics.median(values), min(values), max(values)
