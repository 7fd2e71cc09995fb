"""What a client sends is quoted back (in errors and logs) only up to a bound: a 15 MiB model
name must not come back as a 15 MiB answer and a 15 MB log line."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from tests.conftest import CorralProcess

Start = Callable[..., CorralProcess]
HUGE = 15 * 2**20
LONG = 6000  # a path or header value: within what the HTTP parser takes, far beyond the bound
SMALL_ANSWER = 2000

pytestmark = pytest.mark.integration


def bounded(response: httpx.Response, status: int, length: int) -> None:
    assert response.status_code == status, response.text[:500]
    assert len(response.content) < SMALL_ANSWER, len(response.content)
    assert f"({length} characters)" in response.json()["error"]["message"]


def test_echoes_of_client_input_are_bounded(corral: Start, smollm2: Path) -> None:
    server = corral({"models": {"m": {"path": str(smollm2), "slots": 1, "ctx_per_slot": 256}}})
    http = server.http
    name = "x" * HUGE
    bounded(http.post("/v1/completions", json={"model": name, "prompt": "Hi"}), 404, HUGE)
    long = "y" * LONG
    bounded(http.get(f"/v1/models/{long}"), 404, LONG)
    bounded(http.get(f"/slots?model={long}"), 404, LONG)
    bounded(http.post(f"/admin/models/{long}/load"), 404, LONG)
    bounded(http.get(f"/{long}"), 404, LONG + 1)
    bounded(http.post("/v1/completions", content=b"{}",
                      headers={"Content-Type": "text/" + long}), 415, LONG + 5)
    bounded(http.get("/v1/models", headers={"Origin": "https://" + long}), 403, LONG + 8)
    bounded(http.get("/v1/models", headers={"Host": long}), 421, LONG)
    # The request log lines quote them just as briefly.
    log = server.log()
    assert name[:1000] not in log and long[:1000] not in log
    assert len(log) < 100_000, len(log)
