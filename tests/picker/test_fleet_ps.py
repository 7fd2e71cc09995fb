"""``corral ps --fleet URL``: the picker's ``/admin/status`` as one table, run as users run it.

The picker's HTTP server is picker-envoy's (``corral picker``); here a small aiohttp app serves
``Picker.status()`` at ``/admin/status`` exactly as that server does, from a real ``Picker``
that has read its pods over HTTP.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys

from aiohttp import web

from corral.picker.discovery import StaticDiscovery
from corral.picker.picker import Picker
from corral.picker.view import StatusReader
from tests.conftest import free_port
from tests.picker.status_pods import StatusPod, model, serving, status


async def corral_ps(*args: str) -> tuple[int, str, str]:
    env = {k: v for k, v in os.environ.items() if k != "CORRAL_API_KEY"}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "corral", "ps", *args, env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_fleet_table_shows_every_pod(unused_tcp_port: int) -> None:
    port = free_port()
    a, b, gone = f"127.0.0.2:{port}", f"127.0.0.3:{port}", f"127.0.0.4:{port}"
    pods = {a: StatusPod(status(model("smol", free=1, queue=0), model(
                "big", "unloaded", fit={"now": False, "after_evicting_idle": True,
                                        "evict": ["smol"]}))),
            b: StatusPod(status(model("smol", free=0, queue=3, limit=8)))}
    picker = Picker(StaticDiscovery([a, b, gone]), StatusReader(None, timeout=1.0))
    app = web.Application()

    async def admin_status(request: web.Request) -> web.Response:
        return web.json_response(picker.status())

    app.router.add_get("/admin/status", admin_status)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    try:
        await web.TCPSite(runner, "127.0.0.1", unused_tcp_port).start()
        async with serving(pods):
            await picker.refresh_now()
            await picker.pick("smol", {})
            picker.note_sent(a, "smol")
            code, out, err = await corral_ps("--fleet", f"http://127.0.0.1:{unused_tcp_port}")
            assert code == 0, err
            lines = out.splitlines()
            assert lines[0].split() == ["POD", "MODEL", "STATE", "SLOTS", "FREE", "QUEUE",
                                        "FITS", "SENT"]
            assert lines[1].split() == [a, "smol", "ready", "1/2", "0/8", "-", "1"]
            assert lines[2].split() == ["big", "unloaded", "0/0", "0/8", "evict"]
            assert lines[3].split() == [b, "smol", "ready", "0/2", "3/8", "-", "0"]
            assert lines[4].split()[:3] == [gone, "-", "down:"]
            assert lines[6] == "2/3 pods up, 1/4 slots free, 3 queued"
            assert lines[7] == "decisions: loaded_free 1"
            code, out, _ = await corral_ps("--fleet", f"http://127.0.0.1:{unused_tcp_port}",
                                           "--json")
            assert code == 0 and json.loads(out)["totals"]["pods_up"] == 2
            # A corral's own status is not a fleet: said, not a traceback.
            code, _, err = await corral_ps("--url", f"http://127.0.0.1:{unused_tcp_port}")
            assert code == 1 and "use corral ps --fleet" in err and "Traceback" not in err
    finally:
        await runner.cleanup()
        await picker.aclose()
