"""The states of a model and the moves between them.

::

    unloaded -> starting -> ready -> stopping -> unloaded
                   |          |
                   v          v (child exits on its own)
                 failed <-----+
    failed -> starting (a retry after the back-off, or an admin load)
    starting -> stopping (unloaded or shut down while loading)
"""

from __future__ import annotations

from enum import StrEnum

from corral.errors import InvalidTransition as InvalidTransition  # defined with every error


class ModelState(StrEnum):
    UNLOADED = "unloaded"
    STARTING = "starting"
    READY = "ready"
    STOPPING = "stopping"
    FAILED = "failed"


TRANSITIONS: dict[ModelState, frozenset[ModelState]] = {
    ModelState.UNLOADED: frozenset({ModelState.STARTING}),
    ModelState.STARTING: frozenset({ModelState.READY, ModelState.FAILED, ModelState.STOPPING}),
    ModelState.READY: frozenset({ModelState.STOPPING, ModelState.FAILED}),
    ModelState.STOPPING: frozenset({ModelState.UNLOADED}),
    ModelState.FAILED: frozenset({ModelState.STARTING, ModelState.STOPPING}),
}


def check_transition(current: ModelState, new: ModelState) -> None:
    """Raise ``InvalidTransition`` unless ``current -> new`` is allowed."""
    if new not in TRANSITIONS[current]:
        raise InvalidTransition(f"{current} -> {new} is not a valid model state change")
