"""The Starlette application: routing by model, on-demand loads, streaming, admin API.

Usage::

    app = create_app(config)                # owns a Supervisor, started in the lifespan
    uvicorn.run(app, host=..., port=...)
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import AsyncIterator
from functools import partial
from typing import Any

import structlog
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import Receive

from corral.config import Config
from corral.errors import CorralError, ModelUnavailableError, QueueFullError, QueueTimeoutError
from corral.metrics import CorralMetrics
from corral.proxy import admin
from corral.proxy.admission import AdmissionQueue
from corral.proxy.errors import BadRequestError, error_response, response_for
from corral.proxy.forward import UpstreamResponse, send_upstream
from corral.proxy.routing import INFERENCE_PATHS, SLOTLESS_PATHS, model_name, parse_body
from corral.supervisor import ManagedModel, ModelState, Supervisor

log = structlog.get_logger("corral.proxy")


class Proxy:
    """The request handlers; one per app, holding the supervisor it asks for leases."""

    def __init__(self, config: Config, supervisor: Supervisor, metrics: CorralMetrics) -> None:
        self.config = config
        self.supervisor = supervisor
        self.metrics = metrics
        self.instruments = metrics.instruments
        self.default_model = config.file.default_model
        self.queues = {
            name: AdmissionQueue(
                name,
                slots=lambda m=model: m.plan.slots,  # type: ignore[misc]
                limit=model.spec.queue_limit,
                timeout=model.spec.queue_timeout,
            )
            for name, model in supervisor.models.items()
        }

    async def inference(self, request: Request) -> Response:
        """POST on a model endpoint: route by ``model``, admit, load on demand, stream back."""
        started = time.perf_counter()
        request_id = _request_id(request)
        name = ""
        try:
            body = await request.body()
            model = self.supervisor.get(model_name(parse_body(body), self.default_model))
            name = model.name
            uses_slot = request.url.path not in SLOTLESS_PATHS
            return await self._forward(request, model, body, request_id, started, uses_slot)
        except CorralError as exc:
            return self._error(request, name, exc, request_id, started)

    async def model_get(self, request: Request) -> Response:
        """GET /props, /slots: llama-server's model-less endpoints, for ``?model=`` or default.

        ``/slots`` never loads a model (monitoring must not keep a model from going idle);
        ``/props`` does, as a single-server client asks it before its first request.
        """
        started = time.perf_counter()
        request_id = _request_id(request)
        name = ""
        try:
            asked = request.query_params.get("model") or self.default_model
            if not asked:
                raise BadRequestError(
                    f"{request.url.path} needs ?model= when corral has no default_model",
                    code="model_required",
                )
            model = self.supervisor.get(asked)
            name = model.name
            if request.url.path == "/slots" and model.state != ModelState.READY:
                raise ModelUnavailableError(
                    model.name, f"it is {model.state}; /slots does not load models", 5.0)
            return await self._forward(request, model, b"", request_id, started, False)
        except CorralError as exc:
            return self._error(request, name, exc, request_id, started)

    async def _forward(
        self,
        request: Request,
        model: ManagedModel,
        body: bytes,
        request_id: str,
        started: float,
        uses_slot: bool,
    ) -> Response:
        queue = self.queues[model.name]
        if uses_slot:
            waited = await queue.admit(partial(_disconnected, request.receive))
            self.instruments.queue_wait.labels(model.name).observe(waited)
            queue.loading += 1
        try:
            lease = await self.supervisor.acquire(model.name)
        except BaseException:
            if uses_slot:
                queue.release()
            raise
        finally:
            if uses_slot:
                queue.loading -= 1
        try:
            upstream = await send_upstream(
                lease.client, model.name, request.method, request.url.path,
                request.scope["query_string"], request.headers.raw, body,
            )
        except BaseException:
            lease.release()
            if uses_slot:
                queue.release()
            raise

        def finish() -> None:
            # Runs when the stream is done, so the line has the real duration and outcome.
            lease.release()
            if uses_slot:
                queue.release()
            seconds = time.perf_counter() - started
            ttft = (response.first_chunk_at - started
                    if response.is_sse and response.first_chunk_at else None)
            self.instruments.request_done(model.name, request.url.path, upstream.status_code,
                                          seconds, ttft)
            log.info("request", request_id=request_id, model=model.name,
                     method=request.method, path=request.url.path,
                     status=upstream.status_code, client_gone=response.client_gone,
                     upstream_error=response.upstream_error, seconds=round(seconds, 4))

        response = UpstreamResponse(upstream, finish, [(b"x-request-id", request_id.encode())])
        return response  # type: ignore[return-value]

    def _error(
        self, request: Request, model: str, exc: CorralError, request_id: str, started: float
    ) -> Response:
        response = response_for(exc, {"X-Request-Id": request_id})
        seconds = time.perf_counter() - started
        if isinstance(exc, QueueFullError | QueueTimeoutError):
            reason = "full" if isinstance(exc, QueueFullError) else "timeout"
            self.instruments.rejected.labels(model, reason).inc()
        if model:  # only configured names become label values, never what a client typed
            self.instruments.request_done(model, request.url.path, response.status_code,
                                          seconds, None)
        log.info("request", request_id=request_id, model=model or None, method=request.method,
                 path=request.url.path, status=response.status_code, error=str(exc),
                 seconds=round(seconds, 4))
        return response

    async def metrics_text(self, request: Request) -> Response:
        """GET /metrics: corral's metrics and each child's, for Prometheus."""
        return Response(await self.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    async def list_models(self, request: Request) -> Response:
        """GET /v1/models: every model and alias in OpenAI form, with corral's details."""
        data = [_model_entry(m.describe(), m.name) for m in self.supervisor.models.values()]
        for m in self.supervisor.models.values():
            data += [_model_entry(m.describe(), alias, alias_of=m.name)
                     for alias in m.spec.aliases]
        return JSONResponse({"object": "list", "data": data})

    async def get_model(self, request: Request) -> Response:
        name = request.path_params["name"]
        try:
            model = self.supervisor.get(name)
        except CorralError as exc:
            return response_for(exc)
        alias_of = None if name == model.name else model.name
        return JSONResponse(_model_entry(model.describe(), name, alias_of=alias_of))

    async def health(self, request: Request) -> Response:
        return JSONResponse({"status": "ok"})


