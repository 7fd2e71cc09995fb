"""One llama-server child: spawn it, wait until it is ready, stop it, keep what it printed.

Usage::

    proc = ModelProcess("smollm2", child_command(spec, plan, binary, socket), spec.env,
                        log_tail, upstream)
    await proc.start()
    await proc.wait_ready(settings.startup_timeout)   # raises ModelLoadError
    ...                                                # proc.client talks to it
    await proc.stop(settings.stop_timeout)

Each child listens on a Unix socket in a directory only corral's user may enter
(``corral.probe.host.prepare_socket_dir``), so no other local user can bind it first or reach
the child around corral; and before it counts as ready, the socket must be the child's own (the
listening process is the child or in its process group), so not even a process of corral's own
user that got there first is taken for it.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import secrets
import signal
import socket
import struct
import time
from collections import deque
from collections.abc import Collection, Mapping
from functools import partial

import httpx
import structlog

from corral.config.schema import UpstreamSettings
from corral.errors import ModelLoadError
from corral.llamacpp.command import ChildCommand, child_env
from corral.supervisor.childhttp import ChildSession
from corral.supervisor.children import child_preexec

log = structlog.get_logger("corral.supervisor")

LOG_TAIL_LINES = 200
_HEALTH_POLL_SECONDS = 0.1
_HEALTH_POLL_MIN = 0.01
# Lines of llama-server output quoted in a load error: enough to show its own reason.
ERROR_TAIL_LINES = 15
# The child's output: read in pieces of at most this many bytes (also the longest line kept
# whole), and, once the child serves, at most every _OUTPUT_PAUSE seconds.
_OUTPUT_READ = 1 << 16
_OUTPUT_PAUSE = 0.05
# The host is short of something every process needs: no fault of the model.
_PRESSURE = frozenset({errno.EMFILE, errno.ENFILE, errno.EAGAIN, errno.ENOMEM})


def listener_pid(path: str) -> int | None:
    """The pid of the process listening on the Unix socket ``path`` (``SO_PEERCRED``)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(2.0)
        try:
            sock.connect(path)
            creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                    struct.calcsize("3i"))
        except OSError:
            return None
    pid, _uid, _gid = struct.unpack("3i", creds)
    return int(pid)


