"""How the supervisor talks to the parts around it, all given at construction.

- ``SupervisorEvents``: what it tells observers (metrics, the proxy's queues) about models'
  lives. The base class ignores everything; ``Observers`` passes each event to several.
- ``Demand``: what it asks the proxy's queues: how many requests wait for a model (a crashed
  model that is wanted restarts at once; a busy one is never evicted) and how many the proxy
  still holds for it (a removed model serves them all before it stops).

Usage::

    supervisor = Supervisor(config, observers=[metrics, queues], demand=queues)
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Protocol

import structlog

if TYPE_CHECKING:
    from corral.supervisor.process import ModelProcess

log = structlog.get_logger("corral.supervisor")


class SupervisorEvents:
    """Base observer: override what you need. Methods must be quick and never raise."""

    def load_finished(self, model: str, ok: bool, seconds: float, restart: bool) -> None:
        """A load ended: ``ok`` or failed, after ``seconds``; ``restart`` after a crash."""

    def stopped(self, model: str, reason: str) -> None:
        """A child stopped: ``idle``, ``memory``, ``manual``, ``reload``, ``removed``,
        ``shutdown`` or ``crash``."""

    async def child_stopping(self, model: str, process: ModelProcess) -> None:
        """A ready child is about to be stopped on purpose; it still answers (read its state)."""

    def model_ready(self, model: str) -> None:
        """A child is ready: its slots (planned, for ``slots: auto``) can be handed out."""

    def model_retired(self, model: str) -> None:
        """A removed model serves nothing more: whoever still waits for it is refused."""


class Observers(SupervisorEvents):
    """Several observers as one; one that raises is logged and the others still hear."""

    def __init__(self, observers: Iterable[SupervisorEvents]) -> None:
        self.observers = list(observers)

    def load_finished(self, model: str, ok: bool, seconds: float, restart: bool) -> None:
        for o in self.observers:
            with _logged("load_finished"):
                o.load_finished(model, ok, seconds, restart)

    def stopped(self, model: str, reason: str) -> None:
        for o in self.observers:
            with _logged("stopped"):
                o.stopped(model, reason)

    async def child_stopping(self, model: str, process: ModelProcess) -> None:
        for o in self.observers:
            with _logged("child_stopping"):
                await o.child_stopping(model, process)

    def model_ready(self, model: str) -> None:
        for o in self.observers:
            with _logged("model_ready"):
                o.model_ready(model)

    def model_retired(self, model: str) -> None:
        for o in self.observers:
            with _logged("model_retired"):
                o.model_retired(model)


@contextlib.contextmanager
def _logged(event: str) -> Iterator[None]:
    try:
        yield
    except Exception as exc:
        log.error("observer_failed", event=event, error=f"{type(exc).__name__}: {exc}")


class Demand(Protocol):
    """The requests the proxy holds for each model."""

    def waiting(self, model: str) -> int:
        """Requests waiting for the model: for a slot, or for it to load."""

    def holding(self, model: str) -> int:
        """Requests in the proxy's care for it: waiting, or holding a slot until answered."""


class NoDemand:
    """No proxy: nothing ever waits (tests, ``corral plan``)."""

    def waiting(self, model: str) -> int:
        return 0

    def holding(self, model: str) -> int:
        return 0
