"""Clients that press on corral's resources: a stream nobody reads, connections up to the file
descriptor limit, request bodies that cost far more to parse than their size.

The stalled stream comes from the fake llama-server (``big:N``): stalling a write needs a stream
larger than every socket buffer on the way (several MiB on the loopback), which the real one, a
CPU model decoding a few dozen tokens a second, would take minutes to produce.
"""

from __future__ import annotations

import json
import statistics
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest

from tests.conftest import FAKE_LLAMA_SERVER, CorralProcess
from tests.proxy.connections import (
    closed_within,
    connect,
    error_code,
    log_lines,
    peak_rss,
    read_response,
    reset_peak_rss,
)

pytestmark = pytest.mark.integration

Start = Callable[..., CorralProcess]
MiB = 2**20
CHAT = "/v1/chat/completions"


def fake(smollm2: Path, mode: str, **extra: Any) -> dict[str, Any]:
    # The fake ignores the model, but corral places it first: give it a real GGUF header.
    return {"path": str(smollm2), "binary": FAKE_LLAMA_SERVER, "slots": 1, "ctx_per_slot": 256,
            "env": {"FAKE_MODE": mode}, **extra}


def chat(tokens: int, stream: bool) -> bytes:
    return json.dumps({"model": "m", "messages": [{"role": "user", "content": "Hi"}],
                       "max_tokens": tokens, "stream": stream}).encode()


