"""corral's /metrics after known traffic, with the real llama-server.

A scrape reads each child's ``/slots`` and ``/metrics`` with a 1 s timeout, and a child that
does not answer in time drops out of that scrape (by design: monitoring never waits on a busy
child). On a loaded machine that happens, so a test that checks a child's series scrapes until
every child it expects has answered (``scrape``).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import ENDLESS, FAKE_LLAMA_SERVER, CorralProcess, frozen, holding_a_slot

pytestmark = pytest.mark.integration

Start = Callable[..., CorralProcess]


def samples(server: CorralProcess) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    text = server.http.get("/metrics").text
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(found: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str,
          **labels: str) -> float | None:
    return found.get((name, frozenset(labels.items())))


def answered(found: dict[tuple[str, frozenset[tuple[str, str]]], float], model: str) -> bool:
    """Whether ``model``'s child answered both reads of this scrape."""
    return (value(found, "corral_slot_context_tokens", model=model, slot="0") is not None
            and value(found, "llamacpp_tokens_predicted_total", model=model) is not None)


def scrape(server: CorralProcess,
           *models: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """A scrape in which each of ``models``' children answered (scraped again until one is)."""
    scrapes = []

    def complete() -> bool:
        scrapes.append(samples(server))
        return all(answered(scrapes[-1], m) for m in models)

    server.wait_for(complete)
    return scrapes[-1]


def chat(server: CorralProcess, tokens: int, stream: bool) -> None:
    body: dict[str, Any] = {"model": "m", "messages": [{"role": "user", "content": "Hi"}],
                            "max_tokens": tokens, "ignore_eos": True, "stream": stream}
    response = server.http.post("/v1/chat/completions", json=body)
    assert response.status_code == 200


def test_metrics_after_known_traffic(corral: Start, smollm2: Path) -> None:
    server = corral({"models": {"m": {"path": str(smollm2), "slots": 2, "ctx_per_slot": 512},
                                "idle": {"path": str(smollm2), "slots": 1,
                                         "ctx_per_slot": 256}}})
    before = samples(server)
    # Every series a dashboard or alert reads exists before any traffic.
    assert value(before, "corral_model_state", model="m", state="unloaded") == 1.0
    assert value(before, "corral_queue_rejected_total", model="m", reason="full") == 0.0
    assert value(before, "corral_model_loads_total", model="m", result="failed") == 0.0
    assert value(before, "corral_model_restarts_total", model="m") == 0.0
    assert value(before, "corral_request_duration_seconds_count", model="m",
                 endpoint="/v1/chat/completions") == 0.0

    for tokens in (3, 5, 7):
        chat(server, tokens, stream=False)
    for tokens in (4, 6):
        chat(server, tokens, stream=True)
    found = scrape(server, "m")
    m = {"model": "m"}
    assert value(found, "corral_requests_total", code="200",
                 endpoint="/v1/chat/completions", **m) == 5.0
    assert value(found, "corral_request_duration_seconds_count",
                 endpoint="/v1/chat/completions", **m) == 5.0
    assert value(found, "corral_time_to_first_token_seconds_count", **m) == 2.0
    assert value(found, "corral_queue_wait_seconds_count", **m) == 5.0
    assert value(found, "corral_model_loads_total", result="ok", **m) == 1.0
    assert value(found, "corral_model_load_seconds_count", **m) == 1.0
    assert value(found, "corral_model_state", state="ready", **m) == 1.0
    assert value(found, "corral_model_state", state="unloaded", **m) == 0.0
    assert value(found, "corral_model_state", model="idle", state="unloaded") == 1.0
    assert value(found, "corral_model_slots", **m) == 2.0
    assert value(found, "corral_model_slots_busy", **m) == 0.0
    assert value(found, "corral_queue_depth", **m) == 0.0
    for slot in ("0", "1"):
        assert value(found, "corral_slot_context_tokens", slot=slot, **m) == 512.0
        assert value(found, "corral_slot_busy", slot=slot, **m) == 0.0
    assert value(found, "corral_generated_tokens_total", **m) == 25.0
    assert value(found, "llamacpp_tokens_predicted_total", **m) == 25.0
    assert (value(found, "corral_prompt_tokens_total", **m) or 0) > 0
    assert (value(found, "corral_model_memory_bytes", device="cpu", kind="actual", **m)
            or 0) > 50 * 2**20
    # Nothing for the model that is not loaded: it was not started to be measured.
    assert value(found, "llamacpp_tokens_predicted_total", model="idle") is None
    assert server.model("idle")["state"] == "unloaded"

    # Token totals survive the child, tokens since the last scrape included (read as it
    # stops); a new child starts counting from zero again.
    chat(server, 3, stream=False)
    assert server.http.post("/admin/models/m/unload").status_code == 200
    chat(server, 2, stream=False)
    found = scrape(server, "m")
    assert value(found, "corral_model_evictions_total", reason="manual", **m) == 1.0
    assert value(found, "corral_model_loads_total", result="ok", **m) == 2.0
    assert value(found, "corral_generated_tokens_total", **m) == 30.0
    assert value(found, "llamacpp_tokens_predicted_total", **m) == 2.0


def test_scraping_neither_loads_a_model_nor_keeps_it_alive(corral: Start, smollm2: Path) -> None:
    server = corral({"models": {"m": {"path": str(smollm2), "slots": 1, "ctx_per_slot": 256,
                                      "ttl": "2s"}}})
    samples(server)
    assert server.model("m")["state"] == "unloaded"
    chat(server, 2, stream=False)

    def unloaded_while_scraped() -> bool:
        samples(server)
        slots = server.http.get("/slots", params={"model": "m"})
        assert slots.status_code in (200, 503)  # 503 once it is unloaded: /slots never loads
        return bool(server.model("m")["state"] == "unloaded")

    # Scrapes kept coming, and the model went idle all the same (ttl 2 s).
    server.wait_for(unloaded_while_scraped, interval=0.2)
    found = samples(server)
    assert value(found, "corral_model_evictions_total", model="m", reason="idle") == 1.0


def test_a_child_that_does_not_answer_drops_out_of_the_scrape(
    corral: Start, smollm2: Path
) -> None:
    # The real llama-server, frozen with SIGSTOP: it accepts connections but answers nothing.
    model = {"path": str(smollm2), "slots": 1, "ctx_per_slot": 256}
    server = corral({"models": {"live": model, "frozen": model}})
    for name in ("live", "frozen"):
        assert server.http.post(f"/admin/models/{name}/load").status_code == 200
    scrapes: list[dict[tuple[str, frozenset[tuple[str, str]]], float]] = []
    took: list[float] = []

    def live_answered() -> bool:
        began = time.monotonic()
        scrapes.append(samples(server))
        took.append(time.monotonic() - began)
        return answered(scrapes[-1], "live")

    with frozen(server.model("frozen")["pid"]):
        server.wait_for(live_answered)
    found = scrapes[-1]
    # Each scrape waited the 1 s child timeout (and what a loaded machine adds), not forever.
    assert max(took) < 1.0 + 14.0
    assert value(found, "llamacpp_tokens_predicted_total", model="live") is not None
    assert value(found, "corral_slot_busy", model="live", slot="0") == 0.0
    assert value(found, "llamacpp_tokens_predicted_total", model="frozen") is None
    assert value(found, "corral_slot_busy", model="frozen", slot="0") is None
    # corral's own series for the frozen model are all still there.
    assert value(found, "corral_model_state", model="frozen", state="ready") == 1.0
    assert value(found, "corral_model_slots", model="frozen") == 1.0


def test_slot_series_follow_a_task_in_progress(corral: Start, smollm2: Path) -> None:
    server = corral({"models": {"m": {"path": str(smollm2), "slots": 2, "ctx_per_slot": 512,
                                      "args": ENDLESS}}})
    with holding_a_slot(server, "m") as chunks:
        for _ in range(20):
            next(chunks)
        found = scrape(server, "m")
    busy = [s for s in ("0", "1") if value(found, "corral_slot_busy", model="m", slot=s) == 1.0]
    assert len(busy) == 1
    (slot,) = busy
    assert (value(found, "corral_slot_decoded_tokens", model="m", slot=slot) or 0) >= 10
    assert (value(found, "corral_slot_prompt_tokens", model="m", slot=slot) or 0) > 5
    assert value(found, "corral_model_slots_busy", model="m") == 1.0


def test_a_child_with_garbled_slots_and_metrics_drops_out_of_them_only(
    corral: Start, smollm2: Path
) -> None:
    # The fake: the real llama-server cannot be made to answer malformed /slots or /metrics.
    server = corral({"models": {
        "garbled": {"path": str(smollm2), "binary": FAKE_LLAMA_SERVER, "slots": 1,
                    "ctx_per_slot": 256, "env": {"FAKE_MODE": "garbled"}}}})
    assert server.http.post("/admin/models/garbled/load").status_code == 200
    response = server.http.get("/metrics")
    assert response.status_code == 200
    m = {"model": "garbled"}
    scrapes = []

    def child_answered() -> bool:  # within the 1 s a scrape allows, which a loaded machine may not
        scrapes.append(samples(server))
        return value(scrapes[-1], "corral_slot_context_tokens", slot="0", **m) is not None

    server.wait_for(child_answered)
    found = scrapes[-1]
    assert value(found, "corral_slot_context_tokens", slot="0", **m) == 0.0  # "big": no number
    assert value(found, "corral_model_state", state="ready", **m) == 1.0
