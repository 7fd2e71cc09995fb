"""The ASGI application: routes, the drain guard, the lifespan that runs the supervisor.

Usage::

    app = create_app(config)                # owns a Supervisor, started in the lifespan
    uvicorn.run(app, host=..., port=...)
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

import structlog
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from corral.config import Config, load_config, reload_problems
from corral.errors import ReloadRefusedError, ShuttingDownError, out_of_files
from corral.metrics import CorralMetrics
from corral.proxy import admin
from corral.proxy.errors import error_response, response_for
from corral.proxy.handlers import Proxy
from corral.proxy.routing import INFERENCE_PATHS
from corral.supervisor import Supervisor

log = structlog.get_logger("corral.proxy")

# Read while draining, so load balancers and operators can watch the drain; nothing that
# changes state (a load, a reload) is accepted any more.
_ALWAYS_OPEN = ("/health", "/metrics", "/admin/")


class Corral:
    """The running parts of one corral: supervisor, proxy handlers and metrics, and reload."""

    def __init__(self, config: Config, supervisor: Supervisor | None = None) -> None:
        self.config = config
        self.metrics = CorralMetrics()
        self.supervisor = supervisor or Supervisor(config, events=self.metrics)
        self.proxy = Proxy(config, self.supervisor, self.metrics)
        self.metrics.bind(self.supervisor, self.proxy.queues)
        self.draining = False
        self.active = 0  # requests inside the app, streams included
        # Where the socket is bound, for good: a reload may not change it.
        self.listen = config.file.listen

    def refuse_waiting(self) -> None:
        """The drain is over: requests still waiting (for a slot, or for their model to load)
        will be served by no one before the exit, so they get 503 shutting_down now (retry
        elsewhere), not a closed connection."""
        for queue in self.proxy.queues.values():
            queue.refuse_waiters(lambda: ShuttingDownError("corral is shutting down"))
        self.supervisor.refuse_waiting()

    async def reload(self) -> dict[str, Any]:
        """Re-read the config file and apply it; an invalid file changes nothing.

        Raises ``ConfigError`` with every problem of the new file, ``ReloadRefusedError`` when
        it changes a setting only a restart applies or would leave corral's address without
        keys.
        """
        config = load_config(self.config.source)
        problems = reload_problems(self.config, config, self.listen.host)
        if problems:
            raise ReloadRefusedError(config.source, problems)
        changes: dict[str, Any] = self.supervisor.reconfigure(config)
        self.proxy.configure(config)
        self.metrics.bind(self.supervisor, self.proxy.queues)
        self.config = config
        log.info("config_reloaded", source=config.source, **changes)
        return changes


class DrainGuard:
    """Counts requests in flight and, once draining, refuses new ones with 503.

    A plain ASGI wrapper: the whole life of a request, streamed body included, happens inside
    ``await app(...)``, so the count is exact and costs two integer operations.
    """

    def __init__(self, app: ASGIApp, corral: Corral) -> None:
        self.app = app
        self.corral = corral

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        corral = self.corral
        if corral.draining and not (
            scope["method"] in ("GET", "HEAD") and scope["path"].startswith(_ALWAYS_OPEN)
        ):
            response = response_for(ShuttingDownError("corral is shutting down"))
            await response(scope, receive, send)
            return
        corral.active += 1
        try:
            await self.app(scope, receive, send)
        finally:
            corral.active -= 1


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    if exc.status_code == 405:
        message = f"method {request.method} is not allowed on {request.url.path}"
        return error_response(405, message, code="method_not_allowed",
                              headers=dict(exc.headers or {}))
    if exc.status_code == 404:
        return error_response(404, f"no such endpoint: {request.url.path}", code="not_found")
    return error_response(exc.status_code, str(exc.detail), code="http_error")


async def _os_error(request: Request, exc: Exception) -> Response:
    if not out_of_files(exc):
        raise exc  # a fault: ServerErrorMiddleware logs it and answers 500
    # Reading /proc for /admin/* and /metrics, or a socket to a child: a shortage that passes
    # (the kernel refuses new connections meanwhile), not a fault.
    log.warning("out_of_file_descriptors", path=request.url.path, error=str(exc))
    return error_response(503, f"corral has run out of file descriptors: {exc}",
                          type_="service_unavailable", code="out_of_file_descriptors",
                          retry_after=1.0)


def create_app(config: Config, corral: Corral | None = None) -> ASGIApp:
    """The corral ASGI app; its lifespan starts and stops the supervisor."""
    corral = corral or Corral(config)
    proxy = corral.proxy

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await corral.supervisor.start()
        try:
            yield
        finally:
            await corral.supervisor.shutdown()

    list_models = proxy.guarded(proxy.list_models, "inference")

    # Read at each request: a reload may flip them.
    def public_health() -> bool:
        return corral.config.file.auth.public_health

    def public_metrics() -> bool:
        return corral.config.file.auth.public_metrics

    routes = [Route(path, proxy.inference, methods=["POST"]) for path in INFERENCE_PATHS]
    routes += [
        Route("/props", proxy.model_get, methods=["GET"]),
        Route("/slots", proxy.model_get, methods=["GET"]),
        Route("/slots/{slot:int}", proxy.model_get, methods=["POST"]),
        Route("/lora-adapters", proxy.model_get, methods=["GET", "POST"]),
        Route("/v1/models", list_models, methods=["GET"]),
        Route("/models", list_models, methods=["GET"]),
        Route("/v1/models/{name:path}", proxy.guarded(proxy.get_model, "inference"),
              methods=["GET"]),
        Route("/health", proxy.guarded(proxy.health, "inference", public_health),
              methods=["GET"]),
        Route("/metrics", proxy.guarded(proxy.metrics_text, "admin", public_metrics),
              methods=["GET"]),
        *admin.routes(corral),
    ]
    app = Starlette(routes=routes, lifespan=lifespan,
                    exception_handlers={HTTPException: _http_error, OSError: _os_error})
    # Starlette would answer a trailing slash with a redirect to a URL built from the client's
    # Host header, before any key is checked: such paths are simply not found.
    app.router.redirect_slashes = False
    app.state.corral = corral
    return DrainGuard(app, corral)
