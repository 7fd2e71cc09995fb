"""The supervisor: one ``ManagedModel`` per configured model, loaded on demand, stopped when idle.

Usage::

    supervisor = Supervisor(config)
    await supervisor.start()                 # reaps leftovers, starts preloads and the idle reaper
    lease = await supervisor.acquire("smol") # loads if needed; concurrent callers share one load
    try:
        ... lease.client ...                 # pooled httpx client for that child
    finally:
        lease.release()
    await supervisor.shutdown()

Only the supervisor starts and stops processes; the proxy asks for leases.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import httpx
import structlog

from corral.config import Config, ModelSpec
from corral.errors import ModelLoadError, ModelNotFoundError, ModelUnavailableError
from corral.placement import LaunchPlan, plan_launch
from corral.supervisor.children import ChildRegistry, default_state_file
from corral.supervisor.events import SupervisorEvents
from corral.supervisor.process import LOG_TAIL_LINES, ModelProcess
from corral.supervisor.state import ModelState, check_transition

log = structlog.get_logger("corral.supervisor")

StopReason = Literal["idle", "memory", "manual", "shutdown", "crash"]
_MAX_RETRY_BACKOFF = 60.0


class ManagedModel:
    """One configured model and whatever child currently serves it."""

    def __init__(self, spec: ModelSpec) -> None:
        self.spec = spec
        self.state = ModelState.UNLOADED
        self.process: ModelProcess | None = None
        self.plan: LaunchPlan = plan_launch(spec)
        self.log_tail: deque[str] = deque(maxlen=LOG_TAIL_LINES)
        self.in_flight = 0
        self.last_used = time.monotonic()
        self.ready_at: float | None = None  # wall clock, for uptime
        self.last_error: str | None = None
        self.last_stop_reason: StopReason | None = None
        self.slot_ctx: int | None = None  # what the child reports per slot, not what was asked
        self.failures = 0
        self.retry_at = 0.0
        self.loads = 0
        self.transition: asyncio.Task[None] | None = None

    @property
    def name(self) -> str:
        return self.spec.name

    def set_state(self, new: ModelState) -> None:
        check_transition(self.state, new)
        log.info("model_state", model=self.name, state=str(new), previous=str(self.state),
                 pid=self.process.pid if self.process else None)
        self.state = new

    def describe(self) -> dict[str, Any]:
        """The model as ``/admin/models`` shows it."""
        proc = self.process if self.state in (ModelState.STARTING, ModelState.READY,
                                              ModelState.STOPPING) else None
        return {
            "name": self.name,
            "aliases": list(self.spec.aliases),
            "state": str(self.state),
            "pid": proc.pid if proc else None,
            "port": proc.port if proc else None,
            "slots": self.plan.slots,
            "ctx_per_slot": self.slot_ctx or self.plan.ctx_per_slot,
            "gpu_layers": self.plan.gpu_layers,
            "in_flight": self.in_flight,
            "uptime_seconds": (round(time.time() - self.ready_at, 3)
                               if self.ready_at and self.state == ModelState.READY else None),
            "ttl_seconds": self.spec.ttl,
            "idle_seconds": round(time.monotonic() - self.last_used, 3),
            "loads": self.loads,
            "last_error": self.last_error,
            "last_stop_reason": self.last_stop_reason,
            "path": str(self.spec.path),
        }


@dataclass
class Lease:
    """Permission to send one request to a ready model; ``release()`` exactly once after it."""

    model: ManagedModel
    client: httpx.AsyncClient
    _released: bool = False

    def release(self) -> None:
        if not self._released:
            self._released = True
            self.model.in_flight -= 1
            self.model.last_used = time.monotonic()


class Supervisor:
    """Starts, watches and stops the llama-server children of every configured model."""

    def __init__(
        self,
        config: Config,
        *,
        events: SupervisorEvents | None = None,
        reap_interval: float = 1.0,
    ) -> None:
        self.config = config
        self.events = events or SupervisorEvents()
        self.settings = config.file.llama_server
        self.models = {name: ManagedModel(spec) for name, spec in config.models.items()}
        state_file = config.file.state_file
        self.registry = ChildRegistry(
            Path(state_file) if state_file else default_state_file(config.file.listen.port)
        )
        self._reap_interval = reap_interval
        self._tasks: set[asyncio.Task[Any]] = set()
        self._closing = False

    def get(self, name: str) -> ManagedModel:
        """The model called ``name`` or one of its aliases; ``ModelNotFoundError`` otherwise."""
        spec = self.config.resolve(name)
        if spec is None:
            raise ModelNotFoundError(name, self.config.model_names())
        return self.models[spec.name]

    async def start(self) -> None:
        self.registry.reap_leftovers()
        self._spawn(self._reap_idle())
        for model in self.models.values():
            if model.spec.preload:
                self._spawn(self._preload(model))

    async def acquire(self, name: str) -> Lease:
        """A lease on a ready ``name``, loading it first if needed.

        Raises ``ModelNotFoundError``, ``ModelLoadError`` or ``ModelUnavailableError``.
        """
        model = self.get(name)
        while True:
            if self._closing:
                raise ModelUnavailableError(model.name, "corral is shutting down", 5.0)
            if model.state == ModelState.READY:
                assert model.process is not None and model.process.client is not None
                model.in_flight += 1
                model.last_used = time.monotonic()
                return Lease(model, model.process.client)
            if model.state in (ModelState.STARTING, ModelState.STOPPING):
                assert model.transition is not None
                # Shielded: a caller that gives up must not cancel a load others wait for.
                await asyncio.shield(model.transition)
                continue
            if model.state == ModelState.FAILED and time.monotonic() < model.retry_at:
                raise ModelLoadError(
                    model.name,
                    model.last_error or "load failed",
                    retry_after=max(1.0, model.retry_at - time.monotonic()),
                )
            self._begin_load(model)

    async def load(self, name: str) -> ManagedModel:
        """Load ``name`` now (admin): clears a failed state and its back-off."""
        model = self.get(name)
        if model.state == ModelState.FAILED:
            model.retry_at = 0.0
            model.failures = 0
        lease = await self.acquire(name)
        lease.release()
        return model

    async def unload(self, name: str, reason: StopReason = "manual") -> ManagedModel:
        """Stop ``name``'s child once its in-flight requests are done (bounded)."""
        model = self.get(name)
        while model.state in (ModelState.STARTING, ModelState.STOPPING):
            assert model.transition is not None
            with contextlib.suppress(ModelLoadError):
                await asyncio.shield(model.transition)
        if model.state in (ModelState.READY, ModelState.FAILED):
            self._begin_stop(model, reason)
            assert model.transition is not None
            await asyncio.shield(model.transition)
        return model

    async def shutdown(self) -> None:
        """Stop every child, each step bounded by the stop and drain timeouts.

        1. refuse new leases; 2. stop the reaper, preloads and crash watchers; 3. abandon loads
        in progress (each stops its own half-started child); 4. stop every remaining child.
        """
        self._closing = True
        background = [t for t in self._tasks if t not in self._transitions()]
        for task in background:
            task.cancel()
        await asyncio.gather(*background, return_exceptions=True)
        loading = [m.transition for m in self.models.values()
                   if m.state == ModelState.STARTING and m.transition is not None]
        for task in loading:
            task.cancel()
        await asyncio.gather(*loading, return_exceptions=True)
        for model in self.models.values():
            if model.state in (ModelState.READY, ModelState.FAILED):
                self._begin_stop(model, "shutdown")
        await asyncio.gather(*self._transitions(), return_exceptions=True)

    def _transitions(self) -> list[asyncio.Task[None]]:
        return [m.transition for m in self.models.values()
                if m.transition is not None and not m.transition.done()]

    # -- transitions: each runs as the model's single `transition` task ----------------------

    def _begin_load(self, model: ManagedModel) -> None:
        model.set_state(ModelState.STARTING)
        model.transition = self._spawn(self._load(model))

    def _begin_stop(self, model: ManagedModel, reason: StopReason) -> None:
        model.set_state(ModelState.STOPPING)
        model.transition = self._spawn(self._stop(model, reason))

    async def _load(self, model: ManagedModel) -> None:
        model.loads += 1
        restart = model.last_stop_reason == "crash"
        model.plan = plan_launch(model.spec)
        proc = ModelProcess(model.spec, model.plan, self.settings, model.log_tail)
        model.process = proc
        started = time.monotonic()
        try:
            await proc.start()
            if proc.pid is not None:
                self.registry.add(proc.pid, model.name)
            await proc.wait_ready(self.settings.startup_timeout)
            model.slot_ctx = await _slot_context(proc)
        except ModelLoadError as exc:
            await self._after_exit(proc)
            self.events.load_finished(model.name, False, time.monotonic() - started, restart)
            self._fail(model, exc.reason)
            exc.retry_after = max(1.0, model.retry_at - time.monotonic())
            log.error("model_load_failed", model=model.name, reason=exc.reason,
                      last_lines=exc.log_tail)
            raise
        except BaseException:
            # Cancelled (shutdown) or a bug: never leave a half-started child behind.
            await proc.stop(self.settings.stop_timeout)
            await self._after_exit(proc)
            if model.state == ModelState.STARTING:
                self._fail(model, "load interrupted")
            raise
        if model.state != ModelState.STARTING:
            return
        model.set_state(ModelState.READY)
        model.ready_at = time.time()
        model.last_used = time.monotonic()
        model.failures = 0
        model.last_error = None
        self.events.load_finished(model.name, True, time.monotonic() - started, restart)
        log.info("model_ready", model=model.name, pid=proc.pid, port=proc.port,
                 seconds=round(time.monotonic() - started, 3), slots=model.plan.slots,
                 ctx_per_slot=model.slot_ctx)
        self._spawn(self._watch(model, proc))

    async def _stop(self, model: ManagedModel, reason: StopReason) -> None:
        proc = model.process
        drain_until = time.monotonic() + self.config.file.shutdown_timeout
        while model.in_flight > 0 and time.monotonic() < drain_until:
            await asyncio.sleep(0.05)
        if proc is not None:
            if proc.returncode is None:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(self.events.child_stopping(model.name, proc), 2.0)
            code = await proc.stop(self.settings.stop_timeout)
            await self._after_exit(proc)
            log.info("model_stopped", model=model.name, pid=proc.pid, reason=reason,
                     exit_code=code)
        model.last_stop_reason = reason
        model.ready_at = None
        model.set_state(ModelState.UNLOADED)
        self.events.stopped(model.name, reason)

    async def _watch(self, model: ManagedModel, proc: ModelProcess) -> None:
        """Notice a child that exits on its own while it should be serving."""
        code = await proc.wait()
        if model.process is proc and model.state == ModelState.READY:
            await self._after_exit(proc)
            log.error("child_exited", model=model.name, pid=proc.pid, exit_code=code,
                      last_lines=proc.error_lines())
            model.last_stop_reason = "crash"
            self._fail(model, f"llama-server exited unexpectedly with code {code}")
            self.events.stopped(model.name, "crash")

    def _fail(self, model: ManagedModel, reason: str) -> None:
        model.failures += 1
        model.last_error = reason
        model.ready_at = None
        backoff = min(_MAX_RETRY_BACKOFF, 2.0 ** (model.failures - 1))
        model.retry_at = time.monotonic() + backoff
        if model.state != ModelState.FAILED:
            model.set_state(ModelState.FAILED)

    async def _after_exit(self, proc: ModelProcess) -> None:
        await proc.close()
        if proc.pid is not None:
            self.registry.remove(proc.pid)

    async def _preload(self, model: ManagedModel) -> None:
        with contextlib.suppress(ModelLoadError, ModelUnavailableError):
            await self.load(model.name)

    async def _reap_idle(self) -> None:
        while True:
            await asyncio.sleep(self._reap_interval)
            now = time.monotonic()
            for model in self.models.values():
                ttl = model.spec.ttl
                if (model.state == ModelState.READY and ttl > 0 and model.in_flight == 0
                        and now - model.last_used >= ttl):
                    log.info("model_idle", model=model.name, idle_seconds=round(
                        now - model.last_used, 1), ttl=ttl)
                    self._begin_stop(model, "idle")

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and (exc := task.exception()) is not None:
            if not isinstance(exc, ModelLoadError):
                log.error("supervisor_task_failed", error=repr(exc))


async def _slot_context(proc: ModelProcess) -> int | None:
    """The context each slot really has, as the child reports it (it pads to 256)."""
    assert proc.client is not None
    with contextlib.suppress(httpx.HTTPError, ValueError, KeyError, IndexError, TypeError):
        response = await proc.client.get("/slots", timeout=5.0)
        slots = response.json()
        return int(slots[0]["n_ctx"])
    return None