def _model_entry(info: dict[str, Any], name: str, alias_of: str | None = None) -> dict[str, Any]:
    return {
        "id": name,
        "object": "model",
        "created": 0,
        "owned_by": "corral",
        "corral": {
            "state": info["state"],
            "slots": info["slots"],
            "ctx_per_slot": info["ctx_per_slot"],
            "alias_of": alias_of,
        },
    }


async def _disconnected(receive: Receive) -> None:
    """Return once the client has gone (the body is already read, so nothing else arrives)."""
    while (await receive())["type"] != "http.disconnect":
        pass


def _request_id(request: Request) -> str:
    return request.headers.get("x-request-id") or os.urandom(8).hex()


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    if exc.status_code == 405:
        message = f"method {request.method} is not allowed on {request.url.path}"
        return error_response(405, message, code="method_not_allowed",
                              headers=dict(exc.headers or {}))
    if exc.status_code == 404:
        return error_response(404, f"no such endpoint: {request.url.path}", code="not_found")
    return error_response(exc.status_code, str(exc.detail), code="http_error")


def create_app(config: Config, supervisor: Supervisor | None = None) -> Starlette:
    """The corral ASGI app; its lifespan starts and stops the supervisor."""
    metrics = CorralMetrics()
    supervisor = supervisor or Supervisor(config, events=metrics)
    proxy = Proxy(config, supervisor, metrics)
    metrics.bind(supervisor, proxy.queues)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await supervisor.start()
        try:
            yield
        finally:
            await supervisor.shutdown()

    routes = [Route(path, proxy.inference, methods=["POST"]) for path in INFERENCE_PATHS]
    routes += [
        Route("/props", proxy.model_get, methods=["GET"]),
        Route("/slots", proxy.model_get, methods=["GET"]),
        Route("/v1/models", proxy.list_models, methods=["GET"]),
        Route("/models", proxy.list_models, methods=["GET"]),
        Route("/v1/models/{name:path}", proxy.get_model, methods=["GET"]),
        Route("/health", proxy.health, methods=["GET"]),
        Route("/metrics", proxy.metrics_text, methods=["GET"]),
        *admin.routes(supervisor, proxy.queues),
    ]
    app = Starlette(routes=routes, lifespan=lifespan,
                    exception_handlers={HTTPException: _http_error})
    app.state.supervisor = supervisor
    return app
