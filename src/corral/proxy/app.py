"""The ASGI application: the routes of the proxy and the admin API, behind the drain guard.

Usage::

    app = build_app(proxy, admin_routes, lifespan)   # corral.root.create_app does this
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractAsyncContextManager

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route
from starlette.types import ASGIApp

from corral.proxy.drain import DrainGuard
from corral.proxy.errors import error_response
from corral.proxy.handlers import Proxy
from corral.proxy.routing import INFERENCE_PATHS


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    if exc.status_code == 405:
        message = f"method {request.method} is not allowed on {request.url.path}"
        return error_response(405, message, code="method_not_allowed",
                              headers=dict(exc.headers or {}))
    if exc.status_code == 404:
        return error_response(404, f"no such endpoint: {request.url.path}", code="not_found")
    return error_response(exc.status_code, str(exc.detail), code="http_error")


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

    routes: list[BaseRoute] = [Route(path, proxy.inference, methods=["POST"])
                               for path in INFERENCE_PATHS]
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
        *admin_routes,
    ]
    app = Starlette(routes=routes, lifespan=lifespan,
                    exception_handlers={HTTPException: _http_error})
    return DrainGuard(app, proxy.drain)
