"""A model a reload removed, in-process: once retired, nothing starts it again.

No process is started: the model's file does not exist, so a load that should not happen
shows as a ``ModelLoadError`` (and a counted load) instead of the refusal.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from corral.config import Config, parse_config
from corral.errors import ModelLoadError, ModelUnavailableError
from corral.supervisor import ManagedModel, ModelState, Supervisor
from corral.supervisor import supervisor as supervisor_module
from corral.supervisor.events import SupervisorEvents
from tests.conftest import until


def config(tmp_path: Path, *names: str) -> Config:
    model: dict[str, Any] = {"path": str(tmp_path / "missing.gguf"), "slots": 1,
                             "ctx_per_slot": 256}
    return parse_config({"models": {n: model for n in names},
                         "devices": [{"id": "cpu", "memory": "8GiB"}],
                         "state_file": str(tmp_path / "children.json")})


class Held(SupervisorEvents):
    """The proxy's side, as the test sets it: requests held per model, retirements heard."""

    def __init__(self) -> None:
        self.held: dict[str, int] = {}
        self.retired: list[str] = []

    def waiting(self, model: str) -> int:
        return self.held.get(model, 0)

    def holding(self, model: str) -> int:
        return self.held.get(model, 0)

    def model_retired(self, model: str) -> None:
        self.retired.append(model)


async def test_a_request_that_waited_across_the_removal_starts_nothing(tmp_path: Path) -> None:
    supervisor = Supervisor(config(tmp_path, "gone", "kept"))
    gone = supervisor.get("gone")  # what a request admitted before the reload holds
    assert supervisor.reconfigure(config(tmp_path, "kept"))["removed"] == ["gone"]
    await until(lambda: "gone" not in supervisor.models)
    with pytest.raises(ModelUnavailableError, match="removed from the configuration"):
        await supervisor.acquire(gone)
    assert gone.state == ModelState.RETIRED
    assert gone.loads == 0
    await supervisor.shutdown()


def serving(supervisor: Supervisor, name: str) -> ManagedModel:
    """``name`` as if its child were up (no process: nothing here sends it requests)."""
    model = supervisor.get(name)
    model.state = ModelState.READY
    return model


async def test_a_removed_model_put_back_while_it_serves_stays_until_removed_again(
    tmp_path: Path,
) -> None:
    proxy = Held()
    supervisor = Supervisor(config(tmp_path, "m", "kept"), observers=[proxy], demand=proxy)
    model = serving(supervisor, "m")
    proxy.held["m"] = 1  # a request queued for it: a removed model serves it first
    assert supervisor.reconfigure(config(tmp_path, "kept"))["removed"] == ["m"]
    assert model.state == ModelState.RETIRING
    assert supervisor.reconfigure(config(tmp_path, "m", "kept"))["added"] == ["m"]
    assert model.state == ModelState.READY and supervisor.get("m") is model
    proxy.held["m"] = 0
    # A retire called off stops nothing once its requests are done: its task ends untouched.
    await until(lambda: not supervisor._tasks)
    assert model.state == ModelState.READY and proxy.retired == []
    supervisor.reconfigure(config(tmp_path, "kept"))
    await until(lambda: "m" not in supervisor.models)
    assert model.state == ModelState.RETIRED and model.loads == 0
    assert model.last_stop_reason == "removed"
    assert "m" in proxy.retired  # its waiters were refused
    await supervisor.shutdown()


async def test_removed_put_back_and_removed_again_while_it_stops_is_retired_at_its_end(
    tmp_path: Path,
) -> None:
    proxy = Held()
    supervisor = Supervisor(config(tmp_path, "m", "kept"), observers=[proxy], demand=proxy)
    model = serving(supervisor, "m")
    model.in_flight = 1  # its stop drains this request: the test says when it is done
    unloading = asyncio.ensure_future(supervisor.unload("m"))
    await until(lambda: model.state == ModelState.STOPPING)
    supervisor.reconfigure(config(tmp_path, "kept"))  # removed while it stops...
    supervisor.reconfigure(config(tmp_path, "m", "kept"))  # ...back...
    assert not model.removing
    supervisor.reconfigure(config(tmp_path, "kept"))  # ...and removed again
    assert model.removing and model.state == ModelState.STOPPING
    waiting = asyncio.ensure_future(model.acquire())  # a request that waits for the stop
    model.in_flight = 0
    await unloading
    assert model.state == ModelState.RETIRED and "m" not in supervisor.models
    with pytest.raises(ModelUnavailableError, match="removed from the configuration"):
        await waiting
    assert model.loads == 0 and proxy.retired == ["m"]
    await supervisor.shutdown()


def _with(tmp_path: Path, models: dict[str, dict[str, Any]]) -> Config:
    base: dict[str, Any] = {"path": str(tmp_path / "missing.gguf"), "ctx_per_slot": 256}
    return parse_config({"models": {n: {**base, **m} for n, m in models.items()},
                         "devices": [{"id": "cpu", "memory": "8GiB"}],
                         "state_file": str(tmp_path / "children.json")})


async def test_a_model_changed_then_removed_at_once_is_not_loaded_again(tmp_path: Path) -> None:
    supervisor = Supervisor(_with(tmp_path, {"m": {"slots": 1, "preload": True}, "kept": {}}))
    model = supervisor.get("m")
    # A reload changes it (its restart is now due), the next removes it before that ran.
    assert supervisor.reconfigure(_with(tmp_path, {"m": {"slots": 2, "preload": True},
                                                   "kept": {}}))["changed"] == ["m"]
    assert supervisor.reconfigure(_with(tmp_path, {"kept": {}}))["removed"] == ["m"]
    await until(lambda: "m" not in supervisor.models)
    assert model.loads == 0  # no child was started (or evicted for) for the removed model
    await supervisor.shutdown()


async def test_a_preload_for_a_model_removed_before_it_ran_is_dropped_quietly(
    tmp_path: Path,
) -> None:
    supervisor = Supervisor(_with(tmp_path, {"kept": {}}))
    with capture_logs() as logs:
        supervisor.reconfigure(_with(tmp_path, {"kept": {}, "new": {"preload": True}}))
        supervisor.reconfigure(_with(tmp_path, {"kept": {}}))
        # The preload and the retire the reloads started have ended (and been logged).
        await until(lambda: not supervisor._tasks)
    assert [e for e in logs if e.get("log_level") == "error"] == []
    assert "new" not in supervisor.models
    await supervisor.shutdown()


async def test_preloads_are_placed_one_after_another_in_config_order(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # With auto sizes the first to reserve takes what it can: the order must be the config's
    # (as `corral plan` decides), not whichever profile read happens to finish first.
    placed: list[str] = []
    reading = {"a": 0.15, "b": 0.05, "c": 0.0}  # a's file is the slowest to read

    async def place(spec: Any, *args: Any, **kwargs: Any) -> Any:
        await asyncio.sleep(reading[spec.name])
        placed.append(spec.name)
        raise ModelLoadError(spec.name, "placed (test)")

    monkeypatch.setattr(supervisor_module, "place", place)
    supervisor = Supervisor(_with(tmp_path, {n: {"preload": True} for n in ("a", "b", "c")}))
    await supervisor.start()
    await until(lambda: len(placed) == 3)
    assert placed == ["a", "b", "c"]
    await supervisor.shutdown()
