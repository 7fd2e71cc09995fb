"""Faults in children: what each client receives, restarts, back-off, give-up and recovery.

Crashes and hangs at a chosen token come from the fake llama-server (tests/fake_llama_server.py)
because the real one cannot do them on demand; the real llama-server is SIGKILLed and
SIGSTOPped mid-stream to show the same handling on the real thing.
"""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from corral.supervisor.restarts import backoff
from tests.conftest import ENDLESS, FAKE_LLAMA_SERVER, CorralProcess, endless_chat

pytestmark = pytest.mark.integration

Start = Callable[..., CorralProcess]
# Faster than the defaults (5 s x 3), so a hang is found within seconds, but each probe still
# has a second to answer: on a loaded machine a healthy child may take a few hundred ms.
FAST_HEALTH = {"interval": "1s", "failures": 2}


def fake(smollm2: Path, mode: str, **extra: Any) -> dict[str, Any]:
    # The fake ignores the model, but corral places it first: give it a real GGUF header.
    return {"path": str(smollm2), "binary": FAKE_LLAMA_SERVER, "slots": 1, "ctx_per_slot": 256,
            "env": {"FAKE_MODE": mode}, **extra}


def real(smollm2: Path, **extra: Any) -> dict[str, Any]:
    return {"path": str(smollm2), "slots": 1, "ctx_per_slot": 512, **extra}


def stream_events(server: CorralProcess, model: str, tokens: int | None,
                  on_first: Callable[[], None] | None = None) -> list[str]:
    """The data lines of a streamed chat request, as the client receives them.

    ``tokens=None``: an endless one (the model needs ``ENDLESS``), which only a failure ends.
    """
    body: dict[str, Any] = endless_chat(model)
    if tokens is not None:
        body["max_tokens"] = tokens
    raw = ""
    with server.http.stream("POST", "/v1/chat/completions", json=body) as response:
        assert response.status_code == 200
        for text in response.iter_text():
            if not raw and on_first is not None:
                on_first()
            raw += text
    return [line for line in raw.split("\n") if line.startswith(("data: ", "event: "))]


def error_event(events: list[str]) -> dict[str, Any]:
    assert events[-2] == "event: error", events[-3:]
    payload: dict[str, Any] = json.loads(events[-1][len("data: "):])
    assert set(payload["error"]) == {"message", "type", "code"}
    return payload


def test_crash_mid_stream_ends_the_stream_with_an_error_event(
    corral: Start, smollm2: Path
) -> None:
    server = corral({"models": {"flaky": fake(smollm2, "crash_after:5"),
                                "steady": real(smollm2, preload=True)}})
    server.wait_for(lambda: server.model("steady")["state"] == "ready")
    steady_pid = server.model("steady")["pid"]
    events = stream_events(server, "flaky", 50)
    assert sum('"content"' in e for e in events) == 5  # what was produced still arrived
    assert "failed mid-stream" in error_event(events)["error"]["message"]
    # The status line said 200 before the crash; the metrics count how it ended.
    assert ('corral_requests_total{code="502",endpoint="/v1/chat/completions",model="flaky"} '
            '1.0') in server.http.get("/metrics").text
    server.wait_for(lambda: server.model("flaky")["state"] == "crashed")
    assert "exited unexpectedly with code 3" in server.model("flaky")["last_error"]

    # The next request restarts the crashed model (after the back-off) and counts it.
    reply = server.http.post("/v1/chat/completions", json={
        "model": "flaky", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3})
    assert reply.status_code == 502  # this fake crashes on every non-streamed answer
    assert reply.json()["error"]["code"] == "upstream_failed"
    metrics = server.http.get("/metrics").text
    assert 'corral_model_restarts_total{model="flaky"} 1.0' in metrics
    # The other model never noticed.
    assert server.model("steady")["pid"] == steady_pid
    assert server.model("steady")["state"] == "ready"


