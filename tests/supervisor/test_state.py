from __future__ import annotations

import itertools

import pytest

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
