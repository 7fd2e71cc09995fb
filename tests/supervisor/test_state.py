from __future__ import annotations

import itertools

import pytest

from corral.config import parse_config
from corral.supervisor.model import ManagedModel
from corral.supervisor.state import InvalidTransition, ModelState, check_transition

S = ModelState
ALLOWED = {
    (S.UNLOADED, S.STARTING),
    (S.STARTING, S.READY), (S.STARTING, S.FAILED), (S.STARTING, S.STOPPING),
    (S.READY, S.STOPPING), (S.READY, S.FAILED),
    (S.STOPPING, S.UNLOADED),
    (S.FAILED, S.STARTING), (S.FAILED, S.STOPPING),
}


@pytest.mark.parametrize(("old", "new"), list(itertools.product(S, S)))
def test_only_the_documented_transitions_are_allowed(old: ModelState, new: ModelState) -> None:
    if (old, new) in ALLOWED:
        check_transition(old, new)
    else:
        with pytest.raises(InvalidTransition):
            check_transition(old, new)


def test_a_cold_auto_sized_model_queues_for_its_largest_slot_count() -> None:
    config = parse_config({"models": {
        "auto": {"path": "m.gguf", "slots": "auto", "max_slots": 8},
        "fixed": {"path": "m.gguf", "slots": 2},
        "capped": {"path": "m.gguf", "slots": "auto", "queue": {"max": 3}}}})
    auto, fixed, capped = (ManagedModel(config.models[n]) for n in ("auto", "fixed", "capped"))
    # Before the first load the plan is unknown: 1 slot, but room for 4 x max_slots waiting.
    assert auto.slots == 1 and auto.queue_limit(auto.slots) == 32
    assert fixed.queue_limit(fixed.slots) == 8
    assert capped.queue_limit(capped.slots) == 3  # an explicit queue.max always wins
