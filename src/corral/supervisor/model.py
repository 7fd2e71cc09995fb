"""One configured model as the supervisor tracks it, and the lease a request holds on it."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from dataclasses import dataclass
from typing import Any, Literal

import httpx
import psutil
import structlog

from corral.config import ModelSpec
from corral.placement import PlacementPlan
from corral.probe.usage import ReportedMemory
from corral.supervisor.process import LOG_TAIL_LINES, ModelProcess
from corral.supervisor.restarts import RestartPolicy
from corral.supervisor.state import ModelState, check_transition

log = structlog.get_logger("corral.supervisor")

StopReason = Literal["idle", "memory", "manual", "shutdown", "crash", "reload", "removed"]


class ManagedModel:
    """One configured model and whatever child currently serves it."""

    def __init__(self, spec: ModelSpec, restarts: RestartPolicy | None = None) -> None:
        self.spec = spec
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
        self.restarts = restarts or RestartPolicy(max_failures=5, window=600.0)
        self.retry_at = 0.0
        self.last_failure: Literal["load", "crash"] | None = None
        self.loads = 0
        self.transition: asyncio.Task[None] | None = None
        self.restart_task: asyncio.Task[None] | None = None
        # Removed from the config by a reload and being retired; a reload that brings it back
        # clears it, and the retire then leaves the model in place.
        self.removed = False
        self.retire_task: asyncio.Task[None] | None = None  # one at a time, however many
        self.retire_deadline: float | None = None  # monotonic, set by each removal; None: none
        # Set once the retire stops serving it: no child may be started for it any more.
        self.retired = False

    @property
    def name(self) -> str:
        return self.spec.name

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

    def memory(self) -> dict[str, dict[str, int]]:
        """Bytes per device: ``estimated`` (reserved) and ``actual`` (what the child reported)."""
        estimated = self.plan.reservation if self.plan is not None else {}
        actual: dict[str, int] = {}
        if self.reported is not None and self.state == ModelState.READY:
            actual = {d: self.reported.total(d) for d in self.reported.by_device}
            actual.update(self.gpu_used)
        return {"estimated": dict(estimated), "actual": actual}

    def rss(self) -> int | None:
        """The ready child's resident memory in bytes (mapped weights it touched included)."""
        proc = self.process
        if self.state == ModelState.READY and proc is not None and proc.pid is not None:
            with contextlib.suppress(psutil.Error):
                return int(psutil.Process(proc.pid).memory_info().rss)
        return None

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
            "slots": self.slots,
            "ctx_per_slot": self.ctx_per_slot,
            "gpu_layers": self.plan.gpu_layers if self.plan else self.spec.gpu_layers,
            "devices": list(self.plan.gpus) or ["cpu"] if self.plan else None,
            "memory": {**self.memory(), "rss": self.rss()},
            "in_flight": self.in_flight,
            "uptime_seconds": (round(time.time() - self.ready_at, 3)
                               if self.ready_at and self.state == ModelState.READY else None),
            "ttl_seconds": self.spec.ttl,
            "idle_seconds": round(time.monotonic() - self.last_used, 3),
            "loads": self.loads,
            "last_error": self.last_error,
            "last_stop_reason": self.last_stop_reason,
            "recent_failures": self.restarts.recent,
            "given_up": self.restarts.given_up,
            "pinned": self.spec.pinned,
            "path": str(self.spec.path),
        }


@dataclass
class Lease:
    """Permission to send one request to a ready model; ``release()`` exactly once after it."""

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


