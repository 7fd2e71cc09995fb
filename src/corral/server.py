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
import threading
import time
from collections.abc import Callable, Iterator
from types import FrameType
from typing import Any

import structlog
import uvicorn

from corral.config import Config
from corral.errors import ConfigError
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


def header_timeout_protocol(timeout_of: Callable[[], float]) -> type[asyncio.Protocol] | str:
    """uvicorn's httptools protocol, closing connections whose headers take too long.

    uvicorn itself waits for headers forever, so a client that opens connections and trickles
    bytes (slowloris) could hold them all. The body has its own limit in the proxy.
    ``timeout_of`` is asked at each arming, so a reload applies to the next request.
    """
    try:
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
    except ImportError:  # httptools missing: h11 without the guard
        return "auto"

    class HeaderTimeoutProtocol(HttpToolsProtocol):
        _header_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport: Any) -> None:
            super().connection_made(transport)
            self._arm()

        def on_message_begin(self) -> None:
            super().on_message_begin()
            self._arm()

        def on_headers_complete(self) -> None:
            self._disarm()
            super().on_headers_complete()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

        def _arm(self) -> None:
            self._disarm()
            self._header_timer = self.loop.call_later(timeout_of(), self._too_slow)

        def _disarm(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _too_slow(self) -> None:
            self._header_timer = None
            log.info("connection_closed", reason="headers not received in time",
                     timeout=timeout_of(), client=str(self.client))
            self.transport.close()

    return HeaderTimeoutProtocol


def serve(config: Config) -> None:
    """Run corral in the foreground until SIGTERM or SIGINT.

    Raises ``AlreadyRunningError`` at once if another corral uses the same state file.
    """
    corral = Corral(config)
    # Taken before uvicorn runs the lifespan, which reaps the state file's children: uvicorn
    # binds its socket only after that, so "address in use" would come too late to protect a
    # running corral's children. Held until this process ends.
    with StateFileLock(corral.supervisor.registry.path):
        _run(config, corral)


def _run(config: Config, corral: Corral) -> None:
    app = create_app(config, corral)
    server = CorralServer(
        uvicorn.Config(
            app,
            host=config.file.listen.host,
            port=config.file.listen.port,
            http=header_timeout_protocol(lambda: corral.config.file.limits.header_timeout),
            lifespan="on",
            access_log=False,  # corral logs each request itself, with model and request_id
            log_level="warning",
            # Requests have drained before uvicorn's own shutdown; this only bounds stragglers.
            timeout_graceful_shutdown=5,
            # Longer than clients keep idle connections (httpx: 5 s, most others up to 60 s),
            # so a client never sends a request on a connection corral is just closing.
            timeout_keep_alive=75,
            server_header=False,
        ),
        corral,
    )
    server.run()
