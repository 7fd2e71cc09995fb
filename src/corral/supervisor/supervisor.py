"""The supervisor: the registry of ``ManagedModel`` objects, and what is shared between them.

Each model owns its life (``corral.supervisor.model``). The supervisor holds what they share and
decides what involves more than one of them: the ledger of memory and which idle models to
evict for a load, the idle reaper, preloads in the config's order, the state file, the reload's
diff of old and new models, and shutdown.

Usage::

    supervisor = Supervisor(config, observers=[metrics, queues], demand=queues)
    await supervisor.start()                 # reaps leftovers, starts preloads and the reaper
    lease = await supervisor.acquire("smol") # loads if needed; concurrent callers share a load
    try:
        ... lease.client ...                 # pooled httpx client for that child
    finally:
        lease.release()
    await supervisor.shutdown()

Only the supervisor's models start and stop processes; the proxy asks for leases.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Coroutine, Iterable
from functools import partial
from typing import Any

import structlog

from corral.config import Config
from corral.errors import ModelLoadError, ModelNotFoundError, ModelUnavailableError
from corral.placement import PlacementPlan
from corral.probe.host import (
    make_ledger,
    prepare_socket_dir,
    remove_socket_dir,
    socket_dir,
    state_file_path,
)
from corral.supervisor.children import ChildRegistry
from corral.supervisor.events import Demand, NoDemand, Observers, SupervisorEvents
from corral.supervisor.lifecycle import ModelLifecycle, StopReason
from corral.supervisor.model import Lease, ManagedModel
from corral.supervisor.placing import Candidate, place

log = structlog.get_logger("corral.supervisor")


class Supervisor:
    """Starts, watches and stops the llama-server children of every configured model.

    ``observers`` hear about models' lives (metrics, the proxy's queues); ``demand`` says how
    many requests the proxy holds for each model. Both are given here, once.
    """

    def __init__(
        self,
        config: Config,
        *,
        observers: Iterable[SupervisorEvents] = (),
        demand: Demand | None = None,
        reap_interval: float = 1.0,
    ) -> None:
        self.config = config
        # Every variable that ever held an API key: one a reload stopped naming still holds a
        # key in corral's environment, and children started later must not inherit it.
        self.secret_env: set[str] = set(config.secret_env)
        self.observers: SupervisorEvents = Observers(observers)
        self.demand: Demand = demand or NoDemand()
        self.ledger = make_ledger(config)
        self.registry = ChildRegistry(state_file_path(config))
        self.socket_dir = socket_dir(self.registry.path)
        self.closing_at: float | None = None  # when shutdown() began
        self.refusing = asyncio.Event()  # set by refuse_waiting() at the drain's deadline
        self.models = {name: ManagedModel(spec, self) for name, spec in config.models.items()}
        self._reap_interval = reap_interval
        # Loads waiting for busy models to become evictable wait on this, not a poll: each
        # change of a model's idleness sets it (and makes a new one), if anyone waits.
        self._capacity = asyncio.Event()
        self._capacity_waiters = 0
        self._tasks: set[asyncio.Task[Any]] = set()
        self._background: list[asyncio.Task[None]] = []

    def get(self, name: str) -> ManagedModel:
        """The model called ``name`` or one of its aliases; ``ModelNotFoundError`` otherwise."""
        spec = self.config.resolve(name)
        if spec is None:
            raise ModelNotFoundError(name, self.config.model_names())
        return self.models[spec.name]

    async def start(self) -> None:
        """Stop what an earlier run left, then start the idle reaper and the preloads."""
        self.registry.reap_leftovers()
        prepare_socket_dir(self.socket_dir)
        self._prefetch()
        self._background = [
            self.spawn(self._reap_idle()),
            self.spawn(self._preload_in_order(
                [m for m in self.models.values() if m.spec.preload])),
        ]

    def _prefetch(self) -> None:
        """Begin the downloads of ``download: startup`` models (a preloaded one downloads as
        it loads)."""
        for model in self.models.values():
            if model.spec.download == "startup" and not model.spec.preload and not model.removing:
                model.download()

    async def _preload_in_order(self, models: list[ManagedModel]) -> None:
        # One after another, in the config's order, as `corral plan` places them: with
        # `slots`/`ctx_per_slot: auto` the first to reserve takes what it can, so loading them
        # all at once would make the outcome depend on which file happened to be read first.
        for model in models:
            await self._preload(model)

    async def _preload(self, model: ManagedModel) -> None:
        if model.removing or self.models.get(model.name) is not model:
            return  # added, then removed by the next reload before this ran
        with contextlib.suppress(ModelLoadError, ModelUnavailableError):
            await model.load()

    async def acquire(self, name: str | ManagedModel, touch: bool = True) -> Lease:
        """A lease on a ready model (a name, alias, or the model); see ``ManagedModel.acquire``.

        Raises ``ModelNotFoundError``, ``ModelLoadError`` or ``ModelUnavailableError``.
        """
        model = name if isinstance(name, ManagedModel) else self.get(name)
        return await model.acquire(touch)

    async def load(self, name: str) -> ManagedModel:
        """Load ``name`` now (admin): clears a failed or given-up state and its back-off."""
        model = self.get(name)
        await model.load()
        return model

    async def unload(self, name: str, reason: StopReason = "manual") -> ManagedModel:
        """Stop ``name``'s child once its in-flight requests are done (bounded)."""
        model = self.get(name)
        await model.unload(reason)
        return model

    def refuse_waiting(self) -> None:
        """End every wait for a model to load or stop with ``ShuttingDownError`` (503): corral
        exits before they would end."""
        self.refusing.set()

    async def shutdown(self) -> None:
        """Stop every child, each step bounded by the stop and drain timeouts: new leases are
        refused, the reaper and preloads stop, loads in progress are abandoned (each stops its
        own half-started child), then every child is stopped."""
        self.closing_at = time.monotonic()
        for task in self._background:
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)
        await asyncio.gather(*(m.close() for m in list(self.models.values())),
                             return_exceptions=True)
        # Each corral (state file) has a socket directory of its own: not left behind once
        # every child is gone (a retired model's too: the registry has them all). A child
        # still running keeps its socket: the next start stops it.
        if not self.registry.pids:
            remove_socket_dir(self.socket_dir)

    def reconfigure(self, config: Config) -> dict[str, list[str]]:
        """Apply a new, already validated configuration without dropping a request.

        Unchanged models are not touched. Changed ones drain and restart with their new
        settings (only if they were loaded or preload). Removed ones serve what is queued or in
        flight for them, then retire; new ones become available. A removed model put back
        before it retired stays (restarted only if its settings changed).
        """
        old = self.config
        shared_changed = (old.file.llama_server != config.file.llama_server
                          or old.file.upstream != config.file.upstream)
        self.config = config
        self.secret_env |= config.secret_env
        added: list[str] = []
        changed: list[str] = []
        for name, spec in config.models.items():
            model = self.models.get(name)
            if model is None:
                model = self.models[name] = ManagedModel(spec, self)
                added.append(name)
                if spec.preload:
                    self.spawn(self._preload(model))
            elif model.removing:
                added.append(name)
                model.restore(spec, restart=shared_changed or spec != model.spec)
                if spec.preload and not model.state.serving:
                    self.spawn(self._preload(model))
            elif shared_changed or spec != model.spec:
                changed.append(name)
                model.reconfigure(spec)
        self._prefetch()  # new models, and changed ones whose files changed
        restart = config.file.restart
        bound = config.file.upstream.generation_timeout
        removed: list[str] = []
        for name, model in list(self.models.items()):
            # Every model, changed or not: the give-up rule is corral's, not the child's.
            model.restarts.max_failures = restart.max_failures
            model.restarts.window = restart.window
            if name not in config.models and not model.removing:
                removed.append(name)
                # Each removal bounds its own wait: the retire and the stop that ends it.
                model.remove(time.monotonic() + bound if bound else None)
        return {"added": added, "changed": changed, "removed": removed}

    # -- what models use of their host -------------------------------------------------------

    async def place(self, model: ModelLifecycle) -> PlacementPlan:
        """Plan ``model`` and reserve its memory, evicting idle models or waiting for memory up
        to its queue timeout."""
        return await place(model.local_spec, self.config, self.ledger,
                           partial(self._eviction_candidates, model), self._evict,
                           wait=model.spec.queue_timeout, changed=self._capacity_change)

    def capacity_changed(self) -> None:
        if self._capacity_waiters:
            self._capacity.set()
            self._capacity = asyncio.Event()

    async def _capacity_change(self, timeout: float) -> None:
        """Return when a model's idleness changes, or after ``timeout`` (others' memory)."""
        event = self._capacity
        self._capacity_waiters += 1
        try:
            await asyncio.wait_for(event.wait(), timeout)
        except TimeoutError:
            pass
        finally:
            self._capacity_waiters -= 1

    def _eviction_candidates(self, loading: ModelLifecycle) -> list[Candidate]:
        return [Candidate(m.name, m.last_used, busy=m.busy, pinned=m.spec.pinned)
                for m in self.models.values()
                if m is not loading and self.ledger.holdings(m.name)]

    async def _evict(self, name: str) -> None:
        await self.models[name].unload("memory")

    def release_memory(self, model: str) -> None:
        self.ledger.release(model)
        self.capacity_changed()

    def forget(self, model: ModelLifecycle) -> None:
        """A retired model: gone for good (a reload that adds the name back makes a new one)."""
        if self.models.get(model.name) is model:
            del self.models[model.name]

    async def _reap_idle(self) -> None:
        while True:
            await asyncio.sleep(self._reap_interval)
            now = time.monotonic()
            for model in list(self.models.values()):
                model.stop_if_idle(now)

    def spawn(self, coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        """Run ``coro`` as a task the supervisor keeps, and logs if it fails unexpectedly."""
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and (exc := task.exception()) is not None:
            if not isinstance(exc, ModelLoadError):
                log.error("supervisor_task_failed", error=repr(exc))
