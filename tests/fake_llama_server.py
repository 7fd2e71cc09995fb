#!/usr/bin/env python3
"""A fake llama-server, for the faults the real one cannot produce on demand.

The real llama-server cannot be told to crash after N tokens, to hang half-way through an answer
with its health check frozen too, to stream slower than a CPU model, or to answer with broken
HTTP. This stand-in speaks just enough of llama-server's protocol for corral (health, slots,
metrics, chat completions, the private API key) and misbehaves as ``FAKE_MODE`` says:

- ``ok``: a normal stream of ``max_tokens`` tokens (default mode)
- ``crash_after:N``: exit with code 3 after sending N tokens of a stream
- ``cut_after:N``: after N tokens of a stream, send half of the next event, then exit with
  code 3 (a child that dies in the middle of writing)
- ``hang_after:N``: after N tokens stop answering anything, /health included
- ``slow:S``: wait S seconds before each token (a non-streamed answer: S x tokens, then all)
- ``gap:S``: wait S seconds before the first token only
- ``big:N``: each streamed token carries N bytes of text, written as fast as they are read (a
  stream larger than every socket buffer on the way, in well under a second)
- ``broken_http``: answer completions with bytes that are not HTTP
- ``never_ready``: listen, but answer /health with 503 "Loading model" forever, as the real one
  does while it loads (a real load cannot be made to last forever)
- ``ignore_term``: ignore SIGTERM, and start a grandchild (``sleep``) in the same process group
  that ignores it too, so only a SIGKILL of the whole group ends them
- ``leave_helper``: like a wrapper script that started a helper: a grandchild that ignores
  SIGTERM, while the fake itself exits on SIGTERM at once
- ``garbled``: answer /slots and /metrics with malformed content
- ``impostor``: never listen; a process outside the child's process group listens on its
  socket instead (``impostor N`` in ``FAKE_RECORD``: the test must kill it)
- ``echo_body``: answer every model request with what arrived: the body's exact bytes (base64)
  and the header lines, so a test can see what corral sent upstream

Two gates let a test decide when something happens, whatever the machine's speed:
``FAKE_GATE`` (a path): every answer waits for that file to exist before its end (a stream's
``[DONE]``, or a whole non-streamed answer); ``FAKE_LOADING_UNTIL`` (a path): ``/health``
answers 503 "Loading model" until that file exists, a load that lasts until the test ends it.

With ``FAKE_MODEL_MIB`` set, the fake prints a host model buffer of that size at start-up, as
llama-server does at verbosity 4 (a child that uses more memory than corral's estimate).
With ``FAKE_RECORD`` set to a file, the fake appends what a test cannot see from outside:
``pid N`` at start, ``grandchild N``, and ``SIGTERM`` for each SIGTERM it received.

It uses only the standard library so it starts in milliseconds.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import signal
import subprocess
import sys
import time

MODE, _, ARG = os.environ.get("FAKE_MODE", "ok").partition(":")
KEY = os.environ.get("LLAMA_API_KEY", "")
hung = False


def record(line: str) -> None:
    path = os.environ.get("FAKE_RECORD")
    if path:
        with open(path, "a") as out:
            out.write(line + "\n")


def opened(gate: str) -> bool:
    """Whether the gate named by the environment variable ``gate`` is open (or not set)."""
    path = os.environ.get(gate)
    return not path or os.path.exists(path)


async def through(gate: str) -> None:
    while not opened(gate):
        await asyncio.sleep(0.02)


def arg(flag: str, default: str) -> str:
    argv = sys.argv
    return argv[argv.index(flag) + 1] if flag in argv else default


def response(status: int, body: bytes, content_type: str = "application/json") -> bytes:
    head = (f"HTTP/1.1 {status} X\r\nContent-Type: {content_type}\r\n"
            f"Content-Length: {len(body)}\r\n\r\n")
    return head.encode() + body


async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            lines = head.decode().split("\r\n")
            method, path, _ = lines[0].split(" ", 2)
            fields = (line.partition(":") for line in lines[1:] if line)
            pairs = [(k.lower(), v.strip()) for k, _, v in fields]
            headers = dict(pairs)
            body = await reader.readexactly(int(headers.get("content-length", "0")))
            if hung:
                await asyncio.sleep(3600)
            path = path.split("?")[0]
            if path == "/health" and (MODE == "never_ready" or not opened("FAKE_LOADING_UNTIL")):
                # llama-server's own answer while the model loads
                writer.write(response(503, b'{"error":{"code":503,"message":"Loading model",'
                                           b'"type":"unavailable_error"}}'))
            elif path == "/health":
                writer.write(response(200, b'{"status":"ok"}'))
            elif headers.get("authorization") != f"Bearer {KEY}":
                writer.write(response(401, b'{"error":{"message":"Invalid API Key"}}'))
            elif path == "/slots" and MODE == "garbled":
                writer.write(response(200, json.dumps(
                    [1, "x", {"id": 0, "n_ctx": "big", "next_token": ["?"]}]).encode()))
            elif path == "/slots":
                writer.write(response(200, json.dumps(
                    [{"id": 0, "n_ctx": 256, "is_processing": False}]).encode()))
            elif path == "/metrics" and MODE == "garbled":
                writer.write(response(200, b"# TYPE x counter\nx{a=\"1\" 2 3 4\n", "text/plain"))
            elif path == "/metrics":
                writer.write(response(200, b"# TYPE llamacpp:requests_processing gauge\n"
                                           b"llamacpp:requests_processing 0\n", "text/plain"))
            elif MODE == "echo_body":
                echoed = {"body_base64": base64.b64encode(body).decode(), "headers": pairs}
                writer.write(response(200, json.dumps(echoed).encode()))
            elif MODE == "broken_http":
                writer.write(b"this is not HTTP at all\r\n\r\n")
                await writer.drain()
                writer.close()
                return
            else:
                await complete(json.loads(body or b"{}"), writer)
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError):
        writer.close()


async def complete(request: dict[str, object], writer: asyncio.StreamWriter) -> None:
    global hung
    tokens = int(str(request.get("max_tokens", 8)))
    if not request.get("stream"):
        if MODE in ("crash_after", "cut_after"):
            os._exit(3)
        if MODE == "slow":
            await asyncio.sleep(float(ARG) * tokens)
        await through("FAKE_GATE")
        text = " ".join(["tok"] * tokens)
        body = {"choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                             "finish_reason": "length"}], "model": "fake", "object": "chat"}
        writer.write(response(200, json.dumps(body).encode()))
        return
    writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                 b"Transfer-Encoding: chunked\r\n\r\n")
    for i in range(tokens):
        if MODE == "crash_after" and i == int(ARG):
            await writer.drain()
            os._exit(3)
        if MODE == "cut_after" and i == int(ARG):
            writer.write(chunk(b'data: {"choices": [{"index": 0, "del'))
            await writer.drain()
            os._exit(3)
        if MODE == "hang_after" and i == int(ARG):
            await writer.drain()
            hung = True
            await asyncio.sleep(3600)
        if MODE == "slow" or (MODE == "gap" and i == 0):
            await asyncio.sleep(float(ARG))
        text = "x" * int(ARG) if MODE == "big" else f"t{i} "
        event = {"choices": [{"index": 0, "delta": {"content": text}}], "object": "chunk",
                 "created": int(time.time())}
        writer.write(chunk(f"data: {json.dumps(event)}\n\n".encode()))
        await writer.drain()
    await through("FAKE_GATE")
    writer.write(chunk(b"data: [DONE]\n\n") + b"0\r\n\r\n")


def chunk(data: bytes) -> bytes:
    return f"{len(data):x}\r\n".encode() + data + b"\r\n"


async def main() -> None:
    record(f"pid {os.getpid()}")
    if os.environ.get("FAKE_MODEL_MIB"):
        mib = float(os.environ["FAKE_MODEL_MIB"])
        print(f"load_tensors:   CPU_Mapped model buffer size = {mib:8.2f} MiB", flush=True)
    if MODE in ("ignore_term", "leave_helper"):
        # SIG_IGN (unlike a handler) survives exec: the grandchild ignores SIGTERM as well.
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        grandchild = subprocess.Popen(["sleep", "300"], stdin=subprocess.DEVNULL,
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        record(f"grandchild {grandchild.pid}")
    if MODE == "ignore_term":
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, record, "SIGTERM")
    if MODE == "leave_helper":
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
    await serve()


async def serve() -> None:
    host = arg("--host", "127.0.0.1")
    if host.endswith(".sock"):  # as llama-server: a host ending in .sock is a Unix socket
        server = await asyncio.start_unix_server(handle, host)
    else:
        server = await asyncio.start_server(handle, host, int(arg("--port", "8080")))
    print(f"fake llama-server listening, mode {MODE}", flush=True)
    async with server:
        await server.serve_forever()


def impostor() -> None:
    """Another process (its own session, so not in the child's group) takes the child's
    socket and answers as if it were the child; the child itself never listens."""
    if os.fork() == 0:
        os.setsid()
        record(f"impostor {os.getpid()}")
        asyncio.run(serve())
        return
    record(f"pid {os.getpid()}")
    print("fake llama-server: an impostor listens in my place", flush=True)
    time.sleep(3600)


if __name__ == "__main__":
    if MODE == "impostor":
        impostor()
    else:
        asyncio.run(main())
