"""Interleaved loads, evictions, releases and other programs: the ledger never over-commits.

``test_ledger.test_property_never_over_commits`` reserves and releases amounts one after the
other. Here several loads are in flight at once, as in the running corral: a load plans against
the ledger, other loads may reserve, release or evict before it reserves its plan, other
programs' use of a device changes, and a load that does not fit chooses whom to evict among
models that are busy, pinned or idle. After every step:

- a device never holds more reservations than its budget, except where other programs grew
  into memory already reserved; and corral never adds to a device that is over its budget;
- a refused reservation changes nothing;
- eviction never picks a busy or pinned model, nor the loading one, nor one holding nothing;
  stopping what it picks makes the load's reservation fit; it is never tried for a load that
  could not fit on idle devices.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from corral.placement.decide import (
    NoFit,
    PlacementPlan,
    PlacementRequest,
    choose_evictions,
    plan_placement,
)
from corral.placement.devices import Device
from corral.placement.ledger import CapacityError, EvictionCandidate, Ledger
from corral.placement.profile import ModelProfile
from tests.placement.strategies import GiB, MiB, device_sets, profiles, requests

N_MODELS = 5
NAMES = [f"m{i}" for i in range(N_MODELS)]


@dataclass
class Model:
    profile: ModelProfile
    request: PlacementRequest
    busy: bool = False
    pinned: bool = False
    last_used: float = 0.0


@dataclass
class World:
    devices: list[Device]
    ledger: Ledger
    models: dict[str, Model]
    pending: dict[str, PlacementPlan] = field(default_factory=dict)  # planned, not reserved
    clock: float = 0.0
    others_grew: set[str] = field(default_factory=set)  # devices where external use went up
    evictions: int = 0

    def held(self) -> dict[str, int]:
        return {d.id: sum(self.ledger.held_by(d.id).values()) for d in self.devices}

    def reservations(self) -> dict[str, dict[str, int]]:
        return self.ledger.reservations()

    def plan(self, name: str) -> None:
        """A load decides: a plan to reserve later, or evictions chosen and carried out."""
        model = self.models[name]
        if name in self.ledger.owners:
            return  # running already
        try:
            self.pending[name] = plan_placement(model.profile, model.request, self.devices,
                                                self.ledger)
        except NoFit as exc:
            self.evict_for(name, exc)

    def evict_for(self, loading: str, exc: NoFit) -> None:
        pool = [EvictionCandidate(n, m.last_used, busy=m.busy, pinned=m.pinned)
                for n, m in self.models.items() if n != loading and n in self.ledger.owners]
        victims = choose_evictions(exc.needed, pool, self.ledger)
        if exc.impossible:
            assert victims is None, "evicting for a load that cannot fit even on idle devices"
        if not victims:
            return
        assert len(set(victims)) == len(victims)
        for victim in victims:
            model = self.models[victim]
            assert victim != loading and not model.busy and not model.pinned, victim
            assert self.ledger.holdings(victim), f"{victim} holds nothing"
        for victim in victims:
            self.ledger.release(victim)
            self.pending.pop(victim, None)
            self.evictions += 1
        assert self.ledger.fits(exc.needed), "the evictions did not make room"

    def load(self, name: str) -> None:
        """Plan and reserve with nothing in between; after evictions, plan once more."""
        for _ in range(2):
            evictions = self.evictions
            self.plan(name)
            if name in self.pending:
                self.reserve(name)
                return
            if self.evictions == evictions:
                return

    def reserve(self, name: str) -> None:
        """A planned load reserves, possibly after other steps changed the ledger."""
        plan = self.pending.pop(name, None)
        if plan is None:
            return
        before = self.reservations()
        try:
            self.ledger.reserve(name, plan.reservation)
        except CapacityError:
            assert self.reservations() == before, "a refused reservation changed the ledger"
            return
        self.clock += 1.0
        self.models[name].last_used = self.clock
        for device_id in plan.reservation:
            assert self.held()[device_id] <= self.ledger.capacity(device_id)

    def release(self, name: str) -> None:
        self.ledger.release(name)
        self.pending.pop(name, None)

    def external(self, index: int, used: int) -> None:
        device = self.devices[index % len(self.devices)]
        if used > self.ledger.external(device.id):
            self.others_grew.add(device.id)
        self.ledger.set_external(device.id, used)

    def use(self, name: str, busy: bool, pinned: bool) -> None:
        model = self.models[name]
        model.busy, model.pinned = busy, pinned
        if name in self.ledger.owners:
            self.clock += 1.0
            model.last_used = self.clock


model_index = st.integers(min_value=0, max_value=N_MODELS - 1)
sometimes = st.integers(min_value=0, max_value=3).map(lambda n: n == 0)  # one time in four
steps = st.lists(
    st.one_of(
        st.tuples(st.just("load"), model_index),  # plan and reserve at once, as place() does
        st.tuples(st.just("load"), model_index),
        st.tuples(st.just("plan"), model_index),  # plan now, reserve at a later step
        st.tuples(st.just("reserve"), model_index),
        st.tuples(st.just("release"), model_index),
        st.tuples(st.just("use"), model_index, sometimes, sometimes),
        st.tuples(st.just("external"), st.integers(min_value=0, max_value=3),
                  st.integers(min_value=0, max_value=4 * 16).map(lambda n: n * 256 * MiB)),
    ),
    min_size=4,
    max_size=50,
)


@st.composite
def worlds(draw: st.DrawFn) -> World:
    devices = draw(device_sets())
    ledger = Ledger(devices, reserve_gpu=draw(st.sampled_from([0, 512 * MiB])),
                    reserve_ram=draw(st.sampled_from([0, 1 * GiB])))
    models = {n: Model(draw(profiles()), draw(requests(n))) for n in NAMES}
    return World(devices, ledger, models)


@settings(max_examples=200, deadline=None)
@given(worlds(), steps)
def test_interleaved_loads_never_over_commit(world: World, ops: list[tuple[Any, ...]]) -> None:
    for op in ops:
        kind = op[0]
        held_before = world.held()
        if kind == "load":
            world.load(NAMES[int(op[1])])
        elif kind == "plan":
            world.plan(NAMES[int(op[1])])
        elif kind == "reserve":
            world.reserve(NAMES[int(op[1])])
        elif kind == "release":
            world.release(NAMES[int(op[1])])
        elif kind == "use":
            world.use(NAMES[int(op[1])], bool(op[2]), bool(op[3]))
        else:
            world.external(int(op[1]), int(op[2]))
        for device_id, held in world.held().items():
            capacity = world.ledger.capacity(device_id)
            if held > held_before[device_id]:
                assert held <= capacity, f"{op}: {device_id} over-committed by corral"
            if device_id not in world.others_grew:
                assert held <= capacity, f"{op}: {device_id} holds more than its budget"
