"""Every phase of a connection is bounded: head size and count, unread bodies, idle time; no
redirect before a key is checked; forwarded addresses only from trusted proxies.

All against a real corral process over raw sockets, since HTTP clients cannot misbehave this way.
None of these needs a model.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from corral.config import parse_config, reload_problems
from corral.errors import ConfigError
from tests.conftest import CorralProcess, launch
from tests.proxy.connections import (
    closed_within,
    connect,
    error_code,
    log_lines,
    peak_rss,
    read_response,
    reset_peak_rss,
    send_in_background,
)

pytestmark = pytest.mark.integration

Start = Callable[..., CorralProcess]
MiB = 2**20
LIMITS = {"header_timeout": "5s", "body_timeout": "1s", "idle_timeout": "1s"}


@pytest.fixture(scope="module")
def server(
    smollm2: Path, tmp_path_factory: pytest.TempPathFactory, llama_server: str
) -> Iterator[CorralProcess]:
    # One corral for the module; header limits at their defaults (64 KiB, 100 lines).
    corral = launch(tmp_path_factory.mktemp("connections"), llama_server, {
        "limits": LIMITS, "models": {"m": {"path": str(smollm2), "slots": 1,
                                           "ctx_per_slot": 256}}})
    try:
        corral.wait_healthy()
        yield corral
    finally:
        corral.close()


def endless(first: bytes, line: bytes, total: int) -> Iterator[bytes]:
    """``first``, then ``line`` over and over, ``total`` bytes in all, in 64 KiB writes."""
    yield first
    batch = line * max(1, 65536 // len(line))
    for _ in range(total // len(batch)):
        yield batch


def test_huge_headers_get_431_and_cost_no_memory(server: CorralProcess) -> None:
    # The attack that grew an unguarded corral by 560 MiB in 3 s: five connections sending
    # endless header lines, plus one single 10 MiB header value.
    reset_peak_rss(server)
    before = peak_rss(server)
    socks = [connect(server) for _ in range(6)]
    senders = [send_in_background(sock, endless(
        b"GET /health HTTP/1.1\r\nHost: localhost\r\n", b"X-Filler: " + b"a" * 1000 + b"\r\n",
        10 * MiB))
        for sock in socks[:5]]
    senders.append(send_in_background(socks[5], endless(
        b"GET /health HTTP/1.1\r\nHost: localhost\r\nX-Big: ", b"a", 10 * MiB)))
    for sock in socks:
        status, headers, body = read_response(sock)
        assert status == 431, body
        assert headers["connection"] == "close"
        assert error_code(body) == "headers_too_large"
        assert "limits.max_header_bytes" in json.loads(body)["error"]["message"]
        assert closed_within(sock, 30) is not None
        sock.close()
    for sender in senders:
        sender.join(30)
    # 60 MiB sent; what corral holds of it is one read per connection at most.
    grew = peak_rss(server) - before
    assert grew < 16 * MiB, grew
    assert server.http.get("/health").status_code == 200


def test_too_many_header_lines_get_431_and_ordinary_ones_pass(server: CorralProcess) -> None:
    head = b"GET /health HTTP/1.1\r\nHost: localhost\r\n"
    with connect(server) as sock:
        sock.sendall(head + b"".join(b"X-H%d: v\r\n" % i for i in range(150)) + b"\r\n")
        status, _, body = read_response(sock)
    assert status == 431
    assert "limits.max_headers" in json.loads(body)["error"]["message"]
    # 90 headers of 500 bytes: large for a client, well within the limits.
    with connect(server) as sock:
        sock.sendall(head + b"".join(b"X-H%d: %s\r\n" % (i, b"v" * 500) for i in range(90))
                     + b"\r\n")
        assert read_response(sock)[0] == 200


def test_an_unread_request_body_does_not_keep_the_connection_open(
    server: CorralProcess,
) -> None:
    # /health reads no body: the response goes out at once, and the rest of the declared
    # gigabyte never comes. The connection must not wait for it for ever.
    with connect(server) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: localhost\r\n"
                     b"Content-Length: 1000000000\r\n\r\n")
        assert read_response(sock)[0] == 200
        sock.sendall(b"x")
        took = closed_within(sock, 30)
    assert took is not None, "the connection stayed open"
    assert took < 1 + 10  # body_timeout, with a wide margin
    assert any(line["reason"] == "request body not received in time"
               for line in log_lines(server, "connection_closed"))


def test_an_idle_connection_is_closed_even_when_it_trickles_blank_lines(
    server: CorralProcess,
) -> None:
    # Any byte cancelled uvicorn's keep-alive timer, so blank lines sent now and then kept an
    # idle connection open for ever.
    with connect(server) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: localhost\r\n\r\n")
        assert read_response(sock)[0] == 200
        began = time.monotonic()
        while time.monotonic() - began < 30:
            try:
                sock.sendall(b"\r\n")
            except OSError:
                break  # closed
            if closed_within(sock, 0.3) is not None:
                break
        took = time.monotonic() - began
    assert took < 1 + 10  # idle_timeout, with a wide margin


def test_a_keep_alive_connection_serves_several_requests(server: CorralProcess) -> None:
    # The timers bound what is idle or slow, not a connection in use.
    with connect(server) as sock:
        for _ in range(3):
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: localhost\r\n\r\n")
            assert read_response(sock)[0] == 200
        sock.sendall(b"POST /admin/reload HTTP/1.1\r\nHost: localhost\r\n"
                     b"Content-Length: 2\r\n\r\n{}")
        assert read_response(sock)[0] == 200
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: localhost\r\n\r\n")
        assert read_response(sock)[0] == 200
        # Pipelined: the second head arrives while the first request is served.
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: localhost\r\n\r\n" * 2)
        assert read_response(sock)[0] == 200
        assert read_response(sock)[0] == 200


@pytest.mark.parametrize(("method", "path"), [
    ("GET", "/health/"), ("GET", "/admin/status/"), ("GET", "/metrics/"),
    ("POST", "/v1/chat/completions/"), ("POST", "/admin/reload/")])
def test_a_trailing_slash_is_not_found_never_redirected(
    server: CorralProcess, method: str, path: str
) -> None:
    # A Host corral accepts (any other gets 421 first), and one a redirect would point to.
    response = server.http.request(method, path, headers={"Host": "localhost:1"})
    assert response.status_code == 404, response.headers
    assert "location" not in response.headers
    assert error_code(response.content) == "not_found"


def _client_logged(server: CorralProcess, headers: dict[str, str]) -> str:
    request_id = uuid.uuid4().hex
    response = server.http.post("/v1/chat/completions", json={"model": "nope"},
                                headers={**headers, "X-Request-Id": request_id})
    assert response.status_code == 404
    server.wait_for(lambda: request_id in server.log(), timeout=10)
    (line,) = [x for x in log_lines(server, "request") if x["request_id"] == request_id]
    return str(line["client"])


FORWARDED = {"X-Forwarded-For": "203.0.113.9", "X-Forwarded-Proto": "https"}


def test_forwarded_headers_are_ignored_by_default(server: CorralProcess) -> None:
    # From the loopback too: a local client may not pose as another address.
    assert _client_logged(server, FORWARDED) == "127.0.0.1"


def test_forwarded_headers_are_believed_from_a_trusted_proxy(
    corral: Start, smollm2: Path
) -> None:
    trusting = corral({"listen": {"host": "127.0.0.1", "trusted_proxies": ["127.0.0.0/8"]},
                       "models": {"m": {"path": str(smollm2)}}})
    assert _client_logged(trusting, FORWARDED) == "203.0.113.9"
    assert _client_logged(trusting, {}) == "127.0.0.1"


def test_trusted_proxies_must_be_addresses() -> None:
    base: dict[str, Any] = {"models": {"m": {"path": "m.gguf"}}}
    with pytest.raises(ConfigError) as info:
        parse_config({**base, "listen": {"trusted_proxies": ["10.0.0.0/8", "proxy.local"]}})
    assert info.value.problems == [
        "listen.trusted_proxies.1: must be an IP address or network, e.g. 10.0.0.5 or "
        "10.0.0.0/24, got 'proxy.local'"]
    limits = parse_config({**base, "limits": {"max_header_bytes": "8KiB", "max_headers": 20,
                                              "idle_timeout": "5s", "write_timeout": "1m"}})
    assert limits.file.limits.max_header_bytes == 8192
    assert (limits.file.limits.idle_timeout, limits.file.limits.write_timeout) == (5.0, 60.0)
    defaults = parse_config(base).file.limits
    assert (defaults.max_header_bytes, defaults.max_headers) == (64 * 1024, 100)
    assert (defaults.idle_timeout, defaults.write_timeout) == (75.0, 60.0)
    # uvicorn reads it once, at start-up: a reload may not change it.
    trusting = parse_config({**base, "listen": {"trusted_proxies": ["10.0.0.1"]}})
    assert reload_problems(parse_config(base), trusting, "127.0.0.1") == [
        "listen.trusted_proxies: needs a restart (running with [], the file says ['10.0.0.1'])"]
