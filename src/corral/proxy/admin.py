"""The admin API: see every model and the host's capacity, load, unload, reload the config."""

from __future__ import annotations

import asyncio
import json
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Protocol

import structlog
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from corral import __version__
from corral.config import Config
from corral.errors import BadRequestError, ConfigError
from corral.placement.fitness import FitAnswer
from corral.proxy.admission import AdmissionQueue, AdmissionQueues
from corral.proxy.drain import DrainState
from corral.proxy.errors import error_response, response_for
from corral.proxy.handlers import Proxy
from corral.supervisor import ManagedModel, Supervisor
from corral.supervisor.fitness import model_fit, read_headers

log = structlog.get_logger("corral.proxy")


def model_status(model: ManagedModel, queue: AdmissionQueue | None,
                 fit: FitAnswer | None = None) -> dict[str, Any]:
    """A model as ``/admin/status`` and ``corral ps`` show it; ``fit``: what a load of it would
    do now (None while it loads or serves)."""
    info = model.describe()
    busy = queue.in_flight - queue.loading if queue else 0
    info.update({
        "slots_busy": busy,
        "slots_free": max(0, model.slots - busy) if model.state.serving else 0,
        "queue_depth": queue.depth if queue else 0,
        "queue_limit": queue.limit() if queue else 0,
        "fit": fit.as_dict() if fit is not None else None,
    })
    return info


class AdminHost(Protocol):
    """What the admin API reads and acts on: the running corral (``corral.root.Corral``)."""

    config: Config
    supervisor: Supervisor
    queues: AdmissionQueues
    proxy: Proxy
    drain: DrainState

    async def reload(self) -> dict[str, Any]: ...


def node(config: Config) -> dict[str, Any]:
    """Which corral answers: its version and the addresses it listens on."""
    listen = config.file.listen
    return {"version": __version__,
            "listen": [f"[{h}]:{listen.port}" if ":" in h else f"{h}:{listen.port}"
                       for h in listen.hosts]}


def status(corral: AdminHost) -> dict[str, Any]:
    queues = corral.queues
    supervisor = corral.supervisor
    everyone = list(supervisor.models.values())
    models = [model_status(m, queues.get(name),
                           model_fit(m, everyone, supervisor.config, supervisor.ledger))
              for name, m in supervisor.models.items()]
    loaded = [m for m, model in zip(models, corral.supervisor.models.values(), strict=True)
              if model.state.serving]
    return {
        "models": models,
        "totals": {
            "models": len(models),
            "models_ready": len(loaded),
            "slots": sum(m["slots"] for m in loaded),
            "slots_busy": sum(m["slots_busy"] for m in models),
            "slots_free": sum(m["slots_free"] for m in models),
            "queue_depth": sum(m["queue_depth"] for m in models),
            "in_flight": sum(m["in_flight"] for m in models),
        },
        "devices": [u.as_dict() for u in corral.supervisor.ledger.snapshot()],
        "draining": corral.drain.draining,
        "node": node(corral.config),
    }


Handler = Callable[[Request], Awaitable[Response]]

# /admin/status/stream: seconds between two snapshots (?interval=), and the bounds on it.
STREAM_INTERVAL = 1.0
STREAM_INTERVAL_BOUNDS = (0.1, 60.0)


def stream_interval(given: str | None) -> float:
    """The ``interval`` a status stream asked for, in seconds; ``BadRequestError`` otherwise."""
    if given is None:
        return STREAM_INTERVAL
    low, high = STREAM_INTERVAL_BOUNDS
    try:
        seconds = float(given)
    except ValueError:
        seconds = math.nan
    if not low <= seconds <= high:  # NaN fails both
        raise BadRequestError(f"interval: {given[:40]!r} is not a number of seconds from "
                              f"{low:g} to {high:g}", code="invalid_interval")
    return seconds


async def status_snapshots(corral: AdminHost, interval: float) -> AsyncIterator[bytes]:
    """``/admin/status`` as server-sent events, one ``status`` event every ``interval``
    seconds: what a live view of slots, queues and memory draws from.

    It ends once corral drains, after a last snapshot that says so (``draining: true``), so an
    open view never holds a shutdown back.
    """
    while True:
        await read_headers(list(corral.supervisor.models.values()))
        snapshot = json.dumps(status(corral), separators=(",", ":"))
        yield f"event: status\ndata: {snapshot}\n\n".encode()
        if corral.drain.draining:
            return
        deadline = time.monotonic() + interval
        while not corral.drain.draining and time.monotonic() < deadline:
            await asyncio.sleep(min(0.1, max(0.0, deadline - time.monotonic())))


def routes(corral: AdminHost) -> list[Route]:
    """``/admin/status`` (and ``/admin/status/stream``), ``/admin/models``,
    ``/admin/models/{name}/load|unload|logs``, ``/admin/reload``; with keys configured, the
    reads need the ``status`` scope (which ``admin`` includes), the rest ``admin`` (a child's
    log may hold what clients sent)."""
    supervisor = corral.supervisor

    def admin_only(handler: Handler) -> Handler:
        return corral.proxy.guarded(handler, "admin")

    def status_scope(handler: Handler) -> Handler:
        return corral.proxy.guarded(handler, "status")

    async def get_status(request: Request) -> Response:
        await read_headers(list(supervisor.models.values()))
        return JSONResponse(status(corral))

    async def stream_status(request: Request) -> Response:
        interval = stream_interval(request.query_params.get("interval"))
        return StreamingResponse(status_snapshots(corral, interval),
                                 media_type="text/event-stream",
                                 headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"})

    async def list_models(request: Request) -> Response:
        return JSONResponse({"models": [m.describe() for m in supervisor.models.values()]})

    async def load(request: Request) -> Response:
        model = await supervisor.load(request.path_params["name"])
        return JSONResponse(model.describe())

    async def unload(request: Request) -> Response:
        model = await supervisor.unload(request.path_params["name"], "manual")
        return JSONResponse(model.describe())

    async def logs(request: Request) -> Response:
        # The last lines the model's children printed (200 at most), across restarts: what an
        # operator reads first when a model fails.
        model = supervisor.get(request.path_params["name"])
        return JSONResponse({"model": model.name, "lines": list(model.log_tail)})

    async def reload(request: Request) -> Response:
        try:
            changes = await corral.reload()
        except ConfigError as exc:  # invalid_config, or reload_refused: 400 either way
            return response_for(exc)
        except Exception as exc:
            # A bug, not a bad file: say so in the log with the traceback, and to the caller
            # in corral's error shape rather than Starlette's bare "Internal Server Error".
            log.exception("config_reload_failed", source=corral.config.source)
            return error_response(
                500, f"reload of {corral.config.source} failed ({type(exc).__name__}: {exc}); "
                "it may be partly applied, see corral's log",
                type_="server_error", code="reload_failed")
        return JSONResponse({"reloaded": True, **changes})

    return [
        Route("/admin/status", status_scope(get_status), methods=["GET"]),
        Route("/admin/status/stream", status_scope(stream_status), methods=["GET"]),
        Route("/admin/models", status_scope(list_models), methods=["GET"]),
        Route("/admin/models/{name:path}/load", admin_only(load), methods=["POST"]),
        Route("/admin/models/{name:path}/unload", admin_only(unload), methods=["POST"]),
        Route("/admin/models/{name:path}/logs", admin_only(logs), methods=["GET"]),
        Route("/admin/reload", admin_only(reload), methods=["POST"]),
    ]
