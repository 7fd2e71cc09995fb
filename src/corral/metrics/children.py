"""Reading each ready child's ``/slots`` and ``/metrics`` at scrape time.

Reads go straight to the child's pooled client: they take no lease, so monitoring never loads a
model nor keeps one from going idle. A child that does not answer within the timeout simply
drops out of that scrape.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass, field
from typing import Any

import httpx
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

from corral.supervisor import ManagedModel, ModelState

SCRAPE_TIMEOUT = 1.0
# A stopping child's counters are read once more before they go: worth a longer wait than a
# scrape, which is retried every interval; the stop waits for it at most a little longer.
FINAL_READ_TIMEOUT = 5.0


@dataclass
class ChildSnapshot:
    """What one child said in one scrape; ``None`` where it did not answer."""

    model: str
    pid: int | None
    slots: list[dict[str, Any]] | None = None
    metrics: list[Metric] = field(default_factory=list)

    def counter(self, name: str) -> float | None:
        """The value of the child's counter ``name`` (without ``_total``), if it reported it."""
        for family in self.metrics:
            if family.name == name:
                for sample in family.samples:
                    return float(sample.value)
        return None


async def read_child(
    model: ManagedModel, timeout: float = SCRAPE_TIMEOUT, *, stopping: bool = False
) -> ChildSnapshot:
    """The child's ``/slots`` and ``/metrics``; empty parts for what it did not answer.

    Only a serving child is read, or with ``stopping`` one being stopped (a last reading of its
    counters before they go).
    """
    proc = model.process
    snapshot = ChildSnapshot(model.name, proc.pid if proc else None)
    readable = model.state.serving or (stopping and model.state == ModelState.STOPPING)
    if not readable or proc is None or proc.client is None:
        return snapshot
    slots, metrics = await asyncio.gather(
        proc.client.get("/slots", timeout=timeout),
        proc.client.get("/metrics", timeout=timeout),
        return_exceptions=True,
    )
    if isinstance(slots, httpx.Response) and slots.status_code == 200:
        with contextlib.suppress(ValueError):
            body = slots.json()
            # Whatever a child sends, a scrape must not fail: keep only slot objects.
            if isinstance(body, list):
                snapshot.slots = [s for s in body if isinstance(s, dict)]
    if isinstance(metrics, httpx.Response) and metrics.status_code == 200:
        with contextlib.suppress(Exception):  # the parser raises more than ValueError
            snapshot.metrics = list(text_string_to_metric_families(metrics.text))
    return snapshot


async def read_children(models: list[ManagedModel]) -> list[ChildSnapshot]:
    return list(await asyncio.gather(*(read_child(m) for m in models)))
