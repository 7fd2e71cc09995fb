"""stderr holds JSON lines only when it is not a terminal: corral's own events, uvicorn's
warnings and every other library's ``logging`` lines alike; and the HTTP guards never go
missing silently."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

from tests.conftest import CorralProcess, free_port

Start = Callable[..., CorralProcess]


@pytest.mark.integration
def test_every_stderr_line_is_json(corral: Start, smollm2: Path) -> None:
    server = corral({"models": {"m": {"path": str(smollm2)}}})  # stderr: a file
    # uvicorn's own warning, from its logger: a request that is not HTTP.
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(b"NOT HTTP AT ALL\x00\r\n\r\n")
        assert sock.recv(1024).startswith(b"HTTP/1.1 400")
    server.wait_for(lambda: "Invalid HTTP request" in server.log(), timeout=10)
    assert server.stop() == 0
    lines = server.log().splitlines()
    records = []
    for line in lines:
        try:
            records.append(json.loads(line))
        except ValueError:
            pytest.fail(f"not a JSON line on stderr: {line!r}")
    uvicorn = [r for r in records if r.get("logger") == "uvicorn.error"]
    assert uvicorn and uvicorn[0]["event"] == "Invalid HTTP request received."
    assert uvicorn[0]["level"] == "warning" and "timestamp" in uvicorn[0]
    assert {"corral_starting", "draining"} <= {r["event"] for r in records}


def test_corral_refuses_to_serve_without_httptools(tmp_path: Path) -> None:
    # Its connection limits are built on httptools: without it uvicorn would quietly fall back
    # to h11, with no header limits and no timers.
    port = free_port()
    path = tmp_path / "corral.yaml"
    path.write_text(yaml.safe_dump({
        "listen": {"port": port}, "state_file": str(tmp_path / "children.json"),
        "models": {"m": {"path": "m.gguf"}}}))
    code = ("import sys; sys.modules['httptools'] = None; from corral.cli import main; "
            f"sys.exit(main(['serve', '-c', {str(path)!r}]))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60, stdin=subprocess.DEVNULL)
    assert done.returncode == 1, done.stderr
    assert "corral needs httptools" in done.stderr
    assert "pip install httptools" in done.stderr
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
