"""The states of a model and the moves between them.

::

    unloaded -> starting -> ready -> stopping -> unloaded
                   |          |
                   |          +--> crashed (its child exited or hung) --> starting
                   +--> failed (the load failed) -----------------------> starting
    starting, ready -> given_up (restart.max_failures in restart.window) -> starting (admin)
    failed, crashed, given_up -> unloaded (unload, reload, shutdown: no child to stop)
    ready -> retiring (a reload removed it: its child serves what was queued or in flight)
    retiring -> ready (put back) | stopping (served) | retired (its child died)
    unloaded, failed, crashed, given_up, stopping -> retired (removed: nothing to serve)
    starting -> retired (removed while loading, and the load failed)
    unloaded, failed, crashed, given_up -> downloading (a model named by hf: or ollama: gets
    and verifies its files) -> unloaded (they are ready) | failed | given_up | retired

``retired`` is final: a removed model never starts a child again. Only ``ManagedModel`` moves
a model between states (``ManagedModel._enter``), and only from ``unloaded``, ``failed``,
``crashed`` or ``given_up`` to ``starting``.
"""

from __future__ import annotations

from enum import StrEnum

from corral.errors import InvalidTransition as InvalidTransition  # defined with every error


class ModelState(StrEnum):
    UNLOADED = "unloaded"
    DOWNLOADING = "downloading"  # its files are being fetched (or found) and verified
    STARTING = "starting"
    READY = "ready"
    STOPPING = "stopping"
    FAILED = "failed"  # its last load failed: requests get that error until the back-off ends
    CRASHED = "crashed"  # its child died or hung while ready: requests wait for the restart
    GIVEN_UP = "given_up"  # too many failures: refused until an admin load
    RETIRING = "retiring"  # removed by a reload; serves what was queued or in flight for it
    RETIRED = "retired"  # removed and stopped: never started again

    @property
    def serving(self) -> bool:
        """Whether a child answers requests in this state."""
        return self in (ModelState.READY, ModelState.RETIRING)

    @property
    def broken(self) -> bool:
        """Failed, crashed or given up: no child, and a failure on record."""
        return self in (ModelState.FAILED, ModelState.CRASHED, ModelState.GIVEN_UP)


_S = ModelState
TRANSITIONS: dict[ModelState, frozenset[ModelState]] = {
    _S.UNLOADED: frozenset({_S.STARTING, _S.DOWNLOADING, _S.RETIRED}),
    _S.DOWNLOADING: frozenset({_S.UNLOADED, _S.FAILED, _S.GIVEN_UP, _S.RETIRED}),
    _S.STARTING: frozenset({_S.READY, _S.FAILED, _S.GIVEN_UP, _S.RETIRED}),
    _S.READY: frozenset({_S.STOPPING, _S.CRASHED, _S.GIVEN_UP, _S.RETIRING}),
    _S.STOPPING: frozenset({_S.UNLOADED, _S.RETIRED}),
    _S.FAILED: frozenset({_S.STARTING, _S.DOWNLOADING, _S.UNLOADED, _S.RETIRED}),
    _S.CRASHED: frozenset({_S.STARTING, _S.DOWNLOADING, _S.UNLOADED, _S.RETIRED}),
    _S.GIVEN_UP: frozenset({_S.STARTING, _S.DOWNLOADING, _S.UNLOADED, _S.RETIRED}),
    _S.RETIRING: frozenset({_S.READY, _S.STOPPING, _S.RETIRED}),
    _S.RETIRED: frozenset(),
}


def check_transition(current: ModelState, new: ModelState) -> None:
    """Raise ``InvalidTransition`` unless ``current -> new`` is allowed."""
    if new not in TRANSITIONS[current]:
        raise InvalidTransition(f"{current} -> {new} is not a valid model state change")
