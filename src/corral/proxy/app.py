"""The ASGI application: the routes of the proxy and the admin API, behind the drain guard.

Usage::

    app = build_app(proxy, admin_routes, lifespan)   # corral.root.create_app does this
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractAsyncContextManager

import structlog
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route
from starlette.types import ASGIApp, Receive, Scope, Send

from corral.echo import clip
from corral.errors import out_of_files
from corral.proxy.drain import DrainGuard
from corral.proxy.errors import BadRequestError, error_response, response_for
from corral.proxy.handlers import Proxy
from corral.proxy.ollama import routes as ollama_routes
from corral.proxy.routing import INFERENCE_PATHS
from corral.proxy.websafety import WebGuard

log = structlog.get_logger("corral.proxy")


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    path = clip(request.url.path)
    if exc.status_code == 405:
        error = BadRequestError(f"method {clip(request.method)} is not allowed on {path}",
                                code="method_not_allowed", status=405)
    elif exc.status_code == 404:
        error = BadRequestError(f"no such endpoint: {path}", code="not_found", status=404)
    else:
        error = BadRequestError(str(exc.detail), code="http_error", status=exc.status_code)
    return response_for(error, dict(exc.headers or {}))


async def _os_error(request: Request, exc: Exception) -> Response:
    if not out_of_files(exc):
        raise exc  # a fault: ServerErrorMiddleware logs it and answers 500
    # Reading /proc for /admin/* and /metrics, or a socket to a child: a shortage that passes
    # (the kernel refuses new connections meanwhile), not a fault.
    log.warning("out_of_file_descriptors", path=clip(request.url.path), error=str(exc))
    return error_response(503, f"corral has run out of file descriptors: {exc}",
                          type_="service_unavailable", code="out_of_file_descriptors",
                          retry_after=1.0)


class InferenceDispatch:
    """POSTs on the model endpoints go straight to their handler; everything else to ``app``.

    They are nearly all of the traffic, and the Starlette stack around a route (two exception
    layers, the router's scan, a request/response wrapper, each wrapping ``send`` again) did
    nothing for them: their handler answers every error itself. The exceptions left are the
    ones Starlette's layers would have met: a shortage of file descriptors answers 503 as
    ``_os_error`` does, and anything else reaches uvicorn, which logs it and answers 500.
    """

    def __init__(self, app: ASGIApp, proxy: Proxy, routes: Sequence[Route]) -> None:
        self.app = app
        self.handler = proxy.inference
        self.routes = {route.path: route for route in routes}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        route = self.routes.get(scope["path"]) if scope["type"] == "http" else None
        if route is None or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        scope["route"] = route  # what the Router would set: the metrics' endpoint label
        request = Request(scope, receive, send)
        try:
            response = await self.handler(request)
        except OSError as exc:  # before the answer started: the handler returns it unsent
            if not out_of_files(exc):
                raise
            response = await _os_error(request, exc)
        await response(scope, receive, send)


def build_app(
    proxy: Proxy,
    admin_routes: Sequence[BaseRoute],
    lifespan: Callable[[Starlette], AbstractAsyncContextManager[None]],
) -> ASGIApp:
    """The corral ASGI app: every route, corral's error shape, the drain guard outside."""
    list_models = proxy.guarded(proxy.list_models, "inference")

    # Read at each request: a reload may flip them.
    def public_health() -> bool:
        return proxy.config.file.auth.public_health

    def public_metrics() -> bool:
        return proxy.config.file.auth.public_metrics

    # The same POSTs are dispatched before Starlette (InferenceDispatch); these routes answer
    # the other methods on those paths with 405.
    inference = [Route(path, proxy.inference, methods=["POST"]) for path in INFERENCE_PATHS]
    routes: list[BaseRoute] = [*inference]
    routes += [
        Route("/props", proxy.model_get, methods=["GET"]),
        Route("/slots", proxy.model_get, methods=["GET"]),
        Route("/slots/{slot:int}", proxy.model_get, methods=["POST"]),
        Route("/lora-adapters", proxy.model_get, methods=["GET", "POST"]),
        Route("/v1/models", list_models, methods=["GET"]),
        Route("/models", list_models, methods=["GET"]),
        Route("/v1/models/{name:path}", proxy.guarded(proxy.get_model, "inference"),
              methods=["GET"]),
        *(Route(path, proxy.guarded(proxy.health, "inference", public_health),
                methods=["GET"]) for path in ("/health", "/v1/health")),
        Route("/metrics", proxy.guarded(proxy.metrics_text, "status", public_metrics),
              methods=["GET"]),
        *admin_routes,
    ]
    routes += ollama_routes(proxy)  # the Ollama API, through the same handlers
    app = Starlette(routes=routes, lifespan=lifespan,
                    exception_handlers={HTTPException: _http_error, OSError: _os_error})
    # Starlette would answer a trailing slash with a redirect to a URL built from the client's
    # Host header, before any key is checked: such paths are simply not found.
    app.router.redirect_slashes = False
    return WebGuard(DrainGuard(InferenceDispatch(app, proxy, inference), proxy.drain),
                    lambda: proxy.config.file)
