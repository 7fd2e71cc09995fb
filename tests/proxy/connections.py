"""Raw-socket helpers for tests that misbehave below HTTP clients: slow, huge, unread, stalled."""

from __future__ import annotations

import json
import socket
import threading
import time
import weakref
from collections.abc import Iterable
from typing import Any

from tests.conftest import CorralProcess


def connect(server: CorralProcess, rcvbuf: int | None = None) -> socket.socket:
    """A TCP connection to corral; ``rcvbuf`` shrinks the receive buffer (set before connecting,
    so the window the kernel advertises is small from the start)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if rcvbuf is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.settimeout(30)
    sock.connect(("127.0.0.1", server.port))
    return sock


# Bytes read past the end of one response (pipelined answers may arrive in one read): the
# next read_response on that socket starts with them.
_LEFTOVER: weakref.WeakKeyDictionary[socket.socket, bytes] = weakref.WeakKeyDictionary()


def read_response(sock: socket.socket, timeout: float = 30) -> tuple[int, dict[str, str], bytes]:
    """One response with a Content-Length body: status, headers (lower-case), body."""
    sock.settimeout(timeout)
    data = _LEFTOVER.pop(sock, b"")
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            raise AssertionError(f"connection closed before a response: {data!r}")
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (x.partition(":") for x in lines)}
    if "content-length" not in headers:
        return int(status_line.split()[1]), headers, body  # what came with it, as it came
    length = int(headers["content-length"])
    while len(body) < length:
        chunk = sock.recv(65536)
        if not chunk:
            break
        body += chunk
    if len(body) > length:
        _LEFTOVER[sock] = body[length:]
    return int(status_line.split()[1]), headers, body[:length]


def error_code(body: bytes) -> str:
    error: dict[str, Any] = json.loads(body)["error"]
    assert set(error) == {"message", "type", "code"}
    return str(error["code"])


def closed_within(sock: socket.socket, timeout: float) -> float | None:
    """Seconds until corral closes the connection (what it still sends is read and dropped);
    None if it is still open after ``timeout``."""
    began = time.monotonic()
    sock.settimeout(0.2)
    while time.monotonic() - began < timeout:
        try:
            if not sock.recv(65536):
                return time.monotonic() - began
        except TimeoutError:
            continue
        except ConnectionResetError:
            return time.monotonic() - began
    return None


def send_in_background(sock: socket.socket, chunks: Iterable[bytes]) -> threading.Thread:
    """Send ``chunks`` from a thread until they run out or corral closes the connection."""
    def pump() -> None:
        try:
            for chunk in chunks:
                sock.sendall(chunk)
        except OSError:
            pass  # corral closed the connection: what it did before is what the test checks

    thread = threading.Thread(target=pump, daemon=True)
    thread.start()
    return thread


def reset_peak_rss(server: CorralProcess) -> None:
    """Start corral's VmHWM afresh from what it holds now (Linux: clear_refs 5)."""
    with open(f"/proc/{server.proc.pid}/clear_refs", "w") as refs:
        refs.write("5")


def peak_rss(server: CorralProcess) -> int:
    """corral's peak resident memory so far (VmHWM), in bytes."""
    with open(f"/proc/{server.proc.pid}/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM in /proc/PID/status")


def log_lines(server: CorralProcess, event: str) -> list[dict[str, Any]]:
    lines = [json.loads(x) for x in server.log().splitlines() if x.startswith("{")]
    return [x for x in lines if x.get("event") == event]
