"""``Picker``: the fresh views of every pod, and the decision for each request from them.

It reads every pod's ``/admin/status`` each ``refresh`` seconds (and at once when discovery
changes the set of pods), counts the requests it sent since a pod's last view (so a burst
between two refreshes does not all land on one pod's one free slot, and a model sent to an
unloaded pod counts as loading there), and exports its metrics on its own registry.

Usage::

    picker = Picker.from_config(config)
    await picker.start()
    decision = await picker.pick("smol", headers)
    picker.note_sent(decision.endpoints[0], "smol")
    ...
    await picker.aclose()
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter as Tally
from collections.abc import Iterator, Mapping
from typing import Any

import structlog
from prometheus_client import CollectorRegistry, Counter
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from corral.picker.config import PickerConfig
from corral.picker.decide import REASONS, Affinity, Decision, decide
from corral.picker.discovery import Discovery, discovery_for
from corral.picker.view import PodView, StatusReader, down

log = structlog.get_logger("corral.picker")


class Picker:
    """Views of the pods discovery names, and ``pick`` over them (``corral.picker.decide``)."""

    def __init__(self, discovery: Discovery, reader: StatusReader, *, refresh: float = 1.0,
                 affinity_header: str | None = None, max_load: float = 1.25,
                 retry_after: float | None = None) -> None:
        self.discovery = discovery
        self.reader = reader
        self.refresh = refresh
        self.affinity_header = affinity_header.lower() if affinity_header else None
        self.max_load = max_load
        self.retry_after = retry_after if retry_after is not None else max(1.0, refresh)
        self.views: dict[str, PodView] = {}
        self._sent: Tally[tuple[str, str]] = Tally()
        self._fresh = asyncio.Event()       # set after each completed refresh
        self._task: asyncio.Task[None] | None = None
        self.registry = CollectorRegistry(auto_describe=True)
        self.decisions = Counter("corral_picker_decisions", "Requests decided, by reason",
                                 ["reason"], registry=self.registry)
        for reason in REASONS:
            self.decisions.labels(reason)       # every reason present from the start, at 0
        self.registry.register(_ViewCollector(self))

    @classmethod
    def from_config(cls, config: PickerConfig) -> Picker:
        """A picker as ``corral picker`` runs it."""
        reader = StatusReader(config.key(), config.status_timeout)
        affinity = config.affinity
        return cls(discovery_for(config), reader, refresh=config.refresh,
                   affinity_header=affinity.header if affinity else None,
                   max_load=affinity.max_load if affinity else 1.25)

    async def start(self) -> None:
        """Start discovery and the refresh loop."""
        await self.discovery.start()
        self._task = asyncio.create_task(self._refresh_loop(), name="picker-refresh")

    async def aclose(self) -> None:
        if self._task:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self.discovery.aclose()
        await self.reader.aclose()

    async def refresh_now(self) -> None:
        """Read every discovered pod once; views of pods no longer discovered are dropped."""
        endpoints = self.discovery.endpoints()
        before = Tally(self._sent)          # what the views now being read will include
        views = await self.reader.read_all(endpoints)
        current = set(self.discovery.endpoints())
        self.views = {e: v for e, v in views.items() if e in current}
        for endpoint in current - views.keys():     # discovered during the read: next time
            self.views.setdefault(endpoint, down(endpoint, "not read yet"))
        self._sent -= before
        for key in [k for k in self._sent if k[0] not in current]:
            del self._sent[key]
        self._fresh.set()

    async def _refresh_loop(self) -> None:
        while True:
            try:
                await self.refresh_now()
            except Exception:   # a bug must not stop the views from refreshing
                log.exception("picker_refresh_failed")
            changed = self.discovery.changed()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.refresh):
                    await changed.wait()
            changed.clear()

    async def pick(self, model: str | None, headers: Mapping[str, str]) -> Decision:
        """The decision for one request for ``model`` (None: the body names none).

        Waits for the first views (within two refresh intervals) when there are none yet.
        ``headers`` are the request's, names in lower case (the affinity header's value).
        """
        if not self._fresh.is_set() and self._task is not None:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(2 * self.refresh + self.reader.timeout):
                    await self._fresh.wait()
        affinity = None
        if self.affinity_header and (key := headers.get(self.affinity_header)):
            affinity = Affinity(key, self.max_load)
        decision = decide(model, list(self.views.values()), in_flight=self._sent,
                          affinity=affinity, retry_after=self.retry_after)
        self.decisions.labels(decision.reason).inc()
        return decision

    def note_sent(self, endpoint: str, model: str) -> None:
        """Count a request sent to ``endpoint`` for ``model`` until the pod's next view."""
        view = self.views.get(endpoint)
        found = view.find(model) if view else None
        self._sent[(endpoint, found.name if found else model)] += 1

    def status(self) -> dict[str, Any]:
        """The fleet: every pod's models, slots and queues (``corral ps --fleet`` shows it)."""
        now = time.monotonic()
        pods = []
        for endpoint, view in sorted(self.views.items()):
            pods.append({
                "endpoint": endpoint, "up": view.up, "draining": view.draining,
                "error": view.error, "age_seconds": round(now - view.fetched_at, 3),
                "node": view.node, "in_flight_sent": sum(
                    n for (e, _), n in self._sent.items() if e == endpoint),
                "models": [{
                    "name": m.name, "aliases": list(m.aliases), "state": m.state,
                    "slots": m.slots, "slots_free": m.slots_free, "queue_depth": m.queue_depth,
                    "queue_limit": m.queue_limit,
                    "fit": None if m.fit is None else {
                        "now": m.fit.now, "after_evicting_idle": m.fit.after_evicting_idle,
                        "evict": list(m.fit.evict)},
                } for m in view.models],
            })
        up = [v for v in self.views.values() if v.up]
        return {
            "pods": pods,
            "totals": {
                "pods": len(self.views), "pods_up": len(up),
                "slots": sum(m.slots for v in up for m in v.models),
                "slots_free": sum(m.slots_free for v in up for m in v.models),
                "queue_depth": sum(m.queue_depth for v in up for m in v.models),
            },
            "decisions": {r: int(self.registry.get_sample_value(
                "corral_picker_decisions_total", {"reason": r}) or 0) for r in REASONS},
        }


class _ViewCollector(Collector):
    """Pods seen and up, and each pod's view age, computed when scraped."""

    def __init__(self, picker: Picker) -> None:
        self.picker = picker

    def collect(self) -> Iterator[Metric]:
        views = self.picker.views
        pods = GaugeMetricFamily("corral_picker_pods", "Pods discovered, and those answering",
                                 labels=["state"])
        pods.add_metric(["seen"], len(views))
        pods.add_metric(["up"], sum(v.up for v in views.values()))
        yield pods
        now = time.monotonic()
        age = GaugeMetricFamily("corral_picker_view_age_seconds",
                                "Seconds since each pod's status was last read",
                                labels=["pod"])
        for endpoint, view in sorted(views.items()):
            age.add_metric([endpoint], now - view.fetched_at)
        yield age