class ModelProcess:
    """A running (or finished) llama-server for one model, with its own pooled HTTP client."""

    def __init__(
        self,
        model: str,
        command: ChildCommand,
        configured_env: Mapping[str, str],
        log_tail: deque[str],
        upstream: UpstreamSettings | None = None,
        secret_env: Collection[str] = (),
    ) -> None:
        self.model = model
        self.command = command
        self.socket = command.socket
        self.configured_env = dict(configured_env)
        self.secret_env = frozenset(secret_env)
        self.upstream = upstream or UpstreamSettings()
        self.log_tail = log_tail
        self.pid: int | None = None
        self.started_at = 0.0
        # A private key per child: even a process that reached its socket could not use it.
        self.api_key = secrets.token_urlsafe(24)
        self.client: httpx.AsyncClient | None = None
        self.session: ChildSession | None = None  # model requests (corral.supervisor.childhttp)
        # Everything printed until the child is ready: its buffer sizes are among these lines,
        # and with many tensors or slots they can scroll out of the 200-line tail.
        self.startup_lines: list[str] | None = []
        self.ready_lines: list[str] = []  # startup_lines, once the child is ready
        self._proc: asyncio.subprocess.Process | None = None
        self._pump: asyncio.Task[None] | None = None
        self._exited: asyncio.Task[int] | None = None
        # Set when the loading child prints: its last lines come as it starts to serve, so
        # /health is asked then rather than up to a poll interval later (a cold first token).
        self._printed = asyncio.Event()
        self._output_wanted = asyncio.Event()  # set once the child exits: read all, no pauses

    @property
    def returncode(self) -> int | None:
        return None if self._proc is None else self._proc.returncode

    async def start(self) -> None:
        """Spawn the child; raise ``ModelLoadError`` if it cannot even be started."""
        # A socket file left by an earlier child would make the new one fail to bind.
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.socket)
        env = child_env(os.environ, self.configured_env, self.command.env, self.api_key,
                        self.secret_env)
        argv = self.command.argv
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
            raise ModelLoadError(self.model, f"cannot start {argv[0]}: {exc}",
                                 pressure=exc.errno in _PRESSURE) from None
        self.pid = self._proc.pid
        self.started_at = time.time()
        self.client = httpx.AsyncClient(
            # llama-server (cpp-httplib) closes idle connections after 5 s; httpx's default
            # expiry is also 5 s, so a request could pick a connection the child is closing.
            transport=httpx.AsyncHTTPTransport(
                uds=self.socket,
                # Plain HTTP on a Unix socket: no TLS is ever spoken, and the default context
                # (the CA bundle read on the event loop) cost 20+ ms of every child start.
                verify=False,
                limits=httpx.Limits(max_connections=None, max_keepalive_connections=64,
                                    keepalive_expiry=2.0)),
            base_url="http://llama-server",
            headers={"Authorization": f"Bearer {self.api_key}"},
            # The read timeout is the silence allowed between chunks; it must outlast the
            # longest non-streamed generation. Hung children are caught by health probes.
            timeout=httpx.Timeout(connect=self.upstream.connect_timeout,
                                  read=self.upstream.read_timeout, write=60.0, pool=None),
        )
        self.session = ChildSession(self.socket, self.api_key, self.upstream.connect_timeout,
                                    self.upstream.read_timeout)
        self._pump = asyncio.create_task(self._pump_output(self._proc.stdout))
        self._exited = asyncio.create_task(self._wait_exit(self._proc))
        log.info("child_started", model=self.model, pid=self.pid, socket=self.socket,
                 argv=list(argv[1:]))

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
                    self.model,
                    f"llama-server exited with code {self._exited.result()} while loading",
                    self.error_lines(),
                )
            self._printed.clear()
            with contextlib.suppress(httpx.TransportError):
                response = await self.client.get("/health", timeout=2.0)
                if response.status_code == 200:
                    await self._check_owner()
                    self.ready_lines = self.startup_lines or []
                    self.startup_lines = None
                    return
            if time.monotonic() >= deadline:
                await self.kill()
                raise ModelLoadError(
                    self.model,
                    f"llama-server was not ready within {timeout:g}s",
                    self.error_lines(),
                )
            await self._next_poll()

    async def _next_poll(self) -> None:
        """Wait until the child prints or exits, or ``_HEALTH_POLL_SECONDS`` pass; never less
        than ``_HEALTH_POLL_MIN`` (a child printing hundreds of lines is not asked each time)."""
        assert self._exited is not None
        await asyncio.sleep(_HEALTH_POLL_MIN)
        printed = asyncio.ensure_future(self._printed.wait())
        try:
            await asyncio.wait({self._exited, printed}, timeout=_HEALTH_POLL_SECONDS,
                               return_when=asyncio.FIRST_COMPLETED)
        finally:
            printed.cancel()

    async def _check_owner(self) -> None:
        """Raise ``ModelLoadError`` unless the child (or its process group) owns the socket
        that answered: an impostor that bound it first is never taken for the child."""
        owner = await asyncio.to_thread(listener_pid, self.socket)
        if owner is not None and owner != self.pid:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                if os.getpgid(owner) == self.pid:
                    return  # a wrapper's llama-server, in the child's own group
        if owner != self.pid:
            log.error("child_socket_not_its_own", model=self.model, pid=self.pid,
                      socket=self.socket, owner=owner)
            await self.kill()
            raise ModelLoadError(
                self.model, f"the socket {self.socket} is held by pid {owner}, not by the "
                f"child (pid {self.pid}): refusing to send it requests", self.error_lines())

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
        except (httpx.HTTPError, RuntimeError):  # RuntimeError: closed by a stop meanwhile
            return False
        return response.status_code == 200

    async def wait(self) -> int:
        """Wait for the child to exit, however that happens; return its exit code."""
        assert self._exited is not None
        code = await asyncio.shield(self._exited)
        await self._drain_output()
        return code

    async def stop(self, timeout: float, idle: bool = False) -> int | None:
        """SIGTERM the child's process group, SIGKILL after ``timeout``; return the exit code.

        ``idle``: no request is using the child's connections (the caller's leases are all
        back), so they are closed at once rather than after the exit.
        """
        if self._proc is None or self._exited is None:
            return None
        if not self._exited.done():
            self._signal(signal.SIGTERM)
            if idle:
                # llama-server's HTTP workers notice the stop only after their wait on an
                # idle keep-alive connection (about 0.1 s): ours, closed now, let it exit at
                # once (an eviction is that much shorter: P5 in docs/benchmarks.md). Never
                # under a request: a stream whose connection corral closed would not end, as
                # one the exiting child closes does.
                await self._close_clients()
            done, _ = await asyncio.wait({self._exited}, timeout=timeout)
            if not done:
                log.warning("child_kill_after_timeout", model=self.model, pid=self.pid,
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
        await self._close_clients()

    async def _close_clients(self) -> None:
        if self.client is not None:
            await self.client.aclose()
        if self.session is not None:
            await self.session.aclose()

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
        self._output_wanted.set()
        if self._pump is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(self._pump), timeout=2.0)

    async def _pump_output(self, stream: asyncio.StreamReader | None) -> None:
        if stream is None:
            return
        bound = log.bind(model=self.model, pid=self.pid)
        pending = b""
        while True:
            raw = await stream.read(_OUTPUT_READ)  # whatever has arrived, lines and parts
            if not raw:
                if pending:
                    self._output_line(bound, pending)
                return
            *lines, pending = (pending + raw).split(b"\n")
            if len(pending) >= _OUTPUT_READ:  # a line without end: keep its start
                lines.append(pending)
                pending = b""
            for line in lines:
                self._output_line(bound, line)
            if lines:
                self._printed.set()
            if self.startup_lines is None:
                await self._let_output_gather()

    async def _let_output_gather(self) -> None:
        """Leave the child's output in its pipe for ``_OUTPUT_PAUSE`` seconds.

        A serving llama-server writes about ten lines per request, one write each, as it
        answers. Read as they came, each woke corral's event loop (a read, a callback) just when
        it had the answer to relay: a quarter of corral's CPU per 1-token request (P1 in
        docs/benchmarks.md). Paused, they gather in the pipe (64 KiB; the child's log thread
        waits if it fills, not its inference) and one read takes them all.
        """
        # asyncio's Process keeps its pipes' transports to itself: without one, the lines are
        # still read together, only not held back in the pipe.
        owner = getattr(self._proc, "_transport", None)
        pipe = owner.get_pipe_transport(1) if owner is not None else None
        if pipe is not None:
            pipe.pause_reading()
        try:
            # Cut short when the child's end is awaited: its last lines (and the end of the
            # pipe) are wanted now, not a pause later (every stop waited for them).
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._output_wanted.wait(), _OUTPUT_PAUSE)
        finally:
            if pipe is not None and not pipe.is_closing():
                pipe.resume_reading()

    def _output_line(self, bound: structlog.typing.FilteringBoundLogger, raw: bytes) -> None:
        line = raw.decode("utf-8", "replace").rstrip()
        if line:
            self.log_tail.append(line)
            if self.startup_lines is not None:
                self.startup_lines.append(line)
            bound.debug("child_output", line=line)
