"""Admission: never more requests upstream than a model has slots; the rest wait, visibly.

llama-server queues excess requests inside itself where nobody can see them. corral keeps that
queue instead: a FIFO per model, bounded in length (``queue.max``, 429 when full) and in time
(``queue.timeout``, 503 when exceeded). A client that disconnects leaves the queue at once.

Usage::

    queue = AdmissionQueue("smollm2", slots=lambda: 4, limit=lambda s: 16, timeout=60)
    await queue.admit(wait_for_disconnect)   # raises QueueFullError / QueueTimeoutError
    try:
        ...                                  # one request upstream
    finally:
        queue.release()
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterator, Mapping
from functools import partial
from typing import Any, Protocol

from corral.config import Config
from corral.errors import (
    ClientGoneError,
    ModelUnavailableError,
    QueueFullError,
    QueueTimeoutError,
)
from corral.supervisor.events import SupervisorEvents


class AdmissionQueue:
    """One model's slots and waiters. FIFO today; a priority order can replace the deque."""

    def __init__(
        self,
        model: str,
        slots: Callable[[], int],
        limit: Callable[[int], int],
        timeout: float,
    ) -> None:
        self.model = model
        self._slots = slots
        self._limit = limit
        self.timeout = timeout
        self.in_flight = 0
        # Admitted requests still waiting for the model to load: queued from a client's view.
        self.loading = 0
        self._waiters: deque[asyncio.Future[None]] = deque()

    def reconfigure(
        self, slots: Callable[[], int], limit: Callable[[int], int], timeout: float
    ) -> None:
        """New limits from a reloaded config; waiters keep their place."""
        self._slots = slots
        self._limit = limit
        self.timeout = timeout
        self.wake()

    @property
    def slots(self) -> int:
        return self._slots()

    @property
    def depth(self) -> int:
        """Requests waiting: for a free slot, or for the model to finish loading."""
        return len(self._waiters) + self.loading

    @property
    def holding(self) -> int:
        """Requests in this queue's care: waiting for a slot, or holding one until released."""
        return len(self._waiters) + self.in_flight

    def limit(self) -> int:
        return self._limit(self._slots())

    async def admit(self, disconnected: Callable[[], Awaitable[object]] | None = None) -> float:
        """Take a slot, waiting in line if none is free; return the seconds waited."""
        if self.in_flight < self._slots() and not self._waiters:
            self.in_flight += 1
            return 0.0
        limit = self.limit()
        # Requests waiting for the model to load are queued too (``depth``): the bound counts
        # them, so the depth a dashboard shows never exceeds the limit it shows.
        if self.depth >= limit:
            raise QueueFullError(self.model, limit, retry_after=1.0)
        started = time.monotonic()
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        watcher = asyncio.ensure_future(disconnected()) if disconnected is not None else None
        try:
            pending: set[asyncio.Future[Any]] = {waiter} if watcher is None else {waiter, watcher}
            await asyncio.wait(pending, timeout=self.timeout,
                               return_when=asyncio.FIRST_COMPLETED)
        except BaseException:
            # Cancelled after the slot was handed over: give it back, or it is lost for good.
            if _handed(waiter):
                self.release()
            raise
        finally:
            if watcher is not None:
                watcher.cancel()
            if not waiter.done():
                waiter.cancel()
                self._waiters.remove(waiter)
        refused = None if waiter.cancelled() else waiter.exception()
        admitted = _handed(waiter)
        if watcher is not None and watcher.done() and not watcher.cancelled():
            if admitted:
                self.release()
            raise ClientGoneError(f"client left the queue of model {self.model!r}")
        if refused is not None:
            raise refused
        if not admitted:
            raise QueueTimeoutError(self.model, self.timeout, retry_after=1.0)
        return time.monotonic() - started

    def release(self) -> None:
        """Give a slot back and hand it to the first waiter still in line."""
        self.in_flight -= 1
        self.wake()

    def refuse_waiters(self, error: Callable[[], BaseException]) -> None:
        """End every wait for a slot with ``error()``: no slot will come (the model is gone)."""
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_exception(error())

    def wake(self) -> None:
        """Admit waiters while slots are free (also after the slot count grew)."""
        while self._waiters and self.in_flight < self._slots():
            waiter = self._waiters.popleft()
            if waiter.done():
                continue
            # The slot passes straight to the waiter, so a newcomer cannot take it first.
            self.in_flight += 1
            waiter.set_result(None)


def _handed(waiter: asyncio.Future[None]) -> bool:
    """Whether ``waiter`` was given a slot (rather than cancelled or refused)."""
    return waiter.done() and not waiter.cancelled() and waiter.exception() is None


class AdmissionQueues(SupervisorEvents, Mapping[str, AdmissionQueue]):
    """One ``AdmissionQueue`` per model, as the supervisor sees them: its ``Demand`` (how many
    requests wait for, or are held for, a model) and an observer of its models (a ready model
    admits waiters; a retired one refuses them).

    Usage::

        queues = AdmissionQueues()
        supervisor = Supervisor(config, observers=[queues], demand=queues)
        queues.configure(config, supervisor.models)
        await queues["smollm2"].admit()
    """

    def __init__(self) -> None:
        self._queues: dict[str, AdmissionQueue] = {}
        self._configured: frozenset[str] = frozenset()

    def __getitem__(self, name: str) -> AdmissionQueue:
        return self._queues[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._queues)

    def __len__(self) -> int:
        return len(self._queues)

    def configure(self, config: Config, models: Mapping[str, QueuedModel]) -> None:
        """A queue per configured model, with its limits; waiters keep their place."""
        for name, spec in config.models.items():
            model = models[name]
            slots = partial(_slots_of, model)
            queue = self._queues.get(name)
            if queue is None:
                self._queues[name] = AdmissionQueue(name, slots, model.queue_limit,
                                                    spec.queue_timeout)
            else:
                queue.reconfigure(slots, model.queue_limit, spec.queue_timeout)
        self._configured = frozenset(config.models)
        for name in [n for n in self._queues if n not in self._configured]:
            self._drop_if_unused(name)

    def _drop_if_unused(self, name: str) -> None:
        queue = self._queues.get(name)
        if queue is not None and queue.depth == 0 and queue.in_flight == 0:
            del self._queues[name]  # nothing uses it now; its series leave /metrics

    # -- Demand ------------------------------------------------------------------------------

    def waiting(self, model: str) -> int:
        queue = self._queues.get(model)
        return queue.depth if queue is not None else 0

    def holding(self, model: str) -> int:
        queue = self._queues.get(model)
        return queue.holding if queue is not None else 0

    # -- SupervisorEvents --------------------------------------------------------------------

    def model_ready(self, model: str) -> None:
        # Once a model is up, its planned slots (``slots: auto``) may admit more waiters.
        if (queue := self._queues.get(model)) is not None:
            queue.wake()

    def model_retired(self, model: str) -> None:
        # A removed model serves nothing more: its waiters would otherwise wait for a slot
        # until their queue timeout, only to be refused then.
        if (queue := self._queues.get(model)) is not None:
            queue.refuse_waiters(partial(ModelUnavailableError.removed, model))
            if model not in self._configured:
                self._drop_if_unused(model)


class QueuedModel(Protocol):
    """What a queue reads of its model: its slots (planned, once loaded) and queue bound."""

    @property
    def slots(self) -> int: ...

    def queue_limit(self, slots: int) -> int: ...


def _slots_of(model: QueuedModel) -> int:
    return model.slots
