"""``CorralMetrics``: the registry behind ``GET /metrics``.

Usage::

    metrics = CorralMetrics()
    supervisor = Supervisor(config, events=metrics)    # loads, evictions, restarts
    metrics.bind(supervisor, queues)                   # states, slots, queues at scrape time
    body = await metrics.render()                      # Prometheus text
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import structlog
from prometheus_client import CollectorRegistry, disable_created_metrics, generate_latest
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from corral.metrics.children import (
    FINAL_READ_TIMEOUT,
    ChildSnapshot,
    read_child,
    read_children,
)
from corral.metrics.instruments import Instruments
from corral.metrics.pool import QueueReading, pool_metrics
from corral.supervisor import ManagedModel, ModelProcess, ModelState, Supervisor
from corral.supervisor.events import SupervisorEvents
from corral.supervisor.fitness import model_fit, read_headers

log = structlog.get_logger(__name__)


@dataclass
class _TokenTotal:
    """A counter summed over a model's successive children (each starts from zero)."""

    base: float = 0.0
    pid: int | None = None
    last: float = 0.0

    def observe(self, pid: int | None, value: float) -> None:
        if pid != self.pid:
            self.base += self.last
            self.pid, self.last = pid, 0.0
        self.last = max(self.last, value)

    @property
    def total(self) -> float:
        return self.base + self.last


