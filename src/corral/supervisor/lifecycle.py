"""A model's life: its state and the transitions that change it.

``ModelLifecycle`` holds a model's state and runs its transitions: the load (placement, the
child's start and readiness), the stop after a drain, the health watch of a ready child, a
failure's back-off and restart, a fetch of its files, and its retirement after a reload removed
it. It alone writes the state (``_enter``) and it alone starts a child (``_begin_load``, allowed
by the state machine only from ``unloaded``, ``failed``, ``crashed`` and ``given_up``), so no
path can start a retired model. ``ManagedModel`` (``corral.supervisor.model``) builds on it
what requests and the supervisor ask of a model.

What it needs from around it (placement against the shared ledger and eviction of other
models, the state file, the observers, the proxy's demand) comes from its ``ModelHost``: the
supervisor, a registry of these objects.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections import deque
from collections.abc import Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

import httpx
import structlog

from corral.config import Config, ModelSpec
from corral.errors import (
    DownloadError,
    ModelLoadError,
)
from corral.llamacpp.command import child_command
from corral.placement import PlacementPlan
from corral.probe.devices import process_gpu_memory
from corral.probe.host import child_socket, resolve_binary
from corral.probe.usage import ReportedMemory, parse_buffer_sizes
from corral.sources.download import Fetch, LocalFiles
from corral.supervisor.children import ChildRegistry
from corral.supervisor.events import Demand, SupervisorEvents
from corral.supervisor.process import LOG_TAIL_LINES, ModelProcess
from corral.supervisor.restarts import RestartPolicy
from corral.supervisor.state import ModelState, check_transition

log = structlog.get_logger("corral.supervisor")

StopReason = Literal["idle", "memory", "manual", "shutdown", "crash", "reload", "removed"]
_POLL = 0.05
_PROGRESS_LOG = 10.0  # seconds between two log lines of a download's progress

# An observer's last look at a stopping child (its final token counts) is bounded by this.
_FINAL_READ_CAP = 6.0


class ModelHost(Protocol):
    """What a model uses of the supervisor around it."""

    config: Config
    secret_env: set[str]
    observers: SupervisorEvents
    demand: Demand
    registry: ChildRegistry
    socket_dir: Path
    closing_at: float | None  # when shutdown began
    refusing: asyncio.Event  # set at the drain's deadline: every wait ends with a 503

    async def place(self, model: ModelLifecycle) -> PlacementPlan: ...

    def release_memory(self, model: str) -> None: ...

    def capacity_changed(self) -> None:
        """A model may have become evictable (idle, ready, stopped): wake waiting loads."""

    def spawn(self, coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]: ...

    def forget(self, model: ModelLifecycle) -> None: ...


@dataclass(frozen=True)
class _Removal:
    deadline: float | None  # monotonic; None: no bound (generation_timeout 0)


class ModelLifecycle:
    """A model's state, its child, and the transitions between them."""

    def __init__(self, spec: ModelSpec, host: ModelHost) -> None:
        self.spec = spec
        self.host = host
        self.state = ModelState.UNLOADED
        self.process: ModelProcess | None = None
        self.plan: PlacementPlan | None = None  # decided at each load
        self.reported: ReportedMemory | None = None  # what the child said it allocated
        self.gpu_used: dict[str, int] = {}  # NVML's per-process view, where it has one
        self.log_tail: deque[str] = deque(maxlen=LOG_TAIL_LINES)
        self.in_flight = 0
        self.last_used = time.monotonic()
        self.ready_at: float | None = None  # wall clock, for uptime
        self.last_error: str | None = None
        self.last_stop_reason: StopReason | None = None
        self.slot_ctx: int | None = None  # what the child reports per slot, not what was asked
        self.load_seconds = 0.0  # how long its last successful load took
        # How long it may stay idle, as an Ollama client's keep_alive asked (inf: for ever,
        # 0: stop once idle); None: its configured ttl. Forgotten when it stops.
        self.keep_alive: float | None = None
        self._keep_asked_at = -math.inf  # when the request that set keep_alive arrived
        restart = host.config.file.restart
        self.restarts = RestartPolicy(restart.max_failures, restart.window)
        self.retry_at = 0.0
        self.loads = 0
        self._transition: asyncio.Task[None] | None = None  # the load or stop under way
        self._restart: asyncio.Task[None] | None = None  # a restart after its back-off
        self._watch: asyncio.Task[None] | None = None  # the ready child's health watch
        self._reload: asyncio.Task[None] | None = None  # a restart with reloaded settings
        self._retire: asyncio.Task[None] | None = None  # serving what waits, once removed
        self._removal: _Removal | None = None  # removed by a reload, not yet retired
        self.files: LocalFiles | None = None  # hf:/ollama: models: their verified files
        self.fetch: Fetch | None = None  # the last (or current) fetch of them
        self._downloaded_before = 0  # bytes the fetches before the last one downloaded

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def local_spec(self) -> ModelSpec:
        """Its spec with the model file (and a projector found beside it) on disk: the spec
        itself for a ``path:`` model, else with the fetched files once there are some."""
        if self.spec.source is None or self.files is None:
            return self.spec
        args = self.spec.args
        if self.files.projector is not None and self.spec.projector is None:
            args = (*args, "--mmproj", str(self.files.projector))
        return self.spec.model_copy(update={"path": self.files.model, "args": args})

    @property
    def needs_files(self) -> bool:
        """Named by a source whose files are not fetched and verified yet."""
        return self.spec.source is not None and self.files is None

    @property
    def removing(self) -> bool:
        """Removed by a reload and not retired yet (a reload may still put it back)."""
        return self._removal is not None

    # -- a reload's removal ----------------------------------------------------------------------

    def remove(self, deadline: float | None) -> None:
        """A reload removed it: no new request reaches it (its name no longer resolves); its
        child serves what is queued or in flight until ``deadline``, then it is retired."""
        self._removal = _Removal(deadline)  # a second removal sets its own deadline
        if self.state == ModelState.READY:
            self._enter(ModelState.RETIRING)
            self._retire = self.host.spawn(self._serve_then_stop())
        elif self.state in (ModelState.UNLOADED, ModelState.FAILED, ModelState.CRASHED,
                            ModelState.GIVEN_UP):
            self._retire_now()
        # starting, stopping: the transition's end sees the removal; retiring: the running
        # retire reads the new deadline.

    async def _serve_then_stop(self) -> None:
        while self.state == ModelState.RETIRING and self._removal is not None:
            deadline = self._removal.deadline
            waiting = self.in_flight or self.host.demand.holding(self.name)
            if waiting and (deadline is None or time.monotonic() < deadline):
                await asyncio.sleep(_POLL)
                continue
            self.host.observers.model_retired(self.name)  # refused now, not after the stop
            self._begin_stop("removed")
            return

    # -- transitions --------------------------------------------------------------------------

    def _enter(self, new: ModelState) -> None:
        check_transition(self.state, new)
        log.info("model_state", model=self.name, state=str(new), previous=str(self.state),
                 pid=self.process.pid if self.process else None)
        self.state = new
        if new in (ModelState.READY, ModelState.UNLOADED):
            self.host.capacity_changed()

    def _begin_load(self) -> None:
        self._enter(ModelState.STARTING)  # refused from ready, retiring, retired, ...
        self._transition = self.host.spawn(self._load())

    def _begin_next(self) -> None:
        """Fetch its files if it needs them, else load it."""
        if self.needs_files:
            self._begin_download()
        else:
            self._begin_load()

    def _begin_download(self) -> None:
        self._enter(ModelState.DOWNLOADING)
        if self.fetch is not None:
            self._downloaded_before += self.fetch.progress.downloaded
        self.fetch = Fetch.start(self.spec, allow_download=self.spec.download != "manual")
        self._transition = self.host.spawn(self._download(self.fetch))

    async def _download(self, fetch: Fetch) -> None:
        try:
            files = await self._follow(fetch)
        except DownloadError as exc:
            reason = f"download failed: {exc.reason}"
            self._fail(reason, "load")
            raise ModelLoadError(self.name, reason, retry_after=max(
                exc.retry_after, self.retry_at - time.monotonic())) from None
        except BaseException:
            # Cancelled (shutdown): the partial file stays, and the next fetch resumes it.
            log.warning("download_interrupted", model=self.name, **fetch.progress.describe())
            if self.state == ModelState.DOWNLOADING:
                self._fail("download interrupted", "load")
            raise
        if (fetch.spec.source, fetch.spec.download_dir) == (self.spec.source,
                                                            self.spec.download_dir):
            self.files = files
        self.last_error = None
        self._idle_or_retired()

    async def _follow(self, fetch: Fetch) -> LocalFiles:
        """``fetch``'s files, logging its progress every ``_PROGRESS_LOG`` seconds."""
        result = asyncio.ensure_future(fetch.result())
        try:
            while not (await asyncio.wait({result}, timeout=_PROGRESS_LOG))[0]:
                progress = fetch.progress.describe()
                log.info("download_progress", model=self.name, source=progress["source"],
                         phase=progress["phase"], bytes_done=progress["bytes_done"],
                         bytes_total=progress["bytes_total"], percent=progress["percent"])
            return result.result()
        finally:
            result.cancel()

    def _begin_stop(self, reason: StopReason) -> None:
        self._enter(ModelState.STOPPING)
        self.keep_alive = None  # the next load starts with the configured ttl
        self._keep_asked_at = -math.inf
        self._transition = self.host.spawn(self._stop(reason))

    async def _load(self) -> None:
        self.loads += 1
        restart = self.last_stop_reason == "crash"
        started = time.monotonic()
        proc: ModelProcess | None = None
        try:
            self.plan = await self.host.place(self)
            proc = await self._start_child(self.plan)
            await proc.wait_ready(self.host.config.file.llama_server.startup_timeout)
            self.slot_ctx = await _slot_context(proc)
        except ModelLoadError as exc:
            await self._after_exit(proc)
            self.host.observers.load_finished(self.name, False, time.monotonic() - started,
                                              restart)
            self._fail(exc.reason, "load", counts=not exc.pressure)
            exc.retry_after = max(exc.retry_after, self.retry_at - time.monotonic())
            log.error("model_load_failed", model=self.name, reason=exc.reason,
                      last_lines=exc.log_tail)
            raise
        except BaseException:
            # Cancelled (shutdown) or a bug: never leave a half-started child behind.
            if proc is not None:
                await proc.stop(self.host.config.file.llama_server.stop_timeout)
            await self._after_exit(proc)
            if self.state == ModelState.STARTING:
                self._fail("load interrupted", "load")
            raise
        self._enter(ModelState.READY)
        self.load_seconds = time.monotonic() - started
        self.ready_at = time.time()
        self.last_used = time.monotonic()
        self.last_error = None
        self._check_memory(proc)
        self.host.observers.load_finished(self.name, True, time.monotonic() - started, restart)
        log.info("model_ready", model=self.name, pid=proc.pid, socket=proc.socket,
                 seconds=round(time.monotonic() - started, 3), slots=self.plan.slots,
                 ctx_per_slot=self.slot_ctx, gpu_layers=self.plan.gpu_layers,
                 devices=list(self.plan.gpus) or ["cpu"])
        self.host.observers.model_ready(self.name)
        self._watch = self.host.spawn(self._watch_child(proc))
        if self._removal is not None:  # removed while it loaded: serve who waited, retire
            self.remove(self._removal.deadline)

    async def _start_child(self, plan: PlacementPlan) -> ModelProcess:
        settings = self.host.config.file.llama_server
        wanted = self.spec.binary or settings.binary
        binary = resolve_binary(wanted)
        if binary is None:
            raise ModelLoadError(
                self.name, f"llama-server binary {wanted!r} not found "
                "(set llama_server.binary, or run scripts/install-llama-server)",
                retry_after=30.0)
        command = child_command(self.local_spec, plan, binary,
                                str(child_socket(self.host.socket_dir, self.name)))
        proc = ModelProcess(self.name, command, self.spec.env, self.log_tail,
                            self.host.config.file.upstream, secret_env=self.host.secret_env)
        self.process = proc
        await proc.start()
        if proc.pid is not None:
            self.host.registry.add(proc.pid, self.name)
        return proc

    def _check_memory(self, proc: ModelProcess) -> None:
        """Compare what the child says it allocated with the estimate it was placed by."""
        assert self.plan is not None
        self.reported = parse_buffer_sizes(proc.ready_lines, self.plan.gpus)
        self.gpu_used = {}
        if self.plan.gpus and proc.pid is not None:
            # NVML's view includes what no buffer line reports (CUDA context, cuBLAS).
            self.gpu_used = process_gpu_memory(proc.pid)
        for device, estimated in self.plan.reservation.items():
            actual = self.memory()["actual"].get(device, 0)
            if actual > estimated * 1.1:
                log.warning("memory_above_estimate", model=self.name, device=device,
                            estimated=estimated, actual=actual)

    async def _stop(self, reason: StopReason) -> None:
        proc = self.process
        await self._drain(reason)
        if proc is not None:
            if proc.returncode is None:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(self.host.observers.child_stopping(self.name, proc),
                                           _FINAL_READ_CAP)
            code = await proc.stop(self.host.config.file.llama_server.stop_timeout,
                                   idle=self.in_flight == 0)
            await self._after_exit(proc)
            log.info("model_stopped", model=self.name, pid=proc.pid, reason=reason,
                     exit_code=code)
        self.last_stop_reason = reason
        self.ready_at = None
        self._idle_or_retired()
        self.host.observers.stopped(self.name, reason)

    async def _drain(self, reason: StopReason) -> None:
        """Wait for the in-flight requests to finish, as long as ``reason`` allows.

        A reload drops no request: its stops (``reload``, ``removed``) wait as long as an answer
        may take, ``upstream.generation_timeout`` (0: no bound), and a removed model's stop
        ends at its removal's deadline. The others wait up to ``shutdown_timeout``. Once corral
        shuts down, no wait outlasts ``shutdown_timeout``.
        """
        settings = self.host.config.file
        bound: float | None = settings.shutdown_timeout
        if reason in ("reload", "removed"):
            bound = settings.upstream.generation_timeout or None
        began = time.monotonic()
        while self.in_flight > 0:
            now = time.monotonic()
            removal = self._removal
            closing = self.host.closing_at
            if ((bound is not None and now - began >= bound)
                    or (removal is not None and removal.deadline is not None
                        and now >= removal.deadline)
                    or (closing is not None and now - closing >= settings.shutdown_timeout)):
                break
            await asyncio.sleep(_POLL)

    async def _watch_child(self, proc: ModelProcess) -> None:
        """Probe a ready child's ``/health``; notice when it exits or stops answering."""
        misses = 0
        hung = False
        while not hung:
            # Read at each probe, so a reload applies to running children from the next one.
            health = self.host.config.file.health
            if await proc.exited_within(health.interval):
                break
            if self.process is not proc or not self.state.serving:
                return  # being stopped on purpose: the stop takes care of it
            if await proc.healthy(timeout=min(health.interval, 5.0)):
                misses = 0
                continue
            misses += 1
            log.warning("child_health_missed", model=self.name, pid=proc.pid, misses=misses)
            if misses >= health.failures:
                log.error("child_hung", model=self.name, pid=proc.pid, misses=misses)
                await proc.kill()
                hung = True
        code = await proc.wait()
        if self.process is proc and self.state.serving:
            await self._after_exit(proc)
            reason = (f"llama-server stopped answering its health checks ({misses} missed) "
                      "and was killed" if hung
                      else f"llama-server exited unexpectedly with code {code}")
            log.error("child_exited", model=self.name, pid=proc.pid, exit_code=code,
                      last_lines=proc.error_lines())
            self.last_stop_reason = "crash"
            self._fail(reason, "crash")
            self.host.observers.stopped(self.name, "crash")

    def _fail(self, reason: str, kind: Literal["load", "crash"], counts: bool = True) -> None:
        """Record a failed load or a crash, and decide what follows."""
        now = time.monotonic()
        self.last_error = reason
        self.ready_at = None
        if self._removal is not None:
            self._retire_now()  # removed: nothing restarts it
            return
        # A host short of descriptors or processes is no fault of the model: retry soon, and
        # never give up on it for that.
        self.retry_at = now + (self.restarts.record(now) if counts else 1.0)
        if self.restarts.given_up:
            self._enter(ModelState.GIVEN_UP)
            log.error("model_given_up", model=self.name, failures=self.restarts.recent,
                      reason=reason)
            return
        self._enter(ModelState.FAILED if kind == "load" else ModelState.CRASHED)
        if (self.spec.pinned or self.spec.preload
                or (kind == "crash" and self.host.demand.waiting(self.name) > 0)):
            # After a failed load, the requests that waited get its error; only models that
            # must be up retry by themselves. After a crash, queued requests want it back.
            self._schedule_restart()

    def _schedule_restart(self) -> None:
        if self._restart is None and self.host.closing_at is None:
            self._restart = self.host.spawn(self._restart_after_backoff())

    def _cancel_restart(self) -> None:
        if self._restart is not None:
            self._restart.cancel()
            self._restart = None

    async def _restart_after_backoff(self) -> None:
        try:
            delay = max(0.0, self.retry_at - time.monotonic())
            log.info("model_restart_scheduled", model=self.name, seconds=round(delay, 2))
            await asyncio.sleep(delay)
        finally:
            if self._restart is asyncio.current_task():
                self._restart = None
        if self.state in (ModelState.FAILED, ModelState.CRASHED) and self.host.closing_at is None:
            self._begin_next()

    def _idle_or_retired(self) -> None:
        """No child and nothing under way: unloaded, or retired if a reload removed it."""
        if self._removal is not None:
            self._retire_now()
        else:
            self._enter(ModelState.UNLOADED)

    def _retire_now(self) -> None:
        self._cancel_restart()
        self._enter(ModelState.RETIRED)
        self.host.forget(self)
        self.host.observers.model_retired(self.name)

    async def _after_exit(self, proc: ModelProcess | None) -> None:
        """A child is gone (or never started): close its client, forget it, free its memory."""
        if proc is not None:
            await proc.close()
            if proc.pid is not None:
                self.host.registry.remove(proc.pid)
        self.host.release_memory(self.name)

    def memory(self) -> dict[str, dict[str, int]]:
        """Bytes per device: ``estimated`` (reserved) and ``actual`` (what the child reported)."""
        estimated = self.plan.reservation if self.plan is not None else {}
        actual: dict[str, int] = {}
        if self.reported is not None and self.state.serving:
            actual = {d: self.reported.total(d) for d in self.reported.by_device}
            actual.update(self.gpu_used)
        return {"estimated": dict(estimated), "actual": actual}


async def _slot_context(proc: ModelProcess) -> int | None:
    """The context each slot really has, as the child reports it (it pads to 256)."""
    assert proc.client is not None
    with contextlib.suppress(httpx.HTTPError, ValueError, KeyError, IndexError, TypeError):
        response = await proc.client.get("/slots", timeout=5.0)
        slots = response.json()
        return int(slots[0]["n_ctx"])
    return None
