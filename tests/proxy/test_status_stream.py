"""``/admin/status/stream``: the status document as server-sent events, what a live view of
slots, queues and memory draws from; it ends when corral drains."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from corral.errors import BadRequestError
from corral.proxy.admin import stream_interval
from tests.conftest import ENDLESS, CorralProcess, holding_a_slot, wait_until


@pytest.mark.parametrize("given", ["abc", "0", "0.05", "61", "nan", "inf", "-1", ""])
def test_an_interval_out_of_bounds_is_refused_by_name(given: str) -> None:
    with pytest.raises(BadRequestError, match=r"^interval: .* from 0\.1 to 60$") as caught:
        stream_interval(given)
    assert caught.value.code == "invalid_interval"


def test_an_interval_in_bounds_is_taken() -> None:
    assert (stream_interval(None), stream_interval("0.1"), stream_interval("60"),
            stream_interval("2.5")) == (1.0, 0.1, 60.0, 2.5)


def model(snapshot: dict[str, Any], name: str) -> dict[str, Any]:
    found: dict[str, Any] = next(m for m in snapshot["models"] if m["name"] == name)
    return found


@pytest.mark.integration
def test_the_stream_follows_loads_and_slots_and_ends_with_the_drain(
    corral: Callable[..., CorralProcess], smollm2: Path
) -> None:
    # A drain waits up to shutdown_timeout for open requests: longer than stop() waits.
    server = corral({"shutdown_timeout": "10m",
                     "models": {"m": {"path": str(smollm2), "slots": 2, "ctx_per_slot": 256,
                                      "args": ENDLESS}}})
    bad = server.http.get("/admin/status/stream", params={"interval": "0"})
    assert bad.status_code == 400 and bad.json()["error"]["code"] == "invalid_interval"

    snapshots: list[dict[str, Any]] = []
    ended = threading.Event()

    def watch() -> None:
        with httpx.Client(base_url=server.url, timeout=60) as http, http.stream(
                "GET", "/admin/status/stream", params={"interval": "0.2"}) as response:
            assert response.status_code == 200
            assert response.headers["content-type"].startswith("text/event-stream")
            for line in response.iter_lines():
                if line.startswith("data: "):
                    snapshots.append(json.loads(line[len("data: "):]))
        ended.set()

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        wait_until(lambda: len(snapshots) >= 1)
        assert model(snapshots[0], "m")["state"] == "unloaded"
        assert snapshots[0]["draining"] is False and "devices" in snapshots[0]
        assert server.http.post("/admin/models/m/load").status_code == 200
        wait_until(lambda: model(snapshots[-1], "m")["state"] == "ready")
        with holding_a_slot(server, "m"):
            wait_until(lambda: model(snapshots[-1], "m")["slots_busy"] == 1)
            assert model(snapshots[-1], "m")["slots_free"] == 1
        wait_until(lambda: model(snapshots[-1], "m")["slots_busy"] == 0)
        # A drain ends the stream (after a last snapshot that says so): an open view does not
        # hold corral's exit back until its shutdown timeout.
        assert server.stop(timeout=60) == 0  # not killed after 60 s: the stream did not hold it
        assert ended.wait(60)
        assert snapshots[-1]["draining"] is True
    finally:
        server.stop()
        watcher.join(60)