def test_a_child_dying_mid_event_still_gives_a_whole_error_event(
    corral: Start, smollm2: Path
) -> None:
    server = corral({"models": {"m": fake(smollm2, "cut_after:3")}})
    events = stream_events(server, "m", 20)
    assert sum('"content"' in e for e in events) == 3
    assert events[-3] == 'data: {"choices": [{"index": 0, "del'  # the half event, as it came
    assert "failed mid-stream" in error_event(events)["error"]["message"]


def test_hung_child_is_killed_by_the_health_checks(corral: Start, smollm2: Path) -> None:
    server = corral({"models": {"m": fake(smollm2, "hang_after:3")}, "health": FAST_HEALTH})
    started = time.monotonic()
    events = stream_events(server, "m", 20)
    took = time.monotonic() - started
    assert error_event(events)["error"]["code"] == "upstream_failed"
    # Two probes missed, each after an interval and its own second: far sooner than the
    # defaults would find it (3 misses of 5 s + 5 s each), however busy the machine.
    assert 2 * 1.0 <= took < 28.0
    server.wait_for(lambda: server.model("m")["state"] == "crashed")
    info = server.model("m")
    assert "stopped answering its health checks" in info["last_error"]
    assert server.children(None) == []


def test_a_non_streamed_answer_is_bounded_by_the_generation_timeout(
    corral: Start, smollm2: Path
) -> None:
    # The fake's /health keeps answering while it decodes slowly: the probes see nothing wrong,
    # so only the generation timeout ends the wait. The read timeout (silence between chunks
    # of a stream) must not cut a non-streamed answer short: it is silent until complete.
    server = corral({"models": {"m": fake(smollm2, "slow:0.5")}, "health": FAST_HEALTH,
                     "upstream": {"read_timeout": "1s", "generation_timeout": "10s"}})
    body = {"model": "m", "messages": [{"role": "user", "content": "Hi"}]}
    reply = server.http.post("/v1/chat/completions", json={**body, "max_tokens": 4})
    # 2 s of silence: past read_timeout, fine; 8 s left for a busy machine's delays.
    assert reply.status_code == 200, reply.text

    started = time.monotonic()
    # 30 s of silence, cut at generation_timeout (the default would wait an hour).
    reply = server.http.post("/v1/chat/completions", json={**body, "max_tokens": 60})
    assert 10.0 <= time.monotonic() - started < 10.0 + 60.0
    assert reply.status_code == 504, reply.text
    error = reply.json()["error"]
    assert error["code"] == "upstream_timeout"
    assert "generation_timeout (10s)" in error["message"]
    # The child is fine, only slow: it keeps running and the slot is free again.
    assert server.model("m")["state"] == "ready"
    server.wait_for(lambda: server.model("m")["in_flight"] == 0)
    assert len(server.children(None)) == 1


def test_queued_requests_wait_for_the_restart_after_a_crash(
    corral: Start, smollm2: Path
) -> None:
    server = corral({"models": {"m": real(smollm2, args=ENDLESS)}})
    assert server.http.post("/admin/models/m/load").status_code == 200
    (child,) = server.children()
    body = {"model": "m", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 8}
    with ThreadPoolExecutor(1) as pool:
        # It never ends by itself: the slot stays busy until the child is killed.
        long = endless_chat("m", stream=False)
        first = pool.submit(server.http.post, "/v1/chat/completions", json=long)
        server.wait_for(lambda: server.model_status("m")["slots_busy"] == 1)
        with ThreadPoolExecutor(1) as pool2:
            queued = pool2.submit(server.http.post, "/v1/chat/completions", json=body)
            server.wait_for(lambda: server.model_status("m")["queue_depth"] == 1)
            child.kill()
            assert first.result().status_code == 502
            assert queued.result().status_code == 200  # served by the restarted child
    info = server.model("m")
    assert info["loads"] == 2 and info["pid"] != child.pid


def test_pinned_model_restarts_by_itself(corral: Start, smollm2: Path) -> None:
    server = corral({"models": {"m": real(smollm2, pinned=True, preload=True)}})
    server.wait_for(lambda: server.model("m")["state"] == "ready")
    (child,) = server.children()
    child.kill()
    server.wait_for(lambda: server.model("m")["state"] == "crashed")
    server.wait_for(lambda: server.model("m")["state"] == "ready")
    assert server.model("m")["pid"] != child.pid
    assert 'corral_model_restarts_total{model="m"} 1.0' in server.http.get("/metrics").text