def post(path: str, body: bytes) -> bytes:
    return (f"POST {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode() + body


def test_a_stream_its_client_does_not_read_is_cut_and_its_slot_freed(
    corral: Start, smollm2: Path
) -> None:
    server = corral({"limits": {"write_timeout": "10s"},
                     "models": {"m": fake(smollm2, "big:65536", queue={"timeout": "5m"})}})
    # A client that asks for an endless stream, reads its status line, and then nothing more.
    with connect(server, rcvbuf=4096) as reader, ThreadPoolExecutor(1) as pool:
        reader.sendall(post(CHAT, chat(1_000_000, stream=True)))
        assert reader.recv(64).startswith(b"HTTP/1.1 200")
        server.wait_for(lambda: server.model_status("m")["slots_busy"] == 1)
        # Another client waits for the only slot: it must get it once the stall is noticed,
        # long before its queue timeout.
        waiting = pool.submit(server.http.post, CHAT, content=chat(2, stream=False),
                              headers={"Content-Type": "application/json"}, timeout=120)
        server.wait_for(lambda: server.model_status("m")["queue_depth"] == 1)
        answer = waiting.result(timeout=60)
        assert answer.status_code == 200, answer.text
        assert closed_within(reader, 30) is not None  # aborted, what was buffered dropped
    server.wait_for(lambda: server.model_status("m")["slots_busy"] == 0)
    assert any(line["reason"] == "the client did not read its response"
               for line in log_lines(server, "connection_closed"))
    metrics = server.http.get("/metrics").text
    assert 'corral_requests_total{code="499",endpoint="/v1/chat/completions",model="m"} 1.0' \
        in metrics


def test_running_out_of_file_descriptors_gives_503_never_500_and_passes(
    corral: Start, smollm2: Path
) -> None:
    server = corral({"models": {"m": fake(smollm2, "ok", queue={"timeout": "5s"})}})
    assert server.http.post(CHAT, content=chat(2, False),
                            headers={"Content-Type": "application/json"}).status_code == 200
    proc = psutil.Process(server.proc.pid)
    limits = proc.rlimit(psutil.RLIMIT_NOFILE)
    # A few descriptors to spare, then far more connections than that.
    proc.rlimit(psutil.RLIMIT_NOFILE, (proc.num_fds() + 6, limits[1]))
    socks = [connect(server) for _ in range(60)]
    try:
        server.wait_for(lambda: proc.num_fds() >= proc.rlimit(psutil.RLIMIT_NOFILE)[0] - 1)
        requests = [b"GET /health HTTP/1.1\r\nHost: localhost\r\n\r\n",
                    b"GET /admin/status HTTP/1.1\r\nHost: localhost\r\n\r\n",
                    b"GET /metrics HTTP/1.1\r\nHost: localhost\r\n\r\n",
                    b"GET /admin/models HTTP/1.1\r\nHost: localhost\r\n\r\n",
                    post(CHAT, chat(2, False)),
                    b"POST /admin/models/m/unload HTTP/1.1\r\nHost: localhost\r\n\r\n",
                    post(CHAT, chat(2, False))]
        seen: list[int | str] = []
        for sock, request in zip(socks, requests * 3, strict=False):
            try:
                sock.sendall(request)
                seen.append(read_response(sock, timeout=20)[0])
            except (AssertionError, ConnectionResetError, BrokenPipeError):
                seen.append("refused")  # a connection the kernel accepted and corral could not
        assert 500 not in seen, seen
        assert 503 in seen, seen  # the pressure was real
        assert set(seen) <= {200, 503, "refused"}, seen
    finally:
        for sock in socks:
            sock.close()
    proc.rlimit(psutil.RLIMIT_NOFILE, limits)

    # Once the connections are gone, corral serves again, with no restart of its own.
    def serves() -> bool:
        try:
            return (server.http.get("/admin/status").status_code == 200
                    and server.http.post(CHAT, content=chat(2, False),
                                         headers={"Content-Type": "application/json"}
                                         ).status_code == 200)
        except httpx.TransportError:
            return False

    server.wait_for(serves, timeout=60)
    assert "Traceback" not in server.log()


def nested(size: int) -> bytes:
    """A JSON object of ``size`` bytes that is mostly empty arrays: cheap to send, 20 times
    its size once parsed."""
    head, tail = b'{"model": "nope", "x": [', b"[]]}"
    return head + b"[]," * ((size - len(head) - len(tail)) // 3) + tail


def test_a_body_costly_to_parse_is_refused_before_it_stalls_others(
    corral: Start, smollm2: Path
) -> None:
    server = corral({"models": {"m": {"path": str(smollm2)}}})  # max_body: 16 MiB
    body = nested(16 * MiB - 1024)
    began = time.perf_counter()
    json.loads(body)  # what parsing it costs on this machine, now
    parse = time.perf_counter() - began

    reset_peak_rss(server)
    before = peak_rss(server)
    answer = server.http.post(CHAT, content=body, headers={"Content-Type": "application/json"})
    grew = peak_rss(server) - before

    # Four clients send it over and over; /health must answer meanwhile in far less than one
    # parse takes (it waited for them all: each parse holds the event loop).
    stop = threading.Event()

    def attack() -> int:
        sent = 0
        with httpx.Client(base_url=server.url, timeout=120) as client:
            while not stop.is_set():
                client.post(CHAT, content=body, headers={"Content-Type": "application/json"})
                sent += 1
        return sent

    with ThreadPoolExecutor(4) as pool:
        attackers = [pool.submit(attack) for _ in range(4)]
        waits: list[float] = []
        try:
            for _ in range(10):
                started = time.perf_counter()
                assert server.http.get("/health", timeout=120).status_code == 200
                waits.append(time.perf_counter() - started)
                time.sleep(0.1)
        finally:
            stop.set()
        assert sum(a.result() for a in attackers) >= 4
    # The median: a parse holding the loop would delay most of them; one slow answer on a busy
    # machine is the scheduler, not corral.
    assert statistics.median(waits) < parse / 2, (waits, parse)
    # Parsed, it would have taken some 350 MiB; read and counted, a fraction of its size.
    assert grew < 4 * 16 * MiB, grew
    assert answer.status_code == 413, answer.text
    assert error_code(answer.content) == "request_too_large"
    assert "JSON values" in answer.json()["error"]["message"]
