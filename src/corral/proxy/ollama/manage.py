"""Ollama's model management (push, create, copy, delete, blobs): refused, clearly.

corral serves the models its config defines; it does not build, copy or delete them. This one
place answers those endpoints. (``/api/pull`` fetches a configured model: ``pull``.)
"""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

# (path, methods) of the endpoints that change Ollama's model store.
MANAGEMENT = (
    ("/api/push", ["POST"]),
    ("/api/create", ["POST"]),
    ("/api/copy", ["POST"]),
    ("/api/delete", ["DELETE"]),
    ("/api/blobs/{digest}", ["HEAD", "POST"]),
)


async def refuse_management(request: Request) -> Response:
    """501 in Ollama's error shape, saying where models come from instead."""
    action = request.url.path.removeprefix("/api/").split("/")[0]
    return JSONResponse(
        {"error": f"corral cannot {action} models: it serves the models defined in its config "
                  "file (models: with the path of each GGUF); add or remove one there and "
                  "reload corral (SIGHUP or POST /admin/reload); /api/pull fetches the "
                  "files of a model defined there"},
        status_code=501)
