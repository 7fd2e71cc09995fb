"""CPU cost of the HTTP client on corral's path to a child, per request and per streamed event.

A fake child (this script with ``--serve``, asyncio on a Unix socket) answers ``/small`` with
a 1-token chat answer (Content-Length) and ``/stream?n=N`` with N SSE events, one chunk of the
chunked encoding each, as llama-server writes them. Each client sends the requests one after
another (small) and 16 streams at once, and the client process's CPU time is divided by the
count. Clients: ``httpx`` as corral configured it (pooled ``AsyncHTTPTransport(uds=...)``),
``httpcore`` (httpx's transport alone), ``aiohttp`` (``UnixConnector``) and ``own``, a bare
keep-alive client on httptools with no timeouts or error handling, as a floor.

    .venv/bin/python bench/upstream_clients.py            # 2000 requests, 16 x 1000 events
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from typing import Any

import httpcore
import httptools
import httpx
import uvloop

BODY = (b'{"choices":[{"index":0,"message":{"role":"assistant","content":"Hi"},'
        b'"finish_reason":"length"}],"usage":{"prompt_tokens":10,"completion_tokens":1,'
        b'"total_tokens":11},"id":"chatcmpl-x","object":"chat.completion","model":"m"}')
EVENT = (b'data: {"choices":[{"index":0,"delta":{"content":"tok"},"finish_reason":null}],'
         b'"created":1,"id":"chatcmpl-x","model":"m","object":"chat.completion.chunk"}\n\n')
REQUEST = b'{"messages":[{"role":"user","content":"hi"}],"max_tokens":1}'
HEADERS = [(b"content-type", b"application/json"), (b"user-agent", b"bench")]
One = Callable[[str], Awaitable[int]]


class FakeChild(asyncio.Protocol):
    def connection_made(self, transport: Any) -> None:
        self.transport, self.buffer = transport, b""

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while (end := self.buffer.find(b"\r\n\r\n")) >= 0:
            head = self.buffer[:end].decode()
            length = sum(int(line.split(":")[1]) for line in head.split("\r\n")[1:]
                         if line.lower().startswith("content-length:"))
            if len(self.buffer) < end + 4 + length:
                return
            self.buffer = self.buffer[end + 4 + length:]
            path = head.split(" ")[1]
            if path.startswith("/stream"):
                chunk = b"%x\r\n%s\r\n" % (len(EVENT), EVENT)
                self.transport.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                                     b"Transfer-Encoding: chunked\r\n\r\n"
                                     + chunk * int(path.split("n=")[1]) + b"0\r\n\r\n")
            else:
                self.transport.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                                     b"Content-Length: %d\r\n\r\n%s" % (len(BODY), BODY))


async def serve(path: str) -> None:
    server = await asyncio.get_running_loop().create_unix_server(FakeChild, path)
    await server.serve_forever()


async def with_httpx(sock: str) -> tuple[One, Callable[[], Awaitable[None]]]:
    client = httpx.AsyncClient(
        transport=httpx.AsyncHTTPTransport(uds=sock, limits=httpx.Limits(
            max_connections=None, max_keepalive_connections=64, keepalive_expiry=2.0)),
        base_url="http://llama-server", headers={"Authorization": "Bearer k"},
        timeout=httpx.Timeout(connect=5, read=600, write=60.0, pool=None))

    async def one(target: str) -> int:
        path, _, query = target.partition("?")
        request = client.build_request("POST", httpx.URL(path=path, query=query.encode()),
                                       content=REQUEST, headers=HEADERS)
        response = await client.send(request, stream=True)
        n = sum([len(c) async for c in response.aiter_raw()])
        await response.aclose()
        return n
    return one, client.aclose


async def with_httpcore(sock: str) -> tuple[One, Callable[[], Awaitable[None]]]:
    pool = httpcore.AsyncConnectionPool(uds=sock, max_keepalive_connections=64,
                                        keepalive_expiry=2.0)

    async def one(target: str) -> int:
        async with pool.stream("POST", "http://llama-server" + target, content=REQUEST,
                               headers=[*HEADERS, (b"authorization", b"Bearer k")]) as r:
            return sum([len(c) async for c in r.aiter_stream()])
    return one, pool.aclose


async def with_aiohttp(sock: str) -> tuple[One, Callable[[], Awaitable[None]]]:
    import aiohttp

    session = aiohttp.ClientSession(
        connector=aiohttp.UnixConnector(path=sock, limit=0, keepalive_timeout=2.0),
        auto_decompress=False, headers={"Authorization": "Bearer k"},
        skip_auto_headers=("Accept-Encoding", "User-Agent"))
    headers = [(k.decode(), v.decode()) for k, v in HEADERS]

    async def one(target: str) -> int:
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=5, sock_read=600)
        async with session.post("http://llama-server" + target, data=REQUEST,
                                headers=headers, timeout=timeout) as r:
            return sum([len(c) async for c in r.content.iter_any()])
    return one, session.close


class _Own(asyncio.Protocol):
    waiter: asyncio.Future[None] | None = None

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.parser.feed_data(data)
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)

    def on_body(self, body: bytes) -> None:
        self.received += len(body)

    def on_message_complete(self) -> None:
        self.complete = True


async def with_own(sock: str) -> tuple[One, Callable[[], Awaitable[None]]]:
    loop = asyncio.get_running_loop()
    idle: list[_Own] = []

    async def one(target: str) -> int:
        conn = idle.pop() if idle else (await loop.create_unix_connection(_Own, sock))[1]
        conn.received, conn.complete = 0, False
        conn.parser = httptools.HttpResponseParser(conn)
        head = b"POST %s HTTP/1.1\r\nhost: llama-server\r\nauthorization: Bearer k\r\n" % (
            target.encode())
        head += b"".join(k + b": " + v + b"\r\n" for k, v in HEADERS)
        conn.transport.write(head + b"content-length: %d\r\n\r\n" % len(REQUEST) + REQUEST)
        while not conn.complete:
            conn.waiter = loop.create_future()
            await conn.waiter
        idle.append(conn)
        return conn.received

    async def close() -> None:
        for conn in idle:
            conn.transport.close()
    return one, close


async def measure(kind: str, sock: str, requests: int, streams: int, events: int) -> str:
    one, close = await globals()[f"with_{kind}"](sock)
    await one("/small")
    began = time.process_time()
    for _ in range(requests):
        await one("/small")
    small = (time.process_time() - began) / requests * 1e6
    began = time.process_time()
    await asyncio.gather(*(one(f"/stream?n={events}") for _ in range(streams)))
    event = (time.process_time() - began) / (streams * events) * 1e6
    await close()
    return f"| {kind} | {small:.0f} us | {event:.1f} us |"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--serve", help=argparse.SUPPRESS)
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--streams", type=int, default=16)
    parser.add_argument("--events", type=int, default=1000)
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--clients", default="httpx,httpcore,aiohttp,own")
    args = parser.parse_args()
    if args.serve:
        uvloop.run(serve(args.serve))
        return 0
    sock = os.path.join(tempfile.mkdtemp(prefix="corral-clients-"), "child.sock")
    child = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--serve", sock])
    try:
        while not os.path.exists(sock):
            time.sleep(0.05)
        print("| client | CPU per 1-token request | CPU per streamed event |\n| --- | --- | --- |")
        for _ in range(args.repeat):
            for kind in args.clients.split(","):
                print(uvloop.run(measure(kind, sock, args.requests, args.streams, args.events)),
                      flush=True)
    finally:
        child.terminate()
        child.wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
