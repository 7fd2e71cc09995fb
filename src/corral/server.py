"""``corral serve``: the proxy on uvicorn, with the supervisor in its lifespan.

Signals only set flags; uvicorn's main loop (``on_tick``, ten times a second) acts on them:

- SIGTERM / SIGINT: 1. new requests get 503 (``/health`` says draining), 2. in-flight requests
  finish, for up to ``shutdown_timeout``, 3. uvicorn closes its sockets, 4. the lifespan stops
  every child (SIGTERM, then SIGKILL after ``llama_server.stop_timeout``), 5. exit 0.
  A second signal skips the wait.
- SIGHUP: reload the config file (an invalid one is logged and ignored).
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import socket
import threading
import time
from collections.abc import Iterator
from types import FrameType

import structlog
import uvicorn

from corral.config import Config
from corral.connection import guarded_protocol
from corral.errors import ConfigError
from corral.probe.host import prepare_socket_dir
from corral.root import Corral, create_app
from corral.supervisor.children import StateFileLock

log = structlog.get_logger("corral")


class CorralServer(uvicorn.Server):
    """uvicorn's server with corral's drain, reload, and a clean exit code."""

    def __init__(self, config: uvicorn.Config, corral: Corral) -> None:
        super().__init__(config)
        self.corral = corral
        self._drain_requested = False
        self._drain_deadline: float | None = None
        self._reload_requested = False
        self._background: set[asyncio.Task[None]] = set()

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        # Unlike uvicorn's own, this does not re-raise the signal after shutdown: a clean
        # drain should end with exit code 0 for systemd or Kubernetes.
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        handlers = {signal.SIGINT: self.handle_exit, signal.SIGTERM: self.handle_exit,
                    signal.SIGHUP: self.handle_reload}
        previous = {sig: signal.signal(sig, handler) for sig, handler in handlers.items()}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self._drain_requested:
            self.should_exit = True  # a second signal: stop waiting for requests
        self._drain_requested = True

    def handle_reload(self, sig: int, frame: FrameType | None) -> None:
        self._reload_requested = True

    async def on_tick(self, counter: int) -> bool:
        if self._reload_requested:
            self._reload_requested = False
            task = asyncio.create_task(self._reload())
            self._background.add(task)
            task.add_done_callback(self._background.discard)
        if self._drain_requested and self._drain_deadline is None:
            self.corral.drain.draining = True
            # Read now, not at start-up: a reload may have changed it.
            timeout = self.corral.config.file.shutdown_timeout
            self._drain_deadline = time.monotonic() + timeout
            log.info("draining", in_flight=self.corral.drain.active, timeout=timeout)
        if self._drain_deadline is not None and (
            self.corral.drain.active == 0 or time.monotonic() >= self._drain_deadline
        ):
            if self.corral.drain.active:
                log.warning("drain_timeout", in_flight=self.corral.drain.active)
                self.corral.refuse_waiting()
            self.should_exit = True
        return await super().on_tick(counter)

    async def _reload(self) -> None:
        try:
            await self.corral.reload()
        except ConfigError as exc:
            log.error("config_reload_rejected", problems=exc.problems)
        except Exception:
            # Nobody awaits this task: unlogged, the failure would only surface (if ever) as
            # "Task exception was never retrieved" when the task is collected.
            log.exception("config_reload_failed", source=self.corral.config.source)


def serve(config: Config) -> None:
    """Run corral in the foreground until SIGTERM or SIGINT.

    Raises ``AlreadyRunningError`` at once if another corral uses the same state file, and
    ``UnsafeDirectoryError`` if the children's socket directory is not private to this user.
    """
    corral = Corral(config)
    # Taken before uvicorn runs the lifespan, which reaps the state file's children: uvicorn
    # binds its socket only after that, so "address in use" would come too late to protect a
    # running corral's children. Held until this process ends.
    with StateFileLock(corral.supervisor.registry.path):
        # Checked here, not only when the supervisor starts in the lifespan: there a refusal
        # would come out as uvicorn's traceback.
        prepare_socket_dir(corral.supervisor.socket_dir)
        _run(config, corral)


def bind_sockets(hosts: tuple[str, ...], port: int) -> list[socket.socket]:
    """A listening socket on every address of every host, as uvicorn binds one: IPv6
    sockets take IPv6 only, so ``0.0.0.0`` and ``::`` go together. Raises ``OSError`` (the
    address in use, or not on this machine) with the sockets bound so far closed."""
    bound: list[socket.socket] = []
    host = hosts[0]
    try:
        for host in hosts:
            for family, kind, proto, _, address in socket.getaddrinfo(
                    host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE):
                sock = socket.socket(family, kind, proto)
                bound.append(sock)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if family == socket.AF_INET6:
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                sock.bind(address)
                sock.listen(2048)
                sock.set_inheritable(True)
    except OSError as exc:
        for sock in bound:
            sock.close()
        raise OSError(exc.errno, f"cannot listen on {host} port {port}: "
                                 f"{exc.strerror or exc}") from exc
    return bound


def _run(config: Config, corral: Corral) -> None:
    app = create_app(config, corral)
    listen = config.file.listen
    # One address: uvicorn binds it. Several (listen.host as a list): corral binds each.
    try:
        sockets = bind_sockets(listen.hosts, listen.port) if len(listen.hosts) > 1 else None
    except OSError as exc:
        # As uvicorn does for the one address it binds: the reason, and exit status 1.
        log.error("listen_failed", error=str(exc))
        raise SystemExit(1) from None
    server = CorralServer(
        uvicorn.Config(
            app,
            host=listen.hosts[0],
            port=listen.port,
            # Read at each request: a reload applies the new limits to the next one.
            http=guarded_protocol(lambda: corral.config.file.limits),
            ws="none",  # no WebSocket endpoint: an upgrade would leave the guarded protocol
            lifespan="on",
            access_log=False,  # corral logs each request itself, with model and request_id
            log_level="warning",
            log_config=None,  # uvicorn's lines go through corral's logging (corral.logs)
            # X-Forwarded-* only from the proxies the config names; from anyone else, the
            # loopback included, they are ignored.
            proxy_headers=bool(listen.trusted_proxies),
            forwarded_allow_ips=list(listen.trusted_proxies),
            # Requests have drained before uvicorn's own shutdown; this only bounds stragglers.
            timeout_graceful_shutdown=5,
            server_header=False,
        ),
        corral,
    )
    server.run(sockets=sockets)
