"""Whether a model would fit right now: the question a load asks, answered without loading.

``would_fit`` asks ``plan_placement`` and ``choose_evictions`` exactly what ``place`` (in
``corral.supervisor.placing``) asks when a load starts, against the ledger as it stands: does
the model fit in what is free, and if not, which idle models would a load stop to make room.
It reserves nothing and stops nothing; an endpoint picker reads the answer from
``/admin/status`` to send a request where its model would load.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from corral.errors import NoFit
from corral.placement.decide import PlacementPlan, PlacementRequest, plan_placement
from corral.placement.ledger import EvictionCandidate, Ledger, choose_evictions
from corral.placement.profile import ModelProfile


@dataclass(frozen=True)
class FitAnswer:
    """What a load of one model would do now.

    ``now``: it would start without stopping anything. ``after_evicting_idle``: it would start
    once the models in ``evict`` (idle, unpinned, least recently used first) are stopped; true
    as well when ``now`` is. Both false: it would wait for memory (busy or pinned models, or
    other programs, hold it) or never fit here.
    """

    now: bool
    after_evicting_idle: bool
    evict: tuple[str, ...] = ()

    def as_dict(self) -> dict[str, object]:
        return {"now": self.now, "after_evicting_idle": self.after_evicting_idle,
                "evict": list(self.evict)}


NO_ROOM = FitAnswer(now=False, after_evicting_idle=False)


def better_layout_evictions(
    profile: ModelProfile, request: PlacementRequest, plan: PlacementPlan, ledger: Ledger,
    candidates: Sequence[EvictionCandidate],
) -> list[str] | None:
    """Idle models to stop so that the load runs wholly on the GPUs (or on fewer of them) than
    ``plan`` allows, or None.

    With ``gpu_layers: auto`` a plan that fits what is free may leave layers on the CPU, or
    split a model over GPUs, where stopping idle models would let it run whole on one GPU,
    many times faster. Only that is a reason: the alternative is planned with ``plan``'s own
    slots and context (more of either is never a reason to stop a model), and a model that
    would still be partly on the CPU evicts nobody for a few more layers.
    """
    whole = profile.n_layer + 1
    if plan.gpu_layers == whole and len(plan.gpus) <= 1:
        return None  # no better layout exists
    idle = [c for c in candidates if not c.busy and not c.pinned and ledger.holdings(c.name)]
    if not idle:
        return None
    try:
        ideal = plan_placement(profile, request.sized(plan.slots, plan.ctx_per_slot),
                               ledger.devices, ledger.without(c.name for c in idle))
    except (NoFit, ValueError):
        return None
    better = ideal.gpu_layers == whole and (
        plan.gpu_layers < whole or len(ideal.gpus) < len(plan.gpus))
    if not better:
        return None
    return choose_evictions(ideal.reservation, idle, ledger) or None


def would_fit(
    profile: ModelProfile, request: PlacementRequest, ledger: Ledger,
    candidates: Sequence[EvictionCandidate],
) -> FitAnswer:
    """Whether ``profile`` asked for as ``request`` fits in ``ledger`` now, or after stopping
    some of ``candidates`` (the other models that hold memory; busy and pinned ones are never
    chosen)."""
    try:
        plan = plan_placement(profile, request, ledger.devices, ledger)
        better = better_layout_evictions(profile, request, plan, ledger, candidates)
        if better:
            # It fits, but a load stops these first to run wholly on the GPUs.
            return FitAnswer(now=False, after_evicting_idle=True, evict=tuple(better))
        return FitAnswer(now=True, after_evicting_idle=True)
    except NoFit as exc:
        if exc.permanent:
            return NO_ROOM
        victims = choose_evictions(exc.needed, candidates, ledger)
    except ValueError:
        return NO_ROOM  # a request placement refuses outright (a load answers 503 for it)
    if not victims:
        return NO_ROOM
    # ``needed`` is the most promising layout's reservation; with the victims gone the planner
    # may choose another layout: plan again, as the load does after its evictions.
    try:
        plan_placement(profile, request, ledger.devices, ledger.without(victims))
    except (NoFit, ValueError):
        return NO_ROOM
    return FitAnswer(now=False, after_evicting_idle=True, evict=tuple(victims))
