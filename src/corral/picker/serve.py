"""``corral picker``: the ext_proc gRPC server and a small HTTP server, in one process.

uvicorn runs the HTTP side (``/healthz``, ``/metrics``, ``/admin/status``: the fleet view that
``corral ps --fleet`` reads) and owns the signals: SIGINT/SIGTERM make it stop accepting, and
its lifespan then stops the gRPC server (letting streams in flight finish for a grace period)
and the picker's refresh loop. The picker and the gRPC server start in the lifespan, so the
process either serves both or exits.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

import structlog
import uvicorn
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from corral.picker.config import PickerConfig
from corral.picker.extproc import ExtProcServer, start_grpc
from corral.picker.picker import Picker

log = structlog.get_logger("corral.picker")

GRACE_SECONDS = 5.0


def build_app(config: PickerConfig, picker: Picker | None = None) -> Starlette:
    """The HTTP app; its lifespan runs ``picker`` and the gRPC ext_proc server."""
    picker = picker or Picker.from_config(config)
    extproc = ExtProcServer(picker, fail_open=config.fail_open)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await picker.start()
        grpc_server, port = await start_grpc(extproc, config.listen.grpc.host,
                                             config.listen.grpc.port)
        log.info("picker_started", grpc=f"{config.listen.grpc.host}:{port}",
                 http=f"{config.listen.http.host}:{config.listen.http.port}",
                 fail_open=config.fail_open)
        app.state.grpc_port = port
        try:
            yield
        finally:
            await grpc_server.stop(GRACE_SECONDS)
            await picker.aclose()
            log.info("picker_stopped")

    async def healthz(request: Request) -> Response:
        up = sum(v.up for v in picker.views.values())
        return JSONResponse({"status": "ok", "pods": len(picker.views), "pods_up": up})

    async def metrics(request: Request) -> Response:
        return PlainTextResponse(generate_latest(picker.registry).decode(),
                                 media_type=CONTENT_TYPE_LATEST)

    async def status(request: Request) -> Response:
        return JSONResponse(picker.status())

    return Starlette(routes=[Route("/healthz", healthz), Route("/metrics", metrics),
                             Route("/admin/status", status)], lifespan=lifespan)


def serve(config: PickerConfig) -> None:
    """Run until SIGINT/SIGTERM (uvicorn's signal handling)."""
    app = build_app(config)
    uvicorn.run(app, host=config.listen.http.host, port=config.listen.http.port,
                log_level="warning", lifespan="on")
