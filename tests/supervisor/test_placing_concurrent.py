"""Several ``place()`` calls at once on one event loop never over-commit and never evict wrongly.

``place()`` runs as in the supervisor: each load reads its profile in a thread, may read the
devices in a thread, evicts (an await that takes a while) and waits. The supervisor's part is
played by ``Host``: it tracks each model's state (``starting``, ``ready``, ``stopping``), which
models are busy or pinned, and stops a model when ``place()`` evicts it, with the same
eligibility rule as ``Supervisor._eviction_candidates``.

What is faked, and why that is fair: the GGUF profile (``read_profile`` returns a drawn
profile: the file format is tested in tests/probe) and, for discovered devices, the device
reading (``read_usage``, the NVML/psutil edge), which reports
what ``Host``'s children have allocated. Children allocate their whole reservation when they
become ready, and free it when they stop.

Checked after every reservation: the reservations on a device never exceed its budget, and,
where devices are discovered, reservations plus other programs' real use never exceed the
device's memory less the reserve. ``evict`` is only ever called for a model that is ready,
idle and not pinned, and is never the loading one.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from corral.config import Config, parse_config
from corral.errors import ModelLoadError
from corral.placement.decide import plan_placement
from corral.placement.devices import Device, host
from corral.placement.ledger import Ledger
from corral.placement.profile import ModelProfile
from corral.placement.requests import placement_request
from corral.probe import host as host_io
from corral.supervisor import placing
from corral.supervisor.placing import Candidate, place
from tests.placement.public_models import llama31_8b
from tests.placement.strategies import GiB, MiB, device_sets, profiles

NAMES = ["m0", "m1", "m2", "m3"]


class CheckedLedger(Ledger):
    """A ledger that checks, after every reservation, that no device is over its budget."""

    physical: Callable[[], None] | None = None

    def reserve(self, owner: str, amounts: Mapping[str, int]) -> None:
        super().reserve(owner, amounts)
        for device in self.devices:
            held = sum(self.held_by(device.id).values())
            assert held <= self.capacity(device.id), f"{device.id} over-committed by {owner}"
        if self.physical is not None:
            self.physical()


@dataclass
class Host:
    """The supervisor's side: models' states, who is busy or pinned, stopping on eviction."""

    ledger: Ledger
    pinned: set[str]
    busy: set[str]
    stop_delay: float
    other: dict[str, int]  # bytes other programs really use, per device (discovered devices)
    state: dict[str, str] = field(default_factory=lambda: dict.fromkeys(NAMES, "unloaded"))
    allocated: dict[str, dict[str, int]] = field(default_factory=dict)
    last_used: dict[str, float] = field(default_factory=lambda: dict.fromkeys(NAMES, 0.0))
    evicted: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    clock: float = 0.0
    last_reading: dict[str, dict[str, int]] = field(default_factory=dict)

    def candidates(self, loading: str) -> list[Candidate]:
        # As Supervisor._eviction_candidates: models holding memory, other than the loading
        # one; busy when requests use them or they are not ready.
        return [Candidate(n, self.last_used[n], busy=n in self.busy or self.state[n] != "ready",
                          pinned=n in self.pinned)
                for n in NAMES if n != loading and self.ledger.holdings(n)]

    async def evict(self, name: str, loading: str) -> None:
        assert name != loading
        assert self.state[name] == "ready", f"evicting {name} while {self.state[name]}"
        assert name not in self.busy and name not in self.pinned, f"evicting busy/pinned {name}"
        self.state[name] = "stopping"
        self.evicted.append(name)
        await asyncio.sleep(self.stop_delay)
        with self.lock:  # its child exits: the memory is free, then corral releases it
            self.allocated.pop(name, None)
        self.ledger.release(name)
        self.state[name] = "unloaded"

    async def load(self, cfg: Config, name: str, delay: float, start: float, wait: float) -> str:
        await asyncio.sleep(delay)
        if self.state[name] != "unloaded":
            return "shared"  # the supervisor would let this request share the load or the child
        self.state[name] = "starting"
        try:
            plan = await place(cfg.models[name], cfg, self.ledger, lambda: self.candidates(name),
                               lambda victim: self.evict(victim, name), wait=wait)
        except ModelLoadError:
            assert not self.ledger.holdings(name), "a refused load kept a reservation"
            self.state[name] = "unloaded"
            return "refused"
        assert self.ledger.holdings(name) == plan.reservation
        await asyncio.sleep(start)  # the child starts, then has allocated its reservation
        with self.lock:
            self.allocated[name] = dict(plan.reservation)
        self.clock += 1.0
        self.last_used[name] = self.clock
        self.state[name] = "ready"
        return "loaded"

    def discover(self, devices: list[Device]) -> list[Device]:
        """What NVML and psutil would report now: each device's free memory.

        What each child uses is read at the same moment and kept for ``children``, which
        ``placing`` calls right after this, as the real probes read one state of the machine.
        """
        with self.lock:
            used = {d.id: self.other.get(d.id, 0) for d in devices}
            for amounts in self.allocated.values():
                for device_id, n in amounts.items():
                    used[device_id] += n
            # Children that have started but not allocated yet are measured at 0 everywhere.
            measured = {n: dict.fromkeys((d.id for d in devices), 0) for n in NAMES
                        if self.state[n] in ("starting", "ready", "stopping")}
            for n, amounts in self.allocated.items():
                measured.setdefault(n, {}).update(amounts)
            self.last_reading = measured
            return [Device(d.id, d.kind, d.total, max(0, d.total - used[d.id]), d.name)
                    for d in devices]

    def children(self) -> dict[str, dict[str, int]]:
        return self.last_reading


@dataclass
class Scenario:
    devices: list[Device]
    discovered: bool
    reserve_gpu: int
    reserve_ram: int
    other: dict[str, int]
    models: dict[str, dict[str, Any]]
    profiles: dict[str, ModelProfile]
    preload: list[str]
    busy: set[str]
    loads: list[tuple[str, float, float]]  # model, start delay, time to become ready
    stop_delay: float
    wait: float


@st.composite
def scenarios(draw: st.DrawFn) -> Scenario:
    devices = draw(device_sets(max_gpus=2))
    discovered = draw(st.booleans())
    other = ({d.id: draw(st.integers(min_value=0, max_value=d.total // GiB)) * GiB // 2
              for d in devices} if discovered else {})
    models = {n: {"path": f"/models/{n}.gguf",
                  "slots": draw(st.sampled_from([1, 2, "auto"])),
                  "max_slots": 4,
                  "ctx_per_slot": draw(st.sampled_from([512, 4096, "auto"])),
                  "gpu_layers": draw(st.sampled_from(["auto", "all", 0])),
                  "pinned": draw(st.integers(min_value=0, max_value=3)) == 0}
              for n in NAMES}
    ms = st.integers(min_value=0, max_value=5).map(lambda n: n / 1000)
    # Children take longer to start than loads take to arrive, so loads decide while others
    # are still starting (reserved, nothing allocated yet).
    starting = st.integers(min_value=0, max_value=20).map(lambda n: n / 1000)
    return Scenario(
        devices=devices,
        discovered=discovered,
        reserve_gpu=draw(st.sampled_from([0, 512 * MiB])),
        reserve_ram=draw(st.sampled_from([0, 1 * GiB])),
        other=other,
        models=models,
        profiles={n: draw(profiles()) for n in NAMES},
        preload=draw(st.lists(st.sampled_from(NAMES), unique=True, max_size=3)),
        busy=set(draw(st.lists(st.sampled_from(NAMES), unique=True, max_size=2))),
        loads=draw(st.lists(st.tuples(st.sampled_from(NAMES), ms, starting), min_size=2,
                            max_size=8)),
        stop_delay=draw(ms),
        wait=draw(st.sampled_from([0.0, 0.02])),
    )


async def run(s: Scenario, cfg: Config, host: Host) -> list[str]:
    for name in s.preload:  # already running when the burst of requests comes
        await host.load(cfg, name, 0.0, 0.0, 0.0)
    return await asyncio.gather(*(host.load(cfg, name, delay, start, s.wait)
                                  for name, delay, start in s.loads))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(scenarios())
def test_concurrent_places_never_over_commit_nor_evict_wrongly(s: Scenario) -> None:
    data: dict[str, Any] = {
        "models": s.models, "reserve": {"gpu": s.reserve_gpu, "ram": s.reserve_ram}}
    if not s.discovered:
        data["devices"] = [{"id": d.id, "memory": d.total} for d in s.devices]
    cfg = parse_config(data)
    ledger = CheckedLedger(s.devices, s.reserve_gpu, s.reserve_ram)
    pinned = {n for n, m in s.models.items() if m["pinned"]}
    host = Host(ledger, pinned, s.busy, s.stop_delay, s.other)

    def physical() -> None:
        # Other programs' real use plus every reservation fits each device, less the reserve.
        for d in s.devices:
            reserve = s.reserve_gpu if d.kind == "gpu" else s.reserve_ram
            held = sum(ledger.held_by(d.id).values())
            assert held + s.other.get(d.id, 0) <= max(0, d.total - reserve), d.id

    if s.discovered:
        ledger.physical = physical
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(host_io, "read_profile", lambda path: s.profiles[Path(path).stem])
        mp.setattr(host_io, "discover_devices", lambda: host.discover(s.devices))
        mp.setattr(host_io, "read_usage", lambda: (host.discover(s.devices), host.children()))
        mp.setattr(placing, "_CAPACITY_POLL", 0.002)
        outcomes = asyncio.run(run(s, cfg, host))
    assert set(outcomes) <= {"loaded", "refused", "shared"}
    for name in host.evicted:
        assert name not in s.busy and name not in pinned
    assert all(host.state[n] in ("ready", "unloaded") for n in NAMES)
    assert {n for n in NAMES if host.state[n] == "ready"} == set(ledger.owners)


async def test_a_victim_that_became_busy_meanwhile_is_not_evicted(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Two idle models must go; while the first stops, a request comes for the second."""
    cfg = parse_config({
        "models": {n: {"path": f"/models/{n}.gguf", "slots": 1, "ctx_per_slot": 512,
                       "gpu_layers": 0} for n in ("a", "b", "x")},
        "devices": [{"id": "cpu", "memory": "64GiB"}], "reserve": {"ram": 0}})
    monkeypatch.setattr(host_io, "read_profile", lambda path: llama31_8b())
    need = plan_placement(llama31_8b(), placement_request(cfg.models["x"], cfg),
                          [host(64 * GiB)]).reservation["cpu"]
    ledger = Ledger([host(need + GiB)])
    half = need // 2 + GiB // 2  # x fits only once both a and b are gone
    ledger.reserve("a", {"cpu": half})
    ledger.reserve("b", {"cpu": half})
    busy: set[str] = set()
    evicted: list[str] = []

    def candidates() -> list[Candidate]:
        return [Candidate(n, t, busy=n in busy, pinned=False)
                for n, t in (("a", 1.0), ("b", 2.0)) if ledger.holdings(n)]

    async def evict(name: str) -> None:
        assert name not in busy, f"{name} evicted while busy"
        evicted.append(name)
        busy.add("b")  # a request for b arrives while a stops
        await asyncio.sleep(0)
        ledger.release(name)

    with pytest.raises(ModelLoadError, match="busy or pinned"):
        await place(cfg.models["x"], cfg, ledger, candidates, evict, wait=0.0)
    assert evicted == ["a"] and ledger.holdings("b") == {"cpu": half}
