"""The admin API: see every model and the host's capacity, load and unload by hand."""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from typing import Any

import psutil
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from corral.errors import CorralError
from corral.proxy.admission import AdmissionQueue
from corral.proxy.errors import response_for
from corral.supervisor import ManagedModel, ModelState, Supervisor


def model_status(model: ManagedModel, queue: AdmissionQueue) -> dict[str, Any]:
    """A model as ``/admin/status`` and ``corral ps`` show it."""
    info = model.describe()
    info.update({
        "slots_busy": queue.in_flight - queue.loading,
        "queue_depth": queue.depth,
        "queue_limit": queue.limit(),
        "memory": {"actual": _actual_memory(info["pid"])},
    })
    return info


def _actual_memory(pid: int | None) -> dict[str, int]:
    if pid is None:
        return {}
    with contextlib.suppress(psutil.Error):
        return {"cpu": psutil.Process(pid).memory_info().rss}
    return {}


def status(supervisor: Supervisor, queues: Mapping[str, AdmissionQueue]) -> dict[str, Any]:
    models = [model_status(m, queues[name]) for name, m in supervisor.models.items()]
    loaded = [m for m in models if m["state"] == str(ModelState.READY)]
    return {
        "models": models,
        "totals": {
            "models": len(models),
            "models_ready": len(loaded),
            "slots": sum(m["slots"] for m in loaded),
            "slots_busy": sum(m["slots_busy"] for m in models),
            "queue_depth": sum(m["queue_depth"] for m in models),
            "in_flight": sum(m["in_flight"] for m in models),
        },
    }


def routes(supervisor: Supervisor, queues: Mapping[str, AdmissionQueue]) -> list[Route]:
    """``GET /admin/status``, ``GET /admin/models``, ``POST /admin/models/{name}/load|unload``."""

    async def get_status(request: Request) -> Response:
        return JSONResponse(status(supervisor, queues))

    async def list_models(request: Request) -> Response:
        return JSONResponse({"models": [m.describe() for m in supervisor.models.values()]})

    async def load(request: Request) -> Response:
        try:
            model = await supervisor.load(request.path_params["name"])
        except CorralError as exc:
            return response_for(exc)
        return JSONResponse(model.describe())

    async def unload(request: Request) -> Response:
        try:
            model = await supervisor.unload(request.path_params["name"], "manual")
        except CorralError as exc:
            return response_for(exc)
        return JSONResponse(model.describe())

    return [
        Route("/admin/status", get_status, methods=["GET"]),
        Route("/admin/models", list_models, methods=["GET"]),
        Route("/admin/models/{name:path}/load", load, methods=["POST"]),
        Route("/admin/models/{name:path}/unload", unload, methods=["POST"]),
    ]
