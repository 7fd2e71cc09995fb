"""Pods that answer ``/admin/status`` with recorded JSON shaped per issue 14's contract.

A stand-in for corral only where the test is about the picker's side (discovery, refresh,
decisions) and needs several pods on one port at different loopback addresses, or a status a
real corral reaches only under load (full queues, "fit" false): corral itself is read for real
in test_view.py.
"""

from __future__ import annotations

import copy
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from aiohttp import web


def model(name: str, state: str = "ready", *, slots: int = 2, free: int | None = None,
          queue: int = 0, limit: int = 8, aliases: tuple[str, ...] = (),
          fit: dict[str, Any] | None = None) -> dict[str, Any]:
    """One entry of ``models`` as corral answers it (the fields the picker reads, and more)."""
    serving = state in ("ready", "retiring")
    free = (slots if free is None else free) if serving else 0
    return {
        "name": name, "aliases": list(aliases), "state": state, "pid": 4242 if serving else None,
        "slots": slots, "ctx_per_slot": 512, "in_flight": slots - free,
        "slots_busy": slots - free if serving else 0, "slots_free": free,
        "queue_depth": queue, "queue_limit": limit,
        "fit": None if serving or state == "starting" else (
            fit or {"now": True, "after_evicting_idle": True, "evict": []}),
    }


def status(*models: dict[str, Any], listen: str = "127.0.0.1:8080") -> dict[str, Any]:
    """A whole ``/admin/status`` with the contract's ``node`` and ``totals.slots_free``."""
    serving = [m for m in models if m["state"] in ("ready", "retiring")]
    return {
        "models": list(models),
        "totals": {"models": len(models), "models_ready": len(serving),
                   "slots": sum(m["slots"] for m in serving),
                   "slots_busy": sum(m["slots_busy"] for m in models),
                   "slots_free": sum(m["slots_free"] for m in models),
                   "queue_depth": sum(m["queue_depth"] for m in models),
                   "in_flight": sum(m["in_flight"] for m in models)},
        "devices": [], "draining": False,
        "node": {"version": "0.0.0", "listen": [listen]},
    }


class StatusPod:
    """One pod: its status may be changed by the test; ``requests`` counts reads."""

    def __init__(self, body: dict[str, Any], key: str | None = None) -> None:
        self.body = body
        self.key = key
        self.requests = 0

    async def handle(self, request: web.Request) -> web.Response:
        self.requests += 1
        if self.key and request.headers.get("Authorization") != f"Bearer {self.key}":
            return web.json_response({"error": {"message": "invalid API key"}}, status=401)
        return web.json_response(copy.deepcopy(self.body))


@asynccontextmanager
async def serving(pods: dict[str, StatusPod]) -> AsyncIterator[None]:
    """Serve each pod at its "ip:port" (loopback addresses) until the block ends."""
    runners = []
    try:
        for endpoint, pod in pods.items():
            host, port = endpoint.rsplit(":", 1)
            app = web.Application()
            app.router.add_get("/admin/status", pod.handle)
            runner = web.AppRunner(app, access_log=None)
            await runner.setup()
            runners.append(runner)
            await web.TCPSite(runner, host, int(port)).start()
        yield
    finally:
        for runner in runners:
            await runner.cleanup()
