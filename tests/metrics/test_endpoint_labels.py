"""The ``endpoint`` label is the route's template: a client cannot make up new series."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import CorralProcess
from tests.metrics.test_metrics import samples, value

pytestmark = pytest.mark.integration

Start = Callable[..., CorralProcess]


def test_endpoint_labels_come_from_route_templates(corral: Start, smollm2: Path) -> None:
    server = corral({"models": {"m": {"path": str(smollm2), "slots": 1, "ctx_per_slot": 256}}})
    slots = ("99999999999999999999", "1", "7")
    for slot in slots:
        # The model is not loaded: 503, counted like any answered request, loading nothing.
        answer = server.http.post(f"/slots/{slot}?model=m&action=erase")
        assert answer.status_code == 503, answer.text
    assert server.http.post("/made/up/path", json={}).status_code == 404
    found = samples(server)
    assert value(found, "corral_requests_total", model="m", endpoint="/slots/{slot}",
                 code="503") == len(slots)
    endpoints = {dict(labels).get("endpoint") for _, labels in found}
    assert not any(f"/slots/{slot}" in endpoints for slot in slots), endpoints
    assert "/made/up/path" not in endpoints
