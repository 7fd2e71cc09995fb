"""The composition root: one running corral's parts, built and wired in one place.

Usage::

    corral = Corral(config)        # metrics, queues, supervisor, proxy
    app = create_app(config, corral)
    uvicorn.run(app, ...)          # corral.server does this, with its drain and reload

The supervisor gets everything it talks to in its constructor: the metrics and the proxy's
queues observe it, and the queues are its demand. Nothing is assigned onto it afterwards.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

import structlog
from starlette.applications import Starlette
from starlette.types import ASGIApp

from corral.config import Config, load_config, reload_problems
from corral.errors import ReloadRefusedError, ShuttingDownError
from corral.metrics import CorralMetrics
from corral.proxy import admin
from corral.proxy.admission import AdmissionQueues
from corral.proxy.app import build_app
from corral.proxy.drain import DrainState
from corral.proxy.handlers import Proxy
from corral.supervisor import Supervisor

log = structlog.get_logger("corral")


class Corral:
    """The running parts of one corral: supervisor, queues, proxy handlers, metrics; reload."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.metrics = CorralMetrics()
        self.queues = AdmissionQueues()
        self.drain = DrainState()
        self.supervisor = Supervisor(config, observers=[self.metrics, self.queues],
                                     demand=self.queues)
        self.proxy = Proxy(config, self.supervisor, self.metrics, self.queues, self.drain)
        self.metrics.bind(self.supervisor, self.queues)
        # Where the socket is bound, for good: a reload may not change it.
        self.listen = config.file.listen

    def refuse_waiting(self) -> None:
        """The drain is over: requests still waiting (for a slot, or for their model to load)
        will be served by no one before the exit, so they get 503 shutting_down now (retry
        elsewhere), not a closed connection."""
        for queue in self.queues.values():
            queue.refuse_waiters(lambda: ShuttingDownError("corral is shutting down"))
        self.supervisor.refuse_waiting()

    async def reload(self) -> dict[str, Any]:
        """Re-read the config file and apply it; an invalid file changes nothing.

        Raises ``ConfigError`` with every problem of the new file, ``ReloadRefusedError`` when
        it changes a setting only a restart applies or would leave corral's address without
        keys.
        """
        config = load_config(self.config.source)
        problems = reload_problems(self.config, config, self.listen.hosts)
        if problems:
            raise ReloadRefusedError(config.source, problems)
        changes: dict[str, Any] = self.supervisor.reconfigure(config)
        self.proxy.configure(config)
        self.metrics.bind(self.supervisor, self.queues)
        self.config = config
        log.info("config_reloaded", source=config.source, **changes)
        return changes


def create_app(config: Config, corral: Corral | None = None) -> ASGIApp:
    """The corral ASGI app; its lifespan starts and stops the supervisor."""
    corral = corral or Corral(config)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await corral.supervisor.start()
        try:
            yield
        finally:
            await corral.supervisor.shutdown()

    return build_app(corral.proxy, admin.routes(corral), lifespan)