def test_failed_loads_back_off_then_give_up_until_an_admin_load(
    corral: Start, smollm2: Path, tmp_path: Path
) -> None:
    # The real llama-server fails to load a file whose weights are cut off (the header, which
    # corral reads to place it, is intact).
    truncated = tmp_path / "truncated.gguf"
    with smollm2.open("rb") as whole:
        truncated.write_bytes(whole.read(8 * 2**20))
    server = corral({"models": {"m": real(truncated)},
                     "restart": {"max_failures": 3, "window": "10m"}})
    ask = {"model": "m", "messages": [{"role": "user", "content": "Hi"}]}
    first = server.http.post("/v1/chat/completions", json=ask)
    assert first.status_code == 503
    assert "failed to load model" in first.json()["error"]["message"]  # its own words
    # Within the back-off: refused at once, no new process.
    again = server.http.post("/v1/chat/completions", json=ask)
    assert again.status_code == 503 and int(again.headers["retry-after"]) >= 1
    assert server.model("m")["loads"] == 1
    for attempt in (2, 3):
        def tried_again(attempt: int = attempt) -> bool:
            refused = server.http.post("/v1/chat/completions", json=ask).status_code == 503
            return refused and server.model("m")["loads"] == attempt

        server.wait_for(tried_again)
    info = server.model("m")
    assert info["given_up"] and info["recent_failures"] == 3
    # Past the longest back-off 3 failures earn (time is the point): it stays given up.
    time.sleep(backoff(3, jitter=1.0) + 0.5)
    refused = server.http.post("/v1/chat/completions", json=ask)
    assert refused.status_code == 503
    assert int(refused.headers["retry-after"]) >= 1
    message = refused.json()["error"]["message"]
    assert "gave up after 3 failures" in message
    assert "last lines from llama-server:" in message and "failed to load model" in message
    assert server.model("m")["loads"] == 3
    # An admin load clears it (and tries once more).
    assert server.http.post("/admin/models/m/load").status_code == 503
    info = server.model("m")
    assert info["loads"] == 4 and not info["given_up"] and info["recent_failures"] == 1
    metrics = server.http.get("/metrics").text
    assert 'corral_model_loads_total{model="m",result="failed"} 4.0' in metrics


