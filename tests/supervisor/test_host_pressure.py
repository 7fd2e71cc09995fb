"""A host short of file descriptors or processes is no fault of the model: loads that fail for
it are answered 503 and retried, but never count towards giving up on the model.

The spawn itself is replaced (a real EMFILE would starve the test runner too); the rest of the
load runs as in production.
"""

from __future__ import annotations

import asyncio
import errno
from pathlib import Path
from typing import Any

import pytest

from corral.config import parse_config
from corral.errors import ModelLoadError
from corral.placement import PlacementPlan, plan_placement
from corral.placement.devices import host
from corral.placement.requests import placement_request
from corral.supervisor import ManagedModel, ModelState, Supervisor
from tests.placement.public_models import GiB, llama31_8b


def supervisor(tmp_path: Path) -> Supervisor:
    config = parse_config({
        "models": {"m": {"path": str(tmp_path / "m.gguf"), "binary": "/bin/true",
                         "slots": 1, "ctx_per_slot": 256}},
        "devices": [{"id": "cpu", "memory": "64GiB"}],
        "restart": {"max_failures": 2, "window": "10m"},
        "state_file": str(tmp_path / "children.json")})
    sup = Supervisor(config)

    async def place(model: ManagedModel) -> PlacementPlan:
        # The planner's own answer for a profile of its own: no model file is read.
        return plan_placement(llama31_8b(), placement_request(model.spec, config),
                              [host(64 * GiB)])

    sup.place = place  # type: ignore[method-assign]
    return sup


async def request(model: ManagedModel) -> ModelLoadError:
    """What a request gets once the model's back-off is over: a load, and its error."""
    while asyncio.get_running_loop().time() < model.retry_at:
        await asyncio.sleep(0.05)
    with pytest.raises(ModelLoadError) as caught:
        await model.acquire()
    return caught.value


@pytest.mark.parametrize("code", [errno.EMFILE, errno.ENFILE, errno.EAGAIN])
async def test_spawns_failing_for_lack_of_resources_never_give_a_model_up(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, code: int
) -> None:
    async def no_resources(*args: Any, **kwargs: Any) -> Any:
        raise OSError(code, "simulated")

    monkeypatch.setattr(asyncio, "create_subprocess_exec", no_resources)
    sup = supervisor(tmp_path)
    model = sup.get("m")
    for _ in range(4):  # twice restart.max_failures
        error = await request(model)
        assert "cannot start /bin/true" in str(error) and error.retry_after >= 1.0
    assert model.state == ModelState.FAILED and model.restarts.recent == 0
    assert model.loads == 4
    await sup.shutdown()


async def test_other_spawn_failures_still_count(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def broken(*args: Any, **kwargs: Any) -> Any:
        raise OSError(errno.ENOEXEC, "Exec format error")

    monkeypatch.setattr(asyncio, "create_subprocess_exec", broken)
    sup = supervisor(tmp_path)
    model = sup.get("m")
    for _ in range(2):
        await request(model)
    assert model.state == ModelState.GIVEN_UP and model.restarts.recent == 2
    await sup.shutdown()
