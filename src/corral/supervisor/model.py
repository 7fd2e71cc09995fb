"""One configured model: what requests, the admin API and the supervisor ask of it.

``ManagedModel`` is the model the rest of corral sees: leases on its ready child for requests
(loading it first, concurrent callers sharing one load), loads and unloads, a client's
``keep_alive``, the idle stop, a reload's new settings or its removal, and what ``/admin``
shows. Its state and the transitions that change it are ``ModelLifecycle``'s
(``corral.supervisor.lifecycle``).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from dataclasses import dataclass
from typing import Any

import httpx
import psutil
import structlog

from corral.config import ModelSpec
from corral.config.tuning import tuning_of
from corral.errors import (
    ModelDownloadingError,
    ModelLoadError,
    ModelUnavailableError,
    ShuttingDownError,
)
from corral.sources.download import Fetch
from corral.supervisor.lifecycle import ModelHost, ModelLifecycle, StopReason
from corral.supervisor.process import ERROR_TAIL_LINES, ModelProcess
from corral.supervisor.state import ModelState

log = structlog.get_logger("corral.supervisor")

__all__ = ["Lease", "ManagedModel", "ModelHost", "StopReason"]

# A request that starts a fetch waits this long before it is told "downloading": a model
# already in the cache (verified before) is ready by then and answers without a 503.
_FETCH_GRACE = 2.0


class ManagedModel(ModelLifecycle):
    """One configured model and whatever child currently serves it."""

    @property
    def transition(self) -> asyncio.Task[None] | None:
        return self._transition

    # -- what requests and the admin API ask ------------------------------------------------

    async def acquire(self, touch: bool = True, wait_download: bool = False) -> Lease:
        """A lease on the ready child, loading it first if needed; concurrent callers share
        one load. ``touch=False`` is for monitoring reads: they must not keep a model from
        going idle. While its files download, ``ModelDownloadingError`` with the progress,
        unless ``wait_download`` or its ``download_wait`` says to wait (up to its queue
        timeout; without bound for ``wait_download``).

        Raises ``ModelLoadError``, ``ModelUnavailableError`` or ``ShuttingDownError``.
        """
        while True:
            if self.host.closing_at is not None:
                raise ModelUnavailableError(self.name, "corral is shutting down", 5.0)
            state = self.state
            if state.serving:
                proc = self.process
                assert proc is not None and proc.client is not None
                self.in_flight += 1
                if touch:
                    self.last_used = time.monotonic()
                return Lease(self, proc, proc.client, touch)
            if state == ModelState.RETIRED:
                # A request that waited across the reload that removed the model.
                raise ModelUnavailableError.removed(self.name)
            if state == ModelState.STOPPING:
                assert self._transition is not None
                # A stop for a reload waits for long requests (up to generation_timeout): a
                # request arriving meanwhile waits at most its queue timeout.
                if not await self._await(self._transition, self.spec.queue_timeout):
                    raise ModelUnavailableError(
                        self.name, "it is restarting once its requests in flight finish", 5.0)
            elif state == ModelState.STARTING:
                assert self._transition is not None
                await self._await(self._transition, None)
            elif state == ModelState.DOWNLOADING:
                assert self._transition is not None and self.fetch is not None
                progress = self.fetch.progress
                if wait_download:
                    await self._await(self._transition, None)
                elif self.spec.download_wait:
                    if not await self._await(self._transition, self.spec.queue_timeout):
                        raise ModelDownloadingError(self.name, progress.text())
                elif (progress.phase == "downloading"
                      or not await self._await(self._transition, _FETCH_GRACE)):
                    raise ModelDownloadingError(self.name, progress.text())
            elif state == ModelState.GIVEN_UP:
                raise ModelLoadError(
                    self.name,
                    f"{self.last_error}; gave up after {self.restarts.recent} failures "
                    f"(POST /admin/models/{self.name}/load to try again)",
                    list(self.log_tail)[-ERROR_TAIL_LINES:], retry_after=60.0)
            elif self._restart is not None:
                # Failed or crashed with a restart due: wait for it (an admin load may cancel
                # it; this request then looks at the model again).
                await self._await(self._restart, None)
            elif state == ModelState.CRASHED:
                self._schedule_restart()  # it served before it died: worth waiting for
            elif state == ModelState.FAILED and time.monotonic() < self.retry_at:
                raise ModelLoadError(self.name, self.last_error or "load failed",
                                     retry_after=max(1.0, self.retry_at - time.monotonic()))
            else:
                self._begin_next()

    async def _await(self, task: asyncio.Task[None], timeout: float | None) -> bool:
        """Wait for a task others may wait for too (never cancelled from here), up to
        ``timeout``; False if it ran out. A load's own error is raised here.
        ``ShuttingDownError`` once corral's drain refuses every wait."""
        refused = asyncio.ensure_future(self.host.refusing.wait())
        try:
            await asyncio.wait({task, refused}, timeout=timeout,
                               return_when=asyncio.FIRST_COMPLETED)
        finally:
            refused.cancel()
        if self.host.refusing.is_set():
            raise ShuttingDownError("corral is shutting down")
        if not task.done():
            return False
        if not task.cancelled():
            task.result()
        return True

    async def load(self) -> None:
        """Load now (admin): clears a failed, crashed or given-up state and its back-off."""
        if self.state.broken:
            self.restarts.clear()
            self.retry_at = 0.0
            self._cancel_restart()
            self._begin_next()
        (await self.acquire(wait_download=True)).release()

    def download(self) -> Fetch | None:
        """Start, or join, the fetch of its files in the background (``download: startup``,
        and a pull through the API); None when it has no source or has its files already.

        The fetch says how far it is (``fetch.progress``: phase, bytes done and total) and
        ``await fetch.result()`` ends with the verified files, or raises ``DownloadError``.
        A model that failed is fetched again at once (its back-off is for loads).
        """
        if self.needs_files and (self.state == ModelState.UNLOADED or self.state.broken):
            self._cancel_restart()
            self._begin_download()
        return self.fetch if self.state == ModelState.DOWNLOADING else None

    async def unload(self, reason: StopReason) -> None:
        """Stop the child once its in-flight requests are done (bounded: ``_drain``)."""
        while self.state in (ModelState.STARTING, ModelState.STOPPING):
            assert self._transition is not None
            with contextlib.suppress(ModelLoadError):
                await asyncio.shield(self._transition)
        if self.state.serving:
            self._begin_stop(reason)
            assert self._transition is not None
            await asyncio.shield(self._transition)
        elif self.state.broken:
            self._cancel_restart()
            self.last_stop_reason = reason
            self._enter(ModelState.UNLOADED)

    @property
    def idle_limit(self) -> float | None:
        """How long it may stay idle before it is stopped: ``keep_alive`` if a client set one,
        else ``ttl``; None: never (``ttl: 0``, or a negative keep_alive)."""
        if self.keep_alive is not None:
            return None if math.isinf(self.keep_alive) else self.keep_alive
        return self.spec.ttl or None

    def keep_for(self, seconds: float | None, asked_at: float | None = None) -> None:
        """How long to stay loaded once idle, as a client asked (Ollama's ``keep_alive``):
        ``inf`` for ever, 0 stop once idle, None back to ``ttl``. Forgotten when it stops.

        ``asked_at`` (monotonic) is when that request arrived: the last request to arrive
        decides, so an answer that ends late does not undo what a later one asked (an unload
        asked while it was being written)."""
        asked_at = time.monotonic() if asked_at is None else asked_at
        if asked_at < self._keep_asked_at:
            return
        self._keep_asked_at = asked_at
        self.keep_alive = seconds

    def expires_at(self) -> float | None:
        """When (monotonic) the idle reaper will stop it if nothing uses it; None: never."""
        limit = self.idle_limit
        return None if limit is None else self.last_used + limit

    def stop_if_idle(self, now: float) -> None:
        """Stop a ready child that served nothing for its ``idle_limit``."""
        limit = self.idle_limit
        if (self.state == ModelState.READY and limit is not None and self.in_flight == 0
                and now - self.last_used >= limit):
            log.info("model_idle", model=self.name, idle_seconds=round(now - self.last_used, 1),
                     ttl=limit, keep_alive=self.keep_alive is not None)
            self._begin_stop("idle")

    @property
    def busy(self) -> bool:
        """Not to be evicted: serving, wanted, or between states."""
        return (self.in_flight > 0 or self.host.demand.waiting(self.name) > 0
                or self.state != ModelState.READY)

    # -- what the supervisor tells it --------------------------------------------------------

    def reconfigure(self, spec: ModelSpec) -> None:
        """A reload changed its settings: restart it with them once its requests are done
        (only if it was loaded, loading, or is preloaded)."""
        wanted = self.state in (ModelState.STARTING, ModelState.READY) or spec.preload
        if (spec.source, spec.download_dir) != (self.spec.source, self.spec.download_dir):
            self.files = None  # other files: fetched (and verified) again before a load
        self.spec = spec
        self._reload = self.host.spawn(self._restart_for_reload(wanted))

    async def _restart_for_reload(self, wanted: bool) -> None:
        await self.unload("reload")
        # Removed by a later reload meanwhile: loading it would start (and maybe evict for) a
        # child nobody wants.
        if wanted and self.host.closing_at is None and self.state != ModelState.RETIRED:
            with contextlib.suppress(ModelLoadError, ModelUnavailableError):
                (await self.acquire()).release()

    def restore(self, spec: ModelSpec, restart: bool) -> None:
        """Put back by a reload before it was retired: it stays, restarted with ``spec`` if
        ``restart`` (its settings changed)."""
        self._removal = None
        if self._retire is not None:
            self._retire.cancel()
            self._retire = None
        if self.state == ModelState.RETIRING:
            self._enter(ModelState.READY)
        if restart:
            self.reconfigure(spec)
        else:
            self.spec = spec

    async def close(self) -> None:
        """corral shuts down: abandon a load in progress, stop the child (bounded)."""
        background = [t for t in (self._restart, self._watch, self._reload, self._retire) if t]
        for task in background:
            task.cancel()
        await asyncio.gather(*background, return_exceptions=True)
        if (self.state in (ModelState.STARTING, ModelState.DOWNLOADING)
                and self._transition is not None):
            self._transition.cancel()  # the load stops its own half-started child
        if self._transition is not None:
            await asyncio.gather(self._transition, return_exceptions=True)
        if self.state.serving:
            self._begin_stop("shutdown")
            assert self._transition is not None
            await asyncio.gather(self._transition, return_exceptions=True)

    # -- what it shows -------------------------------------------------------------------------

    @property
    def slots(self) -> int:
        """The slots it has (planned), or is configured with before its first load."""
        if self.plan is not None:
            return self.plan.slots
        return self.spec.slots if isinstance(self.spec.slots, int) else 1

    def queue_limit(self, slots: int) -> int:
        """How many requests may wait while ``slots`` are busy. Before an auto-sized model's
        first load, as many as its largest slot count allows: a cold burst is not refused
        because the plan is not made yet."""
        if self.plan is None and not isinstance(self.spec.slots, int):
            slots = self.spec.max_slots
        return self.spec.queue_limit(slots)

    @property
    def ctx_per_slot(self) -> int | None:
        if self.slot_ctx is not None:
            return self.slot_ctx
        if self.plan is not None:
            return self.plan.ctx_per_slot
        return self.spec.ctx_per_slot if isinstance(self.spec.ctx_per_slot, int) else None

    async def notice_exit(self, proc: ModelProcess, timeout: float) -> None:
        """Wait up to ``timeout`` until the model no longer serves ``proc``, which has exited:
        its watcher drains the child's output and marks the crash first, so a request that
        found the child dead acquires again only once that is done (then it waits for the
        restart instead of reaching the same dead child)."""
        deadline = time.monotonic() + timeout
        while self.process is proc and self.state.serving and time.monotonic() < deadline:
            await asyncio.sleep(0.01)

    def rss(self) -> int | None:
        """The serving child's resident memory in bytes (mapped weights it touched included)."""
        proc = self.process
        if self.state.serving and proc is not None and proc.pid is not None:
            with contextlib.suppress(psutil.Error):
                return int(psutil.Process(proc.pid).memory_info().rss)
        return None

    @property
    def bytes_downloaded(self) -> int:
        """Bytes its fetches downloaded over the network, all of them together."""
        current = self.fetch.progress if self.fetch is not None else None
        if current is not None:
            current.refresh()
        return self._downloaded_before + (current.downloaded if current else 0)

    @property
    def bytes_remaining(self) -> int:
        """What the download under way still has to fetch (0 when none runs)."""
        if self.state != ModelState.DOWNLOADING or self.fetch is None:
            return 0
        self.fetch.progress.refresh()
        return self.fetch.progress.remaining

    def describe(self) -> dict[str, Any]:
        """The model as ``/admin/models`` shows it."""
        proc = self.process if self.state in (ModelState.STARTING, ModelState.READY,
                                              ModelState.RETIRING, ModelState.STOPPING) else None
        return {
            "name": self.name,
            "aliases": list(self.spec.aliases),
            "state": str(self.state),
            "pid": proc.pid if proc else None,
            "socket": proc.socket if proc else None,
            "slots": self.slots,
            "ctx_per_slot": self.ctx_per_slot,
            "gpu_layers": self.plan.gpu_layers if self.plan else self.spec.gpu_layers,
            "tuning": tuning_of(self.spec.settings),
            "devices": list(self.plan.gpus) or ["cpu"] if self.plan else None,
            "memory": {**self.memory(), "rss": self.rss()},
            "in_flight": self.in_flight,
            "uptime_seconds": (round(time.time() - self.ready_at, 3)
                               if self.ready_at and self.state.serving else None),
            "ttl_seconds": self.spec.ttl,
            "idle_seconds": round(time.monotonic() - self.last_used, 3),
            "loads": self.loads,
            "last_error": self.last_error,
            "last_stop_reason": self.last_stop_reason,
            "recent_failures": self.restarts.recent,
            "given_up": self.state == ModelState.GIVEN_UP,
            "pinned": self.spec.pinned,
            "path": str(self.local_spec.path) if self.local_spec.path else None,
            "source": self.spec.source.ref if self.spec.source else None,
            "download": self.fetch.progress.describe() if self.fetch else None,
        }


@dataclass
class Lease:
    """Permission to send one request to a serving model; ``release()`` exactly once after."""

    model: ManagedModel
    process: ModelProcess
    client: httpx.AsyncClient
    touch: bool = True
    _released: bool = False

    def release(self) -> None:
        if not self._released:
            self._released = True
            self.model.in_flight -= 1
            if self.touch:
                self.model.last_used = time.monotonic()
            if not self.model.in_flight:
                self.model.host.capacity_changed()
