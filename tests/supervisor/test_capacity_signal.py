"""A load waiting for busy models to free memory is woken when one may have become evictable,
not by a poll: with three models and memory for two, every swap used to wait up to the poll
interval (P5 in docs/benchmarks.md).

The supervisor's signal is checked with a poll interval no test waits out (an hour): only the
signal can end those waits. Profiles of public model shapes stand in for the files.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from corral.config import parse_config
from corral.probe import host
from corral.probe.host import make_ledger
from corral.supervisor import Supervisor
from corral.supervisor.placing import _CAPACITY_POLL, Candidate, place
from tests.placement.public_models import llama31_8b

HOUR = 3600.0


def config(tmp_path: Path) -> Any:
    model = {"slots": 1, "ctx_per_slot": 4096}
    return parse_config({
        "models": {n: {"path": f"/models/{n}.gguf", **model} for n in ("a", "b")},
        # Room for one of the two.
        "devices": [{"id": "cpu", "memory": "8GiB"}],
        "reserve": {"gpu": 0, "ram": 0},
        "state_file": str(tmp_path / "children.json")})


@pytest.fixture(autouse=True)
def profiles(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(host, "read_profile", lambda path: llama31_8b())


async def test_a_load_behind_a_busy_model_waits_in_changed_then_evicts_it(
    tmp_path: Path,
) -> None:
    cfg = config(tmp_path)
    ledger = make_ledger(cfg)
    busy = {"a"}
    evicted: list[str] = []
    waits: list[float] = []

    def candidates() -> list[Candidate]:
        return [Candidate(n, 1.0, busy=n in busy, pinned=False) for n in ledger.owners]

    async def evict(name: str) -> None:
        evicted.append(name)
        ledger.release(name)

    async def changed(timeout: float) -> None:
        waits.append(timeout)
        busy.clear()  # a's last request ended: the supervisor's signal

    await place(cfg.models["a"], cfg, ledger, candidates, evict, wait=0)
    plan = await place(cfg.models["b"], cfg, ledger, candidates, evict, wait=HOUR,
                       changed=changed)
    assert waits == [_CAPACITY_POLL]  # one wait, then the eviction: no second poll
    assert evicted == ["a"]
    assert ledger.owners == ["b"] and plan.reservation


async def turns() -> None:
    """Let every ready task run up to its next wait (no clock involved)."""
    for _ in range(5):
        await asyncio.sleep(0)


async def test_the_supervisor_wakes_every_waiting_load_on_a_change(tmp_path: Path) -> None:
    supervisor = Supervisor(config(tmp_path))
    waiting = [asyncio.create_task(supervisor._capacity_change(HOUR)) for _ in range(2)]
    await turns()
    assert supervisor._capacity_waiters == 2 and not any(task.done() for task in waiting)
    supervisor.capacity_changed()
    await asyncio.wait_for(asyncio.gather(*waiting), timeout=30)
    # A change with nobody waiting is not remembered for a later wait.
    supervisor.capacity_changed()
    later = asyncio.create_task(supervisor._capacity_change(HOUR))
    await turns()
    assert supervisor._capacity_waiters == 1 and not later.done()
    supervisor.release_memory("a")  # a stopped model's memory is back
    await asyncio.wait_for(later, timeout=30)
