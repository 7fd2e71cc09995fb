"""One llama-server child: spawn it, wait until it is ready, stop it, keep what it printed.

Usage::

    proc = ModelProcess(spec, plan.args, plan.env, settings, log_tail)
    await proc.start()
    await proc.wait_ready(settings.startup_timeout)   # raises ModelLoadError
    ...                                                # proc.client talks to it
    await proc.stop(settings.stop_timeout)
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import shutil
import signal
import socket
import time
from collections import deque
from collections.abc import Collection, Mapping, Sequence
from functools import partial

import httpx
import structlog

from corral.config.schema import LlamaServerSettings, ModelSpec, UpstreamSettings
from corral.errors import ModelLoadError
from corral.supervisor.children import child_preexec

log = structlog.get_logger("corral.supervisor")

LOG_TAIL_LINES = 200
_HEALTH_POLL_SECONDS = 0.1
# Lines of llama-server output quoted in a load error: enough to show its own reason.
ERROR_TAIL_LINES = 15


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def resolve_binary(binary: str) -> str | None:
    """The executable ``binary`` names: a path, or a name looked up in PATH and beside python."""
    if os.sep in binary:
        return binary if os.access(binary, os.X_OK) else None
    found = shutil.which(binary)
    if found is None:
        # `make` installs llama-server into the virtual environment's bin, which is not always
        # on PATH (for example when corral is started as .venv/bin/corral).
        import sys

        candidate = os.path.join(os.path.dirname(sys.executable), binary)
        found = candidate if os.access(candidate, os.X_OK) else None
    return found


def child_env(
    inherited: Mapping[str, str], configured: Mapping[str, str], planned: Mapping[str, str],
    api_key: str, secret: Collection[str] = (),
) -> dict[str, str]:
    """A child's environment: corral's own, less its API keys and any ``LLAMA_ARG_*`` (which
    would set llama-server flags unchecked), then the configured ``env``, then the plan's GPU
    selection, which nothing overrides, and the child's private key."""
    env = {k: v for k, v in inherited.items()
           if k not in secret and not k.startswith("LLAMA_ARG_")}
    env.update(configured)
    env.update(planned)
    env["LLAMA_API_KEY"] = api_key
    return env


