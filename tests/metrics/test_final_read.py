"""A stopping child's last token counts: read with room, and a miss is said, not silent."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any, cast

import httpx
from structlog.testing import capture_logs

from corral.metrics import collector
from corral.metrics.collector import CorralMetrics
from corral.supervisor import ModelProcess, ModelState, Supervisor

METRICS = "# TYPE llamacpp:tokens_predicted_total counter\nllamacpp:tokens_predicted_total 30\n"


class Child:
    """A child's pooled client as the final read sees it: answers, or never does."""

    def __init__(self, answers: bool) -> None:
        self.answers = answers
        self.timeouts: list[float] = []

    async def get(self, path: str, timeout: float) -> httpx.Response:
        self.timeouts.append(timeout)
        if not self.answers:
            raise httpx.ReadTimeout("no answer")
        return httpx.Response(200, text=METRICS if path == "/metrics" else "[]")


def stopping(client: Child) -> tuple[CorralMetrics, ModelProcess]:
    process = SimpleNamespace(pid=4242, client=client, returncode=None)
    model = SimpleNamespace(name="m", process=process, state=ModelState.STOPPING)
    metrics = CorralMetrics()
    metrics.bind(cast(Supervisor, SimpleNamespace(models={"m": model})), {})
    return metrics, cast(ModelProcess, process)


def generated(metrics: CorralMetrics) -> Any:
    total = metrics._tokens.get(("m", "generated"))  # what /metrics adds up for this model
    return total.total if total else None


async def test_a_stopping_childs_last_counts_are_read_with_more_room_than_a_scrape() -> None:
    child = Child(answers=True)
    metrics, process = stopping(child)
    with capture_logs() as logs:
        await metrics.child_stopping("m", process)
    assert child.timeouts and min(child.timeouts) >= collector.FINAL_READ_TIMEOUT > 1.0
    assert not [e for e in logs if e["event"] == "final_token_count_missed"]
    assert generated(metrics) == 30.0


async def test_a_missed_last_reading_is_logged() -> None:
    metrics, process = stopping(Child(answers=False))
    with capture_logs() as logs:
        await metrics.child_stopping("m", process)
    missed = [e for e in logs if e["event"] == "final_token_count_missed"]
    assert missed and missed[0]["model"] == "m" and missed[0]["pid"] == 4242
