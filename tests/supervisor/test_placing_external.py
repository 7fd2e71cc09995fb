"""``place`` reads discovered devices again before each decision, so other programs' memory counts.

The device reading is faked: ``read_usage`` (free memory from NVML and psutil, and what NVML
and the kernel say each child uses) is replaced in ``corral.supervisor.placing`` by a
``Machine`` whose free memory each test sets. That is the I/O at the edge; the profile
(SmolLM2's, from its header), the plan, the ledger and the eviction loop are the real code.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import pytest

from corral.config import Config, parse_config
from corral.errors import ModelLoadError
from corral.placement.decide import plan_placement
from corral.placement.devices import Device, format_bytes, gpu, host
from corral.placement.ledger import Ledger
from corral.placement.requests import placement_request
from corral.planreport import build_report, render
from corral.probe import host as host_io
from corral.probe.gguf import read_profile
from corral.probe.host import make_ledger
from corral.supervisor import placing
from corral.supervisor.placing import Candidate, place
from tests.conftest import until

GiB = 1 << 30
MiB = 1 << 20


class Machine:
    """What the probes would read now: each device's total and free bytes, each child's use."""

    def __init__(self, devices: Iterable[Device]) -> None:
        self.devices = {d.id: d for d in devices}
        self.measured: dict[str, dict[str, int]] = {}
        self.reads = 0
        self.broken = False
        self.during_read: Callable[[], None] = lambda: None  # what corral does meanwhile

    def set_free(self, device_id: str, free: int) -> None:
        d = self.devices[device_id]
        self.devices[device_id] = Device(d.id, d.kind, d.total, free, d.name, d.uuid)

    def discover(self) -> list[Device]:
        self.reads += 1
        if self.broken:
            raise OSError("NVML went away")
        self.during_read()
        self.during_read = lambda: None
        return list(self.devices.values())

    def children(self, parent_pid: int | None = None) -> dict[str, dict[str, int]]:
        return {name: dict(used) for name, used in self.measured.items()}


@pytest.fixture
def machine(monkeypatch: pytest.MonkeyPatch) -> Machine:
    fake = Machine([host(8 * GiB, free=8 * GiB)])
    monkeypatch.setattr(host_io, "discover_devices", fake.discover)
    # The Machine's GPUs are as fake as NVML's here: take it that the binary can use them.
    monkeypatch.setattr(host_io, "binary_gpus", lambda binary: None)
    monkeypatch.setattr(host_io, "read_usage", lambda: (fake.discover(), fake.children()))
    return fake


def config(path: Path, *names: str, **extra: Any) -> Config:
    model = {"path": str(path), "slots": 1, "ctx_per_slot": 512}
    return parse_config({"models": {n: model for n in names}, "reserve": {"gpu": 0, "ram": 0},
                         **extra})


def need(cfg: Config, name: str, devices: list[Device]) -> dict[str, int]:
    """What ``name`` reserves on idle ``devices``."""
    spec = cfg.models[name]
    return plan_placement(read_profile(spec.path), placement_request(spec, cfg), devices,
                          Ledger(devices)).reservation


def nobody() -> list[Candidate]:
    return []


async def no_eviction(name: str) -> None:
    raise AssertionError(f"nothing should be evicted, got {name}")


async def test_other_programs_memory_refuses_a_load_and_the_503_says_how_much(
    smollm2_header: Path, machine: Machine
) -> None:
    cfg = config(smollm2_header, "a")
    n = need(cfg, "a", [host(8 * GiB)])["cpu"]
    ledger = make_ledger(cfg)
    assert ledger.fits({"cpu": n})  # by total minus reserve alone it would fit
    other = 8 * GiB - n // 2
    machine.set_free("cpu", 8 * GiB - other)  # another program took all but half of it
    with pytest.raises(ModelLoadError) as caught:
        await place(cfg.models["a"], cfg, ledger, nobody, no_eviction, wait=0.0)
    assert f"other programs use {format_bytes(other)}" in caught.value.reason
    assert ledger.external("cpu") == other and ledger.owners == []


async def test_corrals_own_children_are_not_other_programs(
    smollm2_header: Path, machine: Machine
) -> None:
    cfg = config(smollm2_header, "a", "b")
    a, b = need(cfg, "a", [host(8 * GiB)])["cpu"], need(cfg, "b", [host(8 * GiB)])["cpu"]
    other = 8 * GiB - a - b - 16 * MiB  # room for b only if a's memory is not counted twice
    ledger = make_ledger(cfg)
    ledger.reserve("a", {"cpu": a})  # a's child runs and has allocated what it reserved
    machine.set_free("cpu", 8 * GiB - other - a)
    plan = await place(cfg.models["b"], cfg, ledger, nobody, no_eviction, wait=0.0)
    assert plan.reservation == {"cpu": b} and ledger.external("cpu") == other


async def test_a_loading_gpu_child_counts_with_what_nvml_measures(
    smollm2_header: Path, machine: Machine
) -> None:
    machine.devices = {d.id: d for d in [gpu(0, 8 * GiB, free=8 * GiB), host(8 * GiB, 8 * GiB)]}
    cfg = config(smollm2_header, "a", "b")
    ledger = make_ledger(cfg)
    ledger.reserve("a", {"cuda:0": 4 * GiB})
    # a has allocated 1 of its 4 GiB so far; other programs hold 2 GiB.
    machine.measured = {"a": {"cuda:0": 1 * GiB}}
    machine.set_free("cuda:0", 8 * GiB - 1 * GiB - 2 * GiB)
    await place(cfg.models["b"], cfg, ledger, nobody, no_eviction, wait=0.0)
    # With a's reservation instead of its measurement, the 3 GiB a has not allocated yet would
    # hide the other programs' 2 GiB: 8 - 5 - 4 < 0.
    assert ledger.external("cuda:0") == 2 * GiB
    assert ledger.external("cpu") == 0


async def test_a_cpu_child_counts_with_what_it_uses_not_its_mapped_weights(
    smollm2_header: Path, machine: Machine
) -> None:
    cfg = config(smollm2_header, "a", "b")
    ledger = make_ledger(cfg)
    # a reserved 3 GiB, mostly weights mapped from the file: page cache the kernel reports as
    # available. Only its 512 MiB of KV cache and buffers are in use to the kernel.
    ledger.reserve("a", {"cpu": 3 * GiB})
    machine.measured = {"a": {"cpu": 512 * MiB}}
    other = 2 * GiB
    machine.set_free("cpu", 8 * GiB - other - 512 * MiB)
    await place(cfg.models["b"], cfg, ledger, nobody, no_eviction, wait=0.0)
    # Counted with its 3 GiB reservation, 2.5 GiB of the other programs' 2 GiB would vanish.
    assert ledger.external("cpu") == other


async def test_declared_devices_are_a_budget_and_never_read(
    smollm2_header: Path, machine: Machine
) -> None:
    machine.set_free("cpu", 0)  # were it read, nothing would fit
    cfg = config(smollm2_header, "a", devices=[{"id": "cpu", "memory": "8GiB"}])
    ledger = make_ledger(cfg)
    await place(cfg.models["a"], cfg, ledger, nobody, no_eviction, wait=0.0)
    assert machine.reads == 0 and ledger.external("cpu") == 0


async def test_devices_are_read_again_after_an_eviction(
    smollm2_header: Path, machine: Machine
) -> None:
    cfg = config(smollm2_header, "a", "b")
    a, b = need(cfg, "a", [host(8 * GiB)])["cpu"], need(cfg, "b", [host(8 * GiB)])["cpu"]
    other = 8 * GiB - a - b // 2  # b fits only once a has gone
    ledger = make_ledger(cfg)
    ledger.reserve("a", {"cpu": a})
    machine.set_free("cpu", 8 * GiB - other - a)
    evicted: list[str] = []

    async def evict(name: str) -> None:
        evicted.append(name)
        ledger.release(name)
        machine.set_free("cpu", 8 * GiB - other)  # its child has exited: the OS has it back

    def idle_a() -> list[Candidate]:
        return [Candidate("a", 0.0, busy=False, pinned=False)] if ledger.holdings("a") else []

    reads = machine.reads
    await place(cfg.models["b"], cfg, ledger, idle_a, evict, wait=0.0)
    assert evicted == ["a"] and machine.reads == reads + 2  # before each of the two decisions
    assert ledger.external("cpu") == other and ledger.holdings("b") == {"cpu": b}


async def test_a_failed_reading_keeps_the_last_values(
    smollm2_header: Path, machine: Machine
) -> None:
    cfg = config(smollm2_header, "a")
    ledger = make_ledger(cfg)
    ledger.set_external("cpu", 1 * GiB)
    machine.broken = True
    await place(cfg.models["a"], cfg, ledger, nobody, no_eviction, wait=0.0)
    assert ledger.external("cpu") == 1 * GiB and ledger.owners == ["a"]


@pytest.mark.parametrize("allocated", [False, True])
async def test_a_load_during_the_reading_never_counts_as_other_programs(
    smollm2_header: Path, machine: Machine, allocated: bool
) -> None:
    # Another load reserves while the devices are read. Mostly its child has not started: the
    # reading shows none of it used, and none of it may be subtracted either. But its child may
    # have allocated already (found by the concurrent property test): that memory is corral's,
    # not other programs', or the budget would shrink under the reservation.
    cfg = config(smollm2_header, "a")
    ledger = make_ledger(cfg)
    other = 2 * GiB
    machine.set_free("cpu", 8 * GiB - other)

    def load_x() -> None:
        ledger.reserve("x", {"cpu": 3 * GiB})
        if allocated:
            machine.measured["x"] = {"cpu": 3 * GiB}
            machine.set_free("cpu", 8 * GiB - other - 3 * GiB)

    machine.during_read = load_x
    reads = machine.reads
    await place(cfg.models["a"], cfg, ledger, nobody, no_eviction, wait=0.0)
    assert ledger.external("cpu") == other and machine.reads == reads + 1


async def test_a_child_that_exits_during_the_reading_makes_it_read_again(
    smollm2_header: Path, machine: Machine
) -> None:
    cfg = config(smollm2_header, "a")
    ledger = make_ledger(cfg)
    ledger.reserve("gone", {"cpu": 3 * GiB})
    other = 2 * GiB
    machine.set_free("cpu", 8 * GiB - other - 3 * GiB)

    def exits() -> None:
        # Its child exits before the sample (the OS has the memory back), then corral releases
        # it: counting it as corral's would hide 3 GiB of the other programs' use.
        machine.set_free("cpu", 8 * GiB - other)
        ledger.release("gone")

    machine.during_read = exits
    reads = machine.reads
    await place(cfg.models["a"], cfg, ledger, nobody, no_eviction, wait=0.0)
    assert machine.reads == reads + 2 and ledger.external("cpu") == other


async def test_a_waiting_load_reads_the_devices_at_most_once_a_second(
    smollm2_header: Path, machine: Machine, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = config(smollm2_header, "a", "b")
    b = need(cfg, "b", [host(8 * GiB)])["cpu"]
    ledger = make_ledger(cfg)
    ledger.reserve("a", {"cpu": 8 * GiB - b // 2})  # a busy model's child holds all but that
    machine.set_free("cpu", b // 2)
    began: list[float] = []  # when each reading of the devices began
    refresh = placing.refresh_external

    async def timed(ledger: Ledger) -> None:
        began.append(time.monotonic())
        await refresh(ledger)

    monkeypatch.setattr(placing, "refresh_external", timed)

    def busy_a() -> list[Candidate]:
        return [Candidate("a", 0.0, busy=True, pinned=False)] if ledger.holdings("a") else []

    async def a_finishes_and_stops() -> None:
        await until(lambda: len(began) >= 3)  # the load read the devices again as it waited
        ledger.release("a")
        machine.set_free("cpu", 8 * GiB)

    stopping = asyncio.create_task(a_finishes_and_stops())
    plan = await place(cfg.models["b"], cfg, ledger, busy_a, no_eviction, wait=60.0)
    await stopping
    # The ledger is looked at every 0.25 s; the devices are read a second apart at least.
    gaps = [later - earlier for earlier, later in zip(began, began[1:], strict=False)]
    assert gaps and min(gaps) >= placing._REREAD_INTERVAL - 0.01, gaps
    assert plan.reservation == {"cpu": b} and ledger.holdings("b") == {"cpu": b}


async def test_a_load_waits_for_other_programs_to_free_memory(
    smollm2_header: Path, machine: Machine
) -> None:
    cfg = config(smollm2_header, "a")
    ledger = make_ledger(cfg)
    machine.set_free("cpu", 16 * MiB)  # another program holds nearly everything, for a while

    async def other_program_exits() -> None:
        await asyncio.sleep(0.5)
        machine.set_free("cpu", 8 * GiB)

    exiting = asyncio.create_task(other_program_exits())
    plan = await place(cfg.models["a"], cfg, ledger, nobody, no_eviction, wait=10.0)
    await exiting
    assert ledger.holdings("a") == plan.reservation and ledger.external("cpu") == 0

    # Without it going away, the wait ends in a 503 that says who holds the memory.
    machine.set_free("cpu", 16 * MiB)
    ledger.release("a")
    with pytest.raises(ModelLoadError) as caught:
        await place(cfg.models["a"], cfg, ledger, nobody, no_eviction, wait=1.2)
    assert "other programs use" in caught.value.reason
    assert caught.value.retry_after == 5.0


def test_corral_plan_counts_what_other_programs_use_now_as_serve_does(
    smollm2_header: Path, machine: Machine
) -> None:
    cfg = config(smollm2_header, "a")
    n = need(cfg, "a", [host(8 * GiB)])["cpu"]
    machine.set_free("cpu", n // 2)  # another program holds all but half of what a needs
    report = build_report(cfg)
    (entry,) = report.models
    assert not entry.resident and "other programs use" in (entry.error or "")
    assert f"other programs {format_bytes(8 * GiB - n // 2)}" in render(report)
    machine.set_free("cpu", 8 * GiB)
    assert build_report(cfg).models[0].resident