class ModelProcess:
    """A running (or finished) llama-server for one model, with its own pooled HTTP client."""

    def __init__(
        self,
        spec: ModelSpec,
        server_args: Sequence[str],
        env: Mapping[str, str],
        settings: LlamaServerSettings,
        log_tail: deque[str],
        upstream: UpstreamSettings | None = None,
        secret_env: Collection[str] = (),
    ) -> None:
        self.spec = spec
        self.secret_env = frozenset(secret_env)
        self.upstream = upstream or UpstreamSettings()
        self.server_args = list(server_args)
        self.env = dict(env)
        self.settings = settings
        self.log_tail = log_tail
        self.port = 0
        self.pid: int | None = None
        self.started_at = 0.0
        # A private key per child: its loopback port is useless to anyone who goes around corral.
        self.api_key = secrets.token_urlsafe(24)
        self.client: httpx.AsyncClient | None = None
        # Everything printed until the child is ready: its buffer sizes are among these lines,
        # and with many tensors or slots they can scroll out of the 200-line tail.
        self.startup_lines: list[str] | None = []
        self.ready_lines: list[str] = []  # startup_lines, once the child is ready
        self._proc: asyncio.subprocess.Process | None = None
        self._pump: asyncio.Task[None] | None = None
        self._exited: asyncio.Task[int] | None = None

    @property
    def returncode(self) -> int | None:
        return None if self._proc is None else self._proc.returncode

    def command(self, binary: str) -> list[str]:
        return [
            binary,
            "-m", str(self.spec.path),
            "--host", "127.0.0.1",
            "--port", str(self.port),
            "--alias", self.spec.name,
            "--metrics",
            "--no-webui",
            # Verbosity 4 prints the buffer sizes corral compares with its estimate.
            "--log-verbosity", "4",
            *self.server_args,
            *self.spec.args,
        ]

    async def start(self) -> None:
        """Spawn the child; raise ``ModelLoadError`` if it cannot even be started."""
        wanted = self.spec.binary or self.settings.binary
        binary = resolve_binary(wanted)
        if binary is None:
            raise ModelLoadError(
                self.spec.name,
                f"llama-server binary {wanted!r} not found "
                "(set llama_server.binary, or run scripts/install-llama-server)",
                retry_after=30.0,
            )
        self.port = free_port()
        env = child_env(os.environ, self.spec.env, self.env, self.api_key, self.secret_env)
        argv = self.command(binary)
        try:
            self._proc = await asyncio.create_subprocess_exec(
                *argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT,
                env=env,
                preexec_fn=partial(child_preexec, os.getpid()),
                limit=1 << 20,
            )
        except OSError as exc:
            raise ModelLoadError(self.spec.name, f"cannot start {binary}: {exc}") from None
        self.pid = self._proc.pid
        self.started_at = time.time()
        self.client = httpx.AsyncClient(
            base_url=f"http://127.0.0.1:{self.port}",
            headers={"Authorization": f"Bearer {self.api_key}"},
            # The read timeout is the silence allowed between chunks; it must outlast the
            # longest non-streamed generation. Hung children are caught by health probes.
            timeout=httpx.Timeout(connect=self.upstream.connect_timeout,
                                  read=self.upstream.read_timeout, write=60.0, pool=None),
            # llama-server (cpp-httplib) closes idle connections after 5 s; httpx's default
            # expiry is also 5 s, so a request could pick a connection the child is closing.
            limits=httpx.Limits(max_connections=None, max_keepalive_connections=64,
                                keepalive_expiry=2.0),
        )
        self._pump = asyncio.create_task(self._pump_output(self._proc.stdout))
        self._exited = asyncio.create_task(self._wait_exit(self._proc))
        log.info("child_started", model=self.spec.name, pid=self.pid, port=self.port,
                 argv=argv[1:])

    async def _wait_exit(self, proc: asyncio.subprocess.Process) -> int:
        code = await proc.wait()
        # Whatever the child started in its group (a wrapper script's helpers) goes with it, even
        # when the child itself left at once: a stop or a crash must leave nothing running.
        # The id cannot name someone else's group: Linux keeps a pid number taken while a group
        # of that id has members, and hands out numbers cyclically, so reusing it the moment
        # the group empties would take a wrap of the whole pid space in between.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        return code

    async def wait_ready(self, timeout: float) -> None:
        """Poll ``/health`` until 200; raise ``ModelLoadError`` on exit or after ``timeout``."""
        assert self.client is not None and self._exited is not None
        deadline = time.monotonic() + timeout
        while True:
            if self._exited.done():
                await self._drain_output()
                raise ModelLoadError(
                    self.spec.name,
                    f"llama-server exited with code {self._exited.result()} while loading",
                    self.error_lines(),
                )
            with contextlib.suppress(httpx.TransportError):
                response = await self.client.get("/health", timeout=2.0)
                if response.status_code == 200:
                    self.ready_lines = self.startup_lines or []
                    self.startup_lines = None
                    return
            if time.monotonic() >= deadline:
                await self.kill()
                raise ModelLoadError(
                    self.spec.name,
                    f"llama-server was not ready within {timeout:g}s",
                    self.error_lines(),
                )
            await asyncio.wait({self._exited}, timeout=_HEALTH_POLL_SECONDS)

    async def exited_within(self, timeout: float) -> bool:
        """Wait up to ``timeout`` for the child to exit; say whether it did."""
        assert self._exited is not None
        done, _ = await asyncio.wait({self._exited}, timeout=timeout)
        return bool(done)

    async def healthy(self, timeout: float) -> bool:
        """One liveness probe: does ``/health`` answer 200 within ``timeout``?"""
        if self.client is None:
            return False
        try:
            response = await self.client.get("/health", timeout=timeout)
        except httpx.HTTPError:
            return False
        return response.status_code == 200

    async def wait(self) -> int:
        """Wait for the child to exit, however that happens; return its exit code."""
        assert self._exited is not None
        code = await asyncio.shield(self._exited)
        await self._drain_output()
        return code

    async def stop(self, timeout: float) -> int | None:
        """SIGTERM the child's process group, SIGKILL after ``timeout``; return the exit code."""
        if self._proc is None or self._exited is None:
            return None
        if not self._exited.done():
            self._signal(signal.SIGTERM)
            done, _ = await asyncio.wait({self._exited}, timeout=timeout)
            if not done:
                log.warning("child_kill_after_timeout", model=self.spec.name, pid=self.pid,
                            timeout=timeout)
                await self.kill()
        await self.close()
        return self._proc.returncode

    async def kill(self) -> None:
        """SIGKILL the whole process group and wait for the exit (bounded)."""
        if self._exited is None or self._exited.done():
            return
        self._signal(signal.SIGKILL)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(self._exited), timeout=10.0)

    async def close(self) -> None:
        await self._drain_output()
        if self.client is not None:
            await self.client.aclose()

    def error_lines(self) -> list[str]:
        return list(self.log_tail)[-ERROR_TAIL_LINES:]

    def _signal(self, signum: int) -> None:
        assert self._proc is not None
        try:
            os.killpg(self._proc.pid, signum)
        except ProcessLookupError:
            pass
        except PermissionError:  # not our group after all: signal the process alone
            with contextlib.suppress(ProcessLookupError):
                self._proc.send_signal(signum)

    async def _drain_output(self) -> None:
        if self._pump is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(self._pump), timeout=2.0)

    async def _pump_output(self, stream: asyncio.StreamReader | None) -> None:
        if stream is None:
            return
        bound = log.bind(model=self.spec.name, pid=self.pid)
        while True:
            try:
                raw = await stream.readline()
            except ValueError:  # a line over the reader's limit: keep its start
                raw = await stream.read(1 << 16)
            if not raw:
                return
            line = raw.decode("utf-8", "replace").rstrip()
            if line:
                self.log_tail.append(line)
                if self.startup_lines is not None:
                    self.startup_lines.append(line)
                bound.debug("child_output", line=line)
