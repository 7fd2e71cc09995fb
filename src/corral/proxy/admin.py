"""The admin API: see every model, load and unload by hand."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from corral.errors import CorralError
from corral.proxy.errors import response_for
from corral.supervisor import Supervisor


def routes(supervisor: Supervisor) -> list[Route]:
    """``GET /admin/models``, ``POST /admin/models/{name}/load`` and ``.../unload``."""

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
        Route("/admin/models", list_models, methods=["GET"]),
        Route("/admin/models/{name:path}/load", load, methods=["POST"]),
        Route("/admin/models/{name:path}/unload", unload, methods=["POST"]),
    ]
