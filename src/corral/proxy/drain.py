"""The drain: requests counted while they run, and refused with 503 once corral drains."""

from __future__ import annotations

from dataclasses import dataclass

from starlette.types import ASGIApp, Receive, Scope, Send

from corral.errors import ShuttingDownError
from corral.proxy.errors import response_for

# Read while draining, so load balancers and operators can watch the drain; nothing that
# changes state (a load, a reload) is accepted any more.
_ALWAYS_OPEN = ("/health", "/metrics", "/admin/")


@dataclass
class DrainState:
    """Whether corral drains (set by the server on SIGTERM), and the requests inside the app."""

    draining: bool = False
    active: int = 0  # requests inside the app, streams included


class DrainGuard:
    """Counts requests in flight and, once draining, refuses new ones with 503.

    A plain ASGI wrapper: the whole life of a request, streamed body included, happens inside
    ``await app(...)``, so the count is exact and costs two integer operations.
    """

    def __init__(self, app: ASGIApp, state: DrainState) -> None:
        self.app = app
        self.state = state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        state = self.state
        if state.draining and not (
            scope["method"] in ("GET", "HEAD") and scope["path"].startswith(_ALWAYS_OPEN)
        ):
            response = response_for(ShuttingDownError("corral is shutting down"))
            await response(scope, receive, send)
            return
        state.active += 1
        try:
            await self.app(scope, receive, send)
        finally:
            state.active -= 1
