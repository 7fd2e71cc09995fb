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
from collections.abc import Callable, Coroutine
from functools import partial
from pathlib import Path
from typing import Any, Literal

import httpx
import structlog

from corral.config import Config, ModelSpec
from corral.errors import (
    ModelLoadError,
    ModelNotFoundError,
    ModelUnavailableError,
    ShuttingDownError,
)
from corral.probe.devices import process_gpu_memory
from corral.probe.usage import parse_buffer_sizes
from corral.supervisor.children import ChildRegistry, default_state_file
from corral.supervisor.events import SupervisorEvents
from corral.supervisor.model import Lease, ManagedModel, StopReason
from corral.supervisor.placing import Candidate, make_ledger, place
from corral.supervisor.process import ERROR_TAIL_LINES, ModelProcess
from corral.supervisor.restarts import RestartPolicy
from corral.supervisor.state import ModelState

log = structlog.get_logger("corral.supervisor")

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
        # Every variable that ever held an API key: one a reload stopped naming still holds a
        # key in corral's environment, and children started later must not inherit it.
        self.secret_env: set[str] = set(config.secret_env)
        self.events = events or SupervisorEvents()
        self.settings = config.file.llama_server
        self.models = {name: self._managed(spec) for name, spec in config.models.items()}
        # How many requests wait for a model (the proxy's queues); a crashed model that is
        # still wanted is restarted at once instead of on the next request.
        self.demand: Callable[[str], int] = lambda name: 0
        # Requests the proxy holds for a model, from entering its queue until their answer is
        # done: a removed model serves them all before it stops.
        self.holding: Callable[[str], int] = lambda name: 0
        self.on_ready: Callable[[str], None] = lambda name: None  # the proxy wakes its queue
        # A removed model stopped serving: the proxy refuses whoever still waits for it.
        self.on_retired: Callable[[str], None] = lambda name: None
        self.ledger = make_ledger(config)
        state_file = config.file.state_file
        self.registry = ChildRegistry(
            Path(state_file) if state_file else default_state_file(config.file.listen.port)
        )
        self._reap_interval = reap_interval
        self._tasks: set[asyncio.Task[Any]] = set()
        self._closing = False
        self._closing_at: float | None = None  # when shutdown() began
        self._refusing = asyncio.Event()  # set by refuse_waiting() at the drain deadline

    def _managed(self, spec: ModelSpec) -> ManagedModel:
        restart = self.config.file.restart
        return ManagedModel(spec, RestartPolicy(restart.max_failures, restart.window))

    def get(self, name: str) -> ManagedModel:
        """The model called ``name`` or one of its aliases; ``ModelNotFoundError`` otherwise."""
        spec = self.config.resolve(name)
        if spec is None:
            raise ModelNotFoundError(name, self.config.model_names())
        return self.models[spec.name]

    async def start(self) -> None:
        self.registry.reap_leftovers()
        self._spawn(self._reap_idle())
        self._spawn(self._preload_in_order(
            [m for m in self.models.values() if m.spec.preload]))

    async def _preload_in_order(self, models: list[ManagedModel]) -> None:
        # One after another, in the config's order, as `corral plan` places them: with
        # `slots`/`ctx_per_slot: auto` the first to reserve takes what it can, so loading them
        # all at once would make the outcome depend on which file happened to be read first.
        for model in models:
            await self._preload(model)

    async def acquire(self, name: str | ManagedModel, touch: bool = True) -> Lease:
        """A lease on a ready model (a name, alias, or the model), loading it first if needed.

        ``touch=False`` is for monitoring reads: they must not keep a model from going idle.

        Raises ``ModelNotFoundError``, ``ModelLoadError`` or ``ModelUnavailableError``.
        """
        model = name if isinstance(name, ManagedModel) else self.get(name)
        while True:
            if self._closing:
                raise ModelUnavailableError(model.name, "corral is shutting down", 5.0)
            if model.retired:
                # A request that waited across the reload that removed the model: it must
                # not start a child nobody would ever stop.
                raise ModelUnavailableError.removed(model.name)
            if model.state == ModelState.READY:
                assert model.process is not None and model.process.client is not None
                model.in_flight += 1
                if touch:
                    model.last_used = time.monotonic()
                return Lease(model, model.process, model.process.client, touch)
            if model.state == ModelState.STOPPING:
                assert model.transition is not None
                # A stop for a reload waits for long requests to finish (up to
                # generation_timeout): a request arriving meanwhile waits at most its queue
                # timeout, then hears when to come back.
                if not await self._await_transition(model.transition, model.spec.queue_timeout):
                    raise ModelUnavailableError(
                        model.name, "it is restarting once its requests in flight finish",
                        5.0)
                continue
            if model.state == ModelState.STARTING:
                assert model.transition is not None
                await self._await_transition(model.transition, None)
                continue
            if model.state == ModelState.FAILED:
                await self._retry_failed(model)
                continue
            self._begin_load(model)

    async def _await_transition(
        self, transition: asyncio.Task[None], timeout: float | None
    ) -> bool:
        """Wait for a load or stop others may wait for too (never cancelled from here), up to
        ``timeout``; False if it ran out. Its own error, if any, is raised here. Raises
        ``ShuttingDownError`` once ``refuse_waiting`` is called."""
        refused = asyncio.ensure_future(self._refusing.wait())
        try:
            await asyncio.wait({transition, refused}, timeout=timeout,
                               return_when=asyncio.FIRST_COMPLETED)
        finally:
            refused.cancel()
        if self._refusing.is_set():
            raise ShuttingDownError("corral is shutting down")
        if not transition.done():
            return False
        transition.result()
        return True

    def refuse_waiting(self) -> None:
        """End every wait for a model to load or stop with ``ShuttingDownError`` (503): corral
        exits before they would end."""
        self._refusing.set()

    async def _retry_failed(self, model: ManagedModel) -> None:
        """A request for a failed model: wait for its restart, start one, or refuse (503)."""
        if model.restarts.given_up:
            raise ModelLoadError(
                model.name,
                f"{model.last_error}; gave up after {model.restarts.recent} failures "
                f"(POST /admin/models/{model.name}/load to try again)",
                model.log_tail and list(model.log_tail)[-ERROR_TAIL_LINES:],
                retry_after=60.0,
            )
        if model.restart_task is None and model.last_failure == "crash":
            # The child served before it died: worth waiting for, not failing the request.
            self._schedule_restart(model)
        if model.restart_task is not None:
            # wait(), not shield(): an admin load may cancel the restart; this request then
            # simply looks at the model again.
            await asyncio.wait({model.restart_task})
            return
        if time.monotonic() < model.retry_at:
            raise ModelLoadError(
                model.name,
                model.last_error or "load failed",
                retry_after=max(1.0, model.retry_at - time.monotonic()),
            )
        self._begin_load(model)

    async def load(self, name: str) -> ManagedModel:
        """Load ``name`` now (admin): clears a failed state, its back-off and give-up."""
        model = self.get(name)
        if model.state == ModelState.FAILED:
            model.restarts.clear()
            model.retry_at = 0.0
            model.last_failure = None
            if model.restart_task is not None:
                model.restart_task.cancel()
                model.restart_task = None
        lease = await self.acquire(name)
        lease.release()
        return model

    async def unload(self, name: str, reason: StopReason = "manual") -> ManagedModel:
        """Stop ``name``'s child once its in-flight requests are done (bounded: ``_drain``)."""
        return await self._unload(self.get(name), reason)

    async def _unload(self, model: ManagedModel, reason: StopReason) -> ManagedModel:
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
        self._closing_at = time.monotonic()
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

    def reconfigure(self, config: Config) -> dict[str, list[str]]:
        """Apply a new, already validated configuration without dropping a request.

        Unchanged models are not touched. Changed ones drain and restart with their new
        settings (only if they were loaded or preload). Removed ones stop once nothing waits
        for them; new ones become available. A removed model that comes back before it was
        stopped and forgotten is added back as it is (restarted only if its settings changed).
        """
        old = self.config
        shared_changed = (old.file.llama_server != config.file.llama_server
                          or old.file.upstream != config.file.upstream)
        added = [n for n in config.models if n not in self.models or self.models[n].removed]
        removed = [n for n in self.models
                   if n not in config.models and not self.models[n].removed]
        changed = [n for n in config.models if n in self.models and n not in added
                   and (shared_changed or self.models[n].spec != config.models[n])]
        self.config = config
        self.secret_env |= config.secret_env
        self.settings = config.file.llama_server
        for name in added:
            model = self.models.get(name)
            if model is None:
                model = self.models[name] = self._managed(config.models[name])
                if model.spec.preload:
                    self._spawn(self._preload(model))
                continue
            # Still being retired: keep the object (its child, memory and requests are its
            # own, under this name) and call the retire off.
            model.removed = model.retired = False
            if shared_changed or model.spec != config.models[name]:
                model.spec = config.models[name]
                self._spawn(self._restart_for_reload(model))
            elif model.spec.preload:
                self._spawn(self._preload(model))
        restart = config.file.restart
        for model in self.models.values():
            # Every model, changed or not: the give-up rule is corral's, not the child's.
            model.restarts.max_failures, model.restarts.window = (restart.max_failures,
                                                                  restart.window)
        for name in changed:
            model = self.models[name]
            model.spec = config.models[name]
            self._spawn(self._restart_for_reload(model))
        bound = config.file.upstream.generation_timeout
        for name in removed:
            model = self.models[name]
            model.removed = True
            # Each removal bounds its own wait; the retire and the stop that follows share it.
            model.retire_deadline = time.monotonic() + bound if bound else None
            # Removed, put back and removed again while the first retire still runs: that one
            # carries on (it sees the new removal), rather than two racing to delete it.
            if model.retire_task is None or model.retire_task.done():
                model.retire_task = self._spawn(self._retire(model))
        return {"added": added, "changed": changed, "removed": removed}

    async def _restart_for_reload(self, model: ManagedModel) -> None:
        wanted = model.state in (ModelState.STARTING, ModelState.READY) or model.spec.preload
        await self._unload(model, "reload")
        # Removed by a later reload meanwhile: its retire stops it; loading it again would
        # start (and maybe evict for) a child nobody wants.
        if wanted and not self._closing and not model.removed:
            with contextlib.suppress(ModelLoadError, ModelUnavailableError):
                (await self.acquire(model)).release()

    async def _retire(self, model: ManagedModel) -> None:
        """A model removed from the config: serve what waits for it, then stop and forget it.

        Nothing new reaches it (its name no longer resolves), so what it serves are the
        requests already queued or in flight, each bounded by its own timeouts; the wait as a
        whole is bounded by ``upstream.generation_timeout`` (0: none) from the removal. Then it
        is retired: no child starts for it again, and whoever still waits gets 503.

        Each step first checks that the model is still removed: a reload may bring it back
        (and another remove it again, which this same task then serves).
        """
        while model.removed:
            if not model.retired:
                deadline = model.retire_deadline  # set afresh by each removal
                if ((model.in_flight or self.holding(model.name))
                        and (deadline is None or time.monotonic() < deadline)):
                    await asyncio.sleep(0.05)
                    continue
                model.retired = True
                if model.restart_task is not None:
                    model.restart_task.cancel()  # its waiters look again and see it retired
                self.on_retired(model.name)
            if model.state in (ModelState.STARTING, ModelState.STOPPING):
                assert model.transition is not None
                with contextlib.suppress(ModelLoadError):
                    await asyncio.shield(model.transition)
            elif model.state in (ModelState.READY, ModelState.FAILED):
                self._begin_stop(model, "removed")
            else:
                if self.models.get(model.name) is model:
                    del self.models[model.name]
                    self.on_retired(model.name)  # gone for good: the proxy can forget it too
                return
        # Brought back while it stopped: it stays, unloaded, and loads on demand again.

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
        started = time.monotonic()
        proc: ModelProcess | None = None
        try:
            model.plan = await place(model.spec, self.config, self.ledger,
                                     partial(self._eviction_candidates, model), self._evict,
                                     wait=model.spec.queue_timeout)
            proc = ModelProcess(model.spec, model.plan.args, model.plan.env, self.settings,
                                model.log_tail, upstream=self.config.file.upstream,
                                secret_env=self.secret_env)
            model.process = proc
            await proc.start()
            if proc.pid is not None:
                self.registry.add(proc.pid, model.name)
            await proc.wait_ready(self.settings.startup_timeout)
            model.slot_ctx = await _slot_context(proc)
        except ModelLoadError as exc:
            await self._after_exit(model, proc)
            self.events.load_finished(model.name, False, time.monotonic() - started, restart)
            self._fail(model, exc.reason, "load")
            exc.retry_after = max(exc.retry_after, model.retry_at - time.monotonic())
            log.error("model_load_failed", model=model.name, reason=exc.reason,
                      last_lines=exc.log_tail)
            raise
        except BaseException:
            # Cancelled (shutdown) or a bug: never leave a half-started child behind.
            if proc is not None:
                await proc.stop(self.settings.stop_timeout)
            await self._after_exit(model, proc)
            if model.state == ModelState.STARTING:
                self._fail(model, "load interrupted", "load")
            raise
        if model.state != ModelState.STARTING:
            return
        model.set_state(ModelState.READY)
        model.ready_at = time.time()
        model.last_used = time.monotonic()
        model.last_error = None
        model.last_failure = None
        self._check_memory(model)
        self.events.load_finished(model.name, True, time.monotonic() - started, restart)
        log.info("model_ready", model=model.name, pid=proc.pid, port=proc.port,
                 seconds=round(time.monotonic() - started, 3), slots=model.plan.slots,
                 ctx_per_slot=model.slot_ctx, gpu_layers=model.plan.gpu_layers,
                 devices=list(model.plan.gpus) or ["cpu"])
        self.on_ready(model.name)
        self._spawn(self._watch(model, proc))

    def _check_memory(self, model: ManagedModel) -> None:
        """Compare what the child says it allocated with the estimate it was placed by."""
        assert model.plan is not None and model.process is not None
        model.reported = parse_buffer_sizes(model.process.ready_lines, model.plan.gpus)
        model.gpu_used = {}
        if model.plan.gpus and model.process.pid is not None:
            # NVML's view includes what no buffer line reports (CUDA context, cuBLAS).
            model.gpu_used = process_gpu_memory(model.process.pid)
        for device, estimated in model.plan.reservation.items():
            actual = model.memory()["actual"].get(device, 0)
            if actual > estimated * 1.1:
                log.warning("memory_above_estimate", model=model.name, device=device,
                            estimated=estimated, actual=actual)

    def _eviction_candidates(self, loading: ManagedModel) -> list[Candidate]:
        return [
            Candidate(m.name, m.last_used, pinned=m.spec.pinned,
                      busy=(m.in_flight > 0 or self.demand(m.name) > 0
                            or m.state not in (ModelState.READY, ModelState.FAILED)))
            for m in self.models.values()
            if m is not loading and self.ledger.holdings(m.name)
        ]

    async def _evict(self, name: str) -> None:
        await self._unload(self.models[name], "memory")

    async def _stop(self, model: ManagedModel, reason: StopReason) -> None:
        proc = model.process
        await self._drain(model, reason)
        if proc is not None:
            if proc.returncode is None:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(self.events.child_stopping(model.name, proc), 2.0)
            code = await proc.stop(self.settings.stop_timeout)
            await self._after_exit(model, proc)
            log.info("model_stopped", model=model.name, pid=proc.pid, reason=reason,
                     exit_code=code)
        model.last_stop_reason = reason
        model.ready_at = None
        model.set_state(ModelState.UNLOADED)
        self.events.stopped(model.name, reason)

    async def _drain(self, model: ManagedModel, reason: StopReason) -> None:
        """Wait for the model's in-flight requests to finish, as long as ``reason`` allows.

        A reload drops no request: its stops (``reload``, ``removed``) wait as long as an answer
        may take, ``upstream.generation_timeout`` (0: no bound). The others wait up to
        ``shutdown_timeout``. A retired model's stop ends at its removal's deadline, which the
        retire's own wait shares. Once corral shuts down, no wait outlasts ``shutdown_timeout``.
        """
        settings = self.config.file
        bound: float | None = settings.shutdown_timeout
        if reason in ("reload", "removed"):
            bound = settings.upstream.generation_timeout or None
        began = time.monotonic()
        while model.in_flight > 0:
            now = time.monotonic()
            if bound is not None and now - began >= bound:
                break
            if (model.retired and model.retire_deadline is not None
                    and now >= model.retire_deadline):
                break  # removed: the removal's bound holds for this stop too
            if (self._closing_at is not None
                    and now - self._closing_at >= settings.shutdown_timeout):
                break
            await asyncio.sleep(0.05)

    async def _watch(self, model: ManagedModel, proc: ModelProcess) -> None:
        """Probe a ready child's ``/health``; notice when it exits or stops answering."""
        misses = 0
        hung = False
        while not hung:
            # Read at each probe, so a reload applies to running children from the next one.
            health = self.config.file.health
            if await proc.exited_within(health.interval):
                break
            if model.process is not proc or model.state != ModelState.READY:
                return  # being stopped on purpose: the stop takes care of it
            if await proc.healthy(timeout=min(health.interval, 5.0)):
                misses = 0
                continue
            misses += 1
            log.warning("child_health_missed", model=model.name, pid=proc.pid, misses=misses)
            if misses >= health.failures:
                log.error("child_hung", model=model.name, pid=proc.pid, misses=misses)
                await proc.kill()
                hung = True
        code = await proc.wait()
        if model.process is proc and model.state == ModelState.READY:
            await self._after_exit(model, proc)
            reason = (f"llama-server stopped answering its health checks ({misses} missed) "
                      "and was killed" if hung
                      else f"llama-server exited unexpectedly with code {code}")
            log.error("child_exited", model=model.name, pid=proc.pid, exit_code=code,
                      last_lines=proc.error_lines())
            model.last_stop_reason = "crash"
            self._fail(model, reason, "crash")
            self.events.stopped(model.name, "crash")

    def _fail(self, model: ManagedModel, reason: str, kind: Literal["load", "crash"]) -> None:
        now = time.monotonic()
        model.last_error = reason
        model.last_failure = kind
        model.ready_at = None
        model.retry_at = now + model.restarts.record(now)
        if model.state != ModelState.FAILED:
            model.set_state(ModelState.FAILED)
        if model.restarts.given_up:
            log.error("model_given_up", model=model.name, failures=model.restarts.recent,
                      reason=reason)
        elif (model.spec.pinned or model.spec.preload
              or (kind == "crash" and self.demand(model.name) > 0)):
            # After a failed load, the requests that waited get its error; only models that
            # must be up retry by themselves. After a crash, queued requests want it back.
            self._schedule_restart(model)

    def _schedule_restart(self, model: ManagedModel) -> None:
        if model.restart_task is None and not self._closing and not model.retired:
            model.restart_task = self._spawn(self._restart_after_backoff(model))

    async def _restart_after_backoff(self, model: ManagedModel) -> None:
        try:
            delay = max(0.0, model.retry_at - time.monotonic())
            log.info("model_restart_scheduled", model=model.name, seconds=round(delay, 2))
            await asyncio.sleep(delay)
        finally:
            model.restart_task = None
        if (model.state == ModelState.FAILED and not model.restarts.given_up
                and not self._closing and not model.retired):
            self._begin_load(model)

    async def _after_exit(self, model: ManagedModel, proc: ModelProcess | None) -> None:
        """A child is gone (or never started): close its client, forget it, free its memory."""
        if proc is not None:
            await proc.close()
            if proc.pid is not None:
                self.registry.remove(proc.pid)
        self.ledger.release(model.name)

    async def _preload(self, model: ManagedModel) -> None:
        if model.removed:
            return  # added, then removed by the next reload before this ran
        with contextlib.suppress(ModelLoadError, ModelUnavailableError, ModelNotFoundError):
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
