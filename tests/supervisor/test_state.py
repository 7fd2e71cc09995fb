from __future__ import annotations

import itertools

import pytest

from corral.config import parse_config
from corral.errors import InvalidTransition
from corral.supervisor import Supervisor
from corral.supervisor.state import ModelState, check_transition

S = ModelState
# As docs/architecture.md draws them.
ALLOWED = {
    (S.UNLOADED, S.STARTING), (S.UNLOADED, S.RETIRED),
    (S.STARTING, S.READY), (S.STARTING, S.FAILED), (S.STARTING, S.GIVEN_UP),
    (S.STARTING, S.RETIRED),
    (S.READY, S.STOPPING), (S.READY, S.CRASHED), (S.READY, S.GIVEN_UP), (S.READY, S.RETIRING),
    (S.STOPPING, S.UNLOADED), (S.STOPPING, S.RETIRED),
    (S.FAILED, S.STARTING), (S.FAILED, S.UNLOADED), (S.FAILED, S.RETIRED),
    (S.CRASHED, S.STARTING), (S.CRASHED, S.UNLOADED), (S.CRASHED, S.RETIRED),
    (S.GIVEN_UP, S.STARTING), (S.GIVEN_UP, S.UNLOADED), (S.GIVEN_UP, S.RETIRED),
    (S.RETIRING, S.READY), (S.RETIRING, S.STOPPING), (S.RETIRING, S.RETIRED),
    # A model named by a source (hf:, ollama:) fetches and verifies its files first.
    (S.UNLOADED, S.DOWNLOADING), (S.FAILED, S.DOWNLOADING), (S.CRASHED, S.DOWNLOADING),
    (S.GIVEN_UP, S.DOWNLOADING),
    (S.DOWNLOADING, S.UNLOADED), (S.DOWNLOADING, S.FAILED), (S.DOWNLOADING, S.GIVEN_UP),
    (S.DOWNLOADING, S.RETIRED),
}


@pytest.mark.parametrize(("old", "new"), list(itertools.product(S, S)))
def test_only_the_documented_transitions_are_allowed(old: ModelState, new: ModelState) -> None:
    if (old, new) in ALLOWED:
        check_transition(old, new)
    else:
        with pytest.raises(InvalidTransition):
            check_transition(old, new)


def test_retired_is_final_and_only_idle_or_broken_models_start() -> None:
    assert not any((S.RETIRED, new) in ALLOWED for new in S)
    starts = {old for old, new in ALLOWED if new == S.STARTING}
    assert starts == {S.UNLOADED, S.FAILED, S.CRASHED, S.GIVEN_UP}


def test_a_cold_auto_sized_model_queues_for_its_largest_slot_count() -> None:
    config = parse_config({"models": {
        "auto": {"path": "m.gguf", "slots": "auto", "max_slots": 8},
        "fixed": {"path": "m.gguf", "slots": 2},
        "capped": {"path": "m.gguf", "slots": "auto", "queue": {"max": 3}}}})
    models = Supervisor(config).models
    auto, fixed, capped = (models[n] for n in ("auto", "fixed", "capped"))
    # Before the first load the plan is unknown: 1 slot, but room for 4 x max_slots waiting.
    assert auto.slots == 1 and auto.queue_limit(auto.slots) == 32
    assert fixed.queue_limit(fixed.slots) == 8
    assert capped.queue_limit(capped.slots) == 3  # an explicit queue.max always wins