def test_a_model_that_keeps_crashing_is_given_up_on(corral: Start, smollm2: Path) -> None:
    # A fake: the real llama-server cannot be made to crash on each request on demand. Each
    # crash is a served-then-died child, restarted while requests want it, until max_failures.
    server = corral({"models": {"m": fake(smollm2, "crash_after:0"),
                                "other": real(smollm2)},
                     "restart": {"max_failures": 3, "window": "10m"}})
    ask = {"model": "m", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
    codes = []
    for _ in range(3):
        codes.append(server.http.post("/v1/chat/completions", json=ask).status_code)
        server.wait_for(lambda: server.model("m")["state"] != "starting")
    assert codes == [502, 502, 502]  # each request that reached a dying child
    server.wait_for(lambda: server.model("m")["given_up"])
    refused = server.http.post("/v1/chat/completions", json=ask)
    assert refused.status_code == 503 and int(refused.headers["retry-after"]) >= 1
    message = refused.json()["error"]["message"]
    assert "gave up after 3 failures" in message
    assert "last lines from llama-server:" in message and "fake llama-server" in message
    assert server.model("m")["state"] == "given_up"
    other = server.http.post("/v1/completions", json={"model": "other", "prompt": "Hi",
                                                      "max_tokens": 2})
    assert other.status_code == 200  # every other model keeps serving
    metrics = server.http.get("/metrics").text
    # Three children: the first load, then a restart after each of the first two crashes.
    assert 'corral_model_loads_total{model="m",result="ok"} 3.0' in metrics
    assert 'corral_model_restarts_total{model="m"} 2.0' in metrics


def test_real_llama_server_killed_mid_stream(corral: Start, smollm2: Path) -> None:
    server = corral({"models": {"a": real(smollm2, args=ENDLESS),
                                "b": real(smollm2, preload=True)}})
    server.wait_for(lambda: server.model("b")["state"] == "ready")
    b_pid = server.model("b")["pid"]
    assert server.http.post("/admin/models/a/load").status_code == 200
    a_pid = server.model("a")["pid"]
    events = stream_events(server, "a", None, on_first=lambda: os.kill(a_pid, signal.SIGKILL))
    assert error_event(events)["error"]["code"] == "upstream_failed"
    server.wait_for(lambda: server.model("a")["state"] == "crashed")
    assert server.model("b")["pid"] == b_pid
    reply = server.http.post("/v1/completions", json={"model": "b", "prompt": "Hi",
                                                      "max_tokens": 2})
    assert reply.status_code == 200


def test_real_llama_server_stopped_mid_stream_is_found_hung(
    corral: Start, smollm2: Path
) -> None:
    server = corral({"models": {"a": real(smollm2, args=ENDLESS)}, "health": FAST_HEALTH})
    assert server.http.post("/admin/models/a/load").status_code == 200
    pid = server.model("a")["pid"]
    try:
        events = stream_events(server, "a", None, on_first=lambda: os.kill(pid, signal.SIGSTOP))
    finally:
        # If corral failed to kill it, do not leave a stopped process behind.
        try:
            os.kill(pid, signal.SIGCONT)
        except ProcessLookupError:
            pass
    assert error_event(events)["error"]["code"] == "upstream_failed"
    server.wait_for(lambda: server.model("a")["state"] == "crashed")
    assert "stopped answering its health checks" in server.model("a")["last_error"]
    # It recovers on the next request.
    server.wait_for(lambda: server.http.post("/v1/completions", json={
        "model": "a", "prompt": "Hi", "max_tokens": 2}).status_code == 200)


def test_slow_answers_pass_and_a_silent_child_times_out(corral: Start, smollm2: Path) -> None:
    server = corral({"models": {"slow": fake(smollm2, "slow:0.3"),
                                "silent": fake(smollm2, "gap:5")},
                     "upstream": {"read_timeout": "2s"}})
    events = stream_events(server, "slow", 8)  # 2.4 s in all, never 2 s of silence
    assert events[-1] == "data: [DONE]"
    events = stream_events(server, "silent", 3)
    assert error_event(events)["error"]["code"] == "upstream_failed"
    # A non-streamed answer is silent until it is complete: 2.4 s here, past the read timeout,
    # and still delivered.
    reply = server.http.post("/v1/chat/completions", json={
        "model": "slow", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 8})
    assert reply.status_code == 200
    assert reply.json()["choices"][0]["message"]["content"].count("tok") == 8


def test_broken_http_from_a_child_is_a_502(corral: Start, smollm2: Path) -> None:
    server = corral({"models": {"m": fake(smollm2, "broken_http")}})
    reply = server.http.post("/v1/chat/completions", json={
        "model": "m", "messages": [{"role": "user", "content": "Hi"}]})
    assert reply.status_code == 502
    assert reply.json()["error"]["type"] == "server_error"
    assert server.http.get("/health").status_code == 200


def test_a_client_that_leaves_mid_stream_frees_the_fake_slot_quickly(
    corral: Start, smollm2: Path
) -> None:
    server = corral({"models": {"m": fake(smollm2, "slow:0.1")}})
    # 10 minutes of tokens: only the client leaving can free the slot before the deadline.
    body = {"model": "m", "messages": [{"role": "user", "content": "Hi"}],
            "max_tokens": 6000, "stream": True}
    with httpx.Client(base_url=server.url, timeout=240) as http:
        with http.stream("POST", "/v1/chat/completions", json=body) as response:
            # Kept: an iterator dropped here would close the connection when it is collected.
            chunks = response.iter_raw()
            next(chunks)
            assert server.model_status("m")["slots_busy"] == 1
    server.wait_for(lambda: server.model_status("m")["slots_busy"] == 0)
