"""A client's keep_alive (the Ollama API's) replaces a model's ttl until the model stops."""

from __future__ import annotations

import math
import time
from collections.abc import Coroutine
from types import SimpleNamespace
from typing import Any

from corral.config import parse_config
from corral.supervisor.model import ManagedModel
from corral.supervisor.state import ModelState


def ready_model(ttl: str) -> tuple[ManagedModel, list[str]]:
    """A model in ``ready`` with a host that records the stops it is asked to start."""
    config = parse_config({"models": {"m": {"path": "m.gguf", "ttl": ttl}}})
    stops: list[str] = []

    def spawn(coro: Coroutine[Any, Any, None]) -> None:
        stops.append(coro.cr_code.co_name)
        coro.close()  # the stop itself is not run: only that it was started

    host: Any = SimpleNamespace(config=config, spawn=spawn)
    model = ManagedModel(config.models["m"], host)
    model.state = ModelState.READY
    return model, stops


def test_keep_alive_replaces_the_ttl() -> None:
    model, _ = ready_model("10m")
    assert model.idle_limit == 600.0
    model.keep_for(30.0)
    assert model.idle_limit == 30.0
    model.keep_for(math.inf)
    assert model.idle_limit is None and model.expires_at() is None
    model.keep_for(None)
    expires = model.expires_at()
    assert expires is not None and abs(expires - (model.last_used + 600.0)) < 1e-6
    never, _ = ready_model("0")
    assert never.idle_limit is None
    never.keep_for(5.0)
    assert never.idle_limit == 5.0  # a client may bound what the config leaves unbounded


def test_keep_alive_zero_stops_once_idle_and_is_forgotten_with_the_stop() -> None:
    model, stops = ready_model("10m")
    model.keep_for(0.0)
    model.in_flight = 1
    model.stop_if_idle(time.monotonic())
    assert stops == []  # never under a request
    model.in_flight = 0
    model.stop_if_idle(time.monotonic())
    assert stops == ["_stop"] and model.state == ModelState.STOPPING
    assert model.keep_alive is None  # the next load starts with the configured ttl


def test_keep_alive_for_ever_outlasts_the_ttl() -> None:
    model, stops = ready_model("1s")
    model.keep_for(math.inf)
    model.stop_if_idle(time.monotonic() + 3600)
    assert stops == []
    model.keep_for(None)
    model.stop_if_idle(time.monotonic() + 3600)
    assert stops == ["_stop"]


def test_the_last_request_to_arrive_decides() -> None:
    # An answer that began before an unload and ends after it does not undo the unload.
    model, _ = ready_model("10m")
    model.keep_for(0.0, asked_at=20.0)
    model.keep_for(None, asked_at=10.0)
    assert model.idle_limit == 0.0
    model.keep_for(300.0, asked_at=30.0)
    assert model.idle_limit == 300.0