class CorralMetrics(SupervisorEvents, Collector):
    """Every corral metric, in its own registry."""

    def __init__(self) -> None:
        # `_created` series double the output and no dashboard reads them.
        disable_created_metrics()  # type: ignore[no-untyped-call]
        self.registry = CollectorRegistry(auto_describe=False)
        self.instruments = Instruments(self.registry)
        self._supervisor: Supervisor | None = None
        self._queues: Mapping[str, QueueReading] = {}
        self._snapshots: list[ChildSnapshot] = []
        self._tokens: dict[tuple[str, str], _TokenTotal] = {}
        self._lock = asyncio.Lock()
        self.registry.register(self)

    def bind(self, supervisor: Supervisor, queues: Mapping[str, QueueReading]) -> None:
        self._supervisor = supervisor
        self._queues = queues
        for name in supervisor.models:
            # The endpoints most clients use; others appear with their first request.
            self.instruments.declare(name, ("/v1/chat/completions", "/v1/completions"))

    async def render(self) -> bytes:
        """Read the children, then render every metric as Prometheus text."""
        async with self._lock:
            models = list(self._supervisor.models.values()) if self._supervisor else []
            self._snapshots = await read_children(models)
            await read_headers(models)  # for the pool metrics' fit, read off the loop
            for snapshot in self._snapshots:
                self._observe_tokens(snapshot)
            return generate_latest(self.registry)

    # -- SupervisorEvents ------------------------------------------------------------------

    def load_finished(self, model: str, ok: bool, seconds: float, restart: bool) -> None:
        self.instruments.loads.labels(model, "ok" if ok else "failed").inc()
        if ok:
            self.instruments.load_seconds.labels(model).observe(seconds)
        if restart:
            self.instruments.restarts.labels(model).inc()

    def stopped(self, model: str, reason: str) -> None:
        if reason in ("idle", "memory", "manual"):
            self.instruments.evictions.labels(model, reason).inc()

    async def child_stopping(self, model: str, process: ModelProcess) -> None:
        # The child's token counters die with it: read them one last time.
        if self._supervisor is not None:
            managed = self._supervisor.models[model]
            snapshot = ChildSnapshot(model, process.pid)
            with contextlib.suppress(Exception):
                snapshot = await read_child(managed, FINAL_READ_TIMEOUT, stopping=True)
            if not snapshot.metrics:
                # Its tokens since the last scrape are not counted: say so, not silently.
                log.warning("final_token_count_missed", model=model, pid=process.pid)
            self._observe_tokens(snapshot)

    # -- scrape-time metrics -----------------------------------------------------------------

    def _observe_tokens(self, snapshot: ChildSnapshot) -> None:
        for ours, theirs in (("prompt", "llamacpp:prompt_tokens"),
                             ("generated", "llamacpp:tokens_predicted")):
            value = snapshot.counter(theirs)
            if value is not None:
                key = (snapshot.model, ours)
                self._tokens.setdefault(key, _TokenTotal()).observe(snapshot.pid, value)

    def collect(self) -> Iterator[Metric]:
        if self._supervisor is None:
            return
        models = list(self._supervisor.models.values())
        yield from self._model_metrics(models)
        yield from self._slot_metrics()
        yield from self._token_metrics(models)
        yield from self._memory_metrics(models)
        yield from _download_metrics(models)
        yield from self._child_metrics()
        supervisor = self._supervisor
        fits = {m.name: model_fit(m, models, supervisor.config, supervisor.ledger)
                for m in models}
        yield from pool_metrics(models, self._queues,
                                [s.slots for s in self._snapshots if s.slots], fits)

    def _model_metrics(self, models: list[ManagedModel]) -> Iterator[Metric]:
        state = GaugeMetricFamily("corral_model_state", "1 for the model's current state.",
                                  labels=["model", "state"])
        slots = GaugeMetricFamily("corral_model_slots", "Slots the model is configured with.",
                                  labels=["model"])
        busy = GaugeMetricFamily("corral_model_slots_busy",
                                 "Slots serving a request (requests admitted upstream).",
                                 labels=["model"])
        depth = GaugeMetricFamily("corral_queue_depth",
                                  "Requests waiting for a slot or for the model to load.",
                                  labels=["model"])
        ctx = GaugeMetricFamily("corral_model_ctx_per_slot", "Context tokens of each slot.",
                                labels=["model"])
        for model in models:
            for value in ModelState:
                state.add_metric([model.name, str(value)], 1.0 if model.state == value else 0.0)
            slots.add_metric([model.name], model.slots)
            ctx.add_metric([model.name], model.ctx_per_slot or 0)
            queue = self._queues.get(model.name)
            busy.add_metric([model.name], queue.in_flight - queue.loading if queue else 0)
            depth.add_metric([model.name], queue.depth if queue else 0)
        yield from (state, slots, busy, depth, ctx)

    def _slot_metrics(self) -> Iterator[Metric]:
        busy = GaugeMetricFamily("corral_slot_busy", "1 while the slot processes a task.",
                                 labels=["model", "slot"])
        context = GaugeMetricFamily("corral_slot_context_tokens", "The slot's context (n_ctx).",
                                    labels=["model", "slot"])
        prompt = GaugeMetricFamily("corral_slot_prompt_tokens",
                                   "Prompt tokens of the slot's current or last task.",
                                   labels=["model", "slot"])
        decoded = GaugeMetricFamily("corral_slot_decoded_tokens",
                                    "Tokens generated so far by the slot's current task "
                                    "(0 when idle).",
                                    labels=["model", "slot"])
        for snapshot in self._snapshots:
            for slot in snapshot.slots or ():
                labels = [snapshot.model, str(slot.get("id", "?"))]
                busy.add_metric(labels, 1.0 if slot.get("is_processing") else 0.0)
                context.add_metric(labels, _number(slot.get("n_ctx")))
                prompt.add_metric(labels, _number(slot.get("n_prompt_tokens")))
                next_token = slot.get("next_token") or [{}]
                first = next_token[0] if isinstance(next_token, list) and next_token else {}
                decoded.add_metric(labels, _number(first.get("n_decoded")
                                                   if isinstance(first, dict) else None))
        yield from (busy, context, prompt, decoded)

    def _token_metrics(self, models: list[ManagedModel]) -> Iterator[Metric]:
        prompt = CounterMetricFamily("corral_prompt_tokens", "Prompt tokens processed.",
                                     labels=["model"])
        generated = CounterMetricFamily("corral_generated_tokens", "Tokens generated.",
                                        labels=["model"])
        for model in models:
            for family, kind in ((prompt, "prompt"), (generated, "generated")):
                total = self._tokens.get((model.name, kind))
                family.add_metric([model.name], total.total if total else 0.0)
        yield from (prompt, generated)

    def _memory_metrics(self, models: list[ManagedModel]) -> Iterator[Metric]:
        memory = GaugeMetricFamily(
            "corral_model_memory_bytes",
            "Memory a model takes per device: estimated (reserved before loading), actual (what "
            "the child reported allocating), rss (the child's resident memory, cpu only).",
            labels=["model", "device", "kind"])
        for model in models:
            usage = model.memory()
            for kind in ("estimated", "actual"):
                for device, size in usage[kind].items():
                    memory.add_metric([model.name, device, kind], float(size))
            rss = model.rss()
            if rss is not None:
                memory.add_metric([model.name, "cpu", "rss"], float(rss))
        yield memory
        assert self._supervisor is not None
        devices = GaugeMetricFamily(
            "corral_device_memory_bytes",
            "Each device's memory: total, reserved by corral's models, free for new ones.",
            labels=["device", "kind"])
        for budget in self._supervisor.ledger.snapshot():
            device = budget.device.id
            devices.add_metric([device, "total"], float(budget.device.total))
            devices.add_metric([device, "reserved"], float(budget.held))
            devices.add_metric([device, "free"], float(budget.free))
        yield devices

    def _child_metrics(self) -> Iterator[Metric]:
        """Each child's own ``llamacpp:*`` metrics as ``llamacpp_*``, with a ``model`` label.

        Colons are reserved for recording rules (promtool rejects them in exposition), so the
        re-exported names use an underscore: ``llamacpp:requests_deferred`` becomes
        ``llamacpp_requests_deferred``.
        """
        merged: dict[str, Metric] = {}
        for snapshot in self._snapshots:
            for family in snapshot.metrics:
                name = family.name.replace(":", "_")
                out = merged.get(name)
                if out is None:
                    out = merged[name] = Metric(name, family.documentation, family.type)
                for sample in family.samples:
                    out.add_sample(sample.name.replace(":", "_"),
                                   {**sample.labels, "model": snapshot.model}, sample.value)
        yield from merged.values()


def _download_metrics(models: list[ManagedModel]) -> Iterator[Metric]:
    """Bytes each model fetched from its source, and what its download still has to fetch."""
    done = CounterMetricFamily("corral_download_bytes",
                               "Bytes of model files downloaded from their source.",
                               labels=["model"])
    remaining = GaugeMetricFamily("corral_download_remaining_bytes",
                                  "Bytes the model's download still has to fetch (0 when none "
                                  "runs).", labels=["model"])
    for model in models:
        if model.spec.source is None:
            continue
        done.add_metric([model.name], float(model.bytes_downloaded))
        remaining.add_metric([model.name], float(model.bytes_remaining))
    yield from (done, remaining)


def _number(value: object) -> float:
    """A child's figure as a sample value; 0 for anything that is not a number."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    return 0.0
