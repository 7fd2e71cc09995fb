"""Slot-aware admission with the real llama-server: a model never gets more than its slots."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import ENDLESS, FAKE_LLAMA_SERVER, CorralProcess, holding_a_slot

pytestmark = pytest.mark.integration

Start = Callable[..., CorralProcess]
CHAT = [{"role": "user", "content": "Tell me a story."}]


def long_body(tokens: int, stream: bool = True) -> dict[str, Any]:
    return {"model": "m", "messages": CHAT, "max_tokens": tokens, "ignore_eos": True,
            "stream": stream}


def config(smollm2: Path, slots: int, **queue: Any) -> dict[str, Any]:
    # ENDLESS: a test holds slots with streams that end when it closes them.
    return {"models": {"m": {"path": str(smollm2), "slots": slots, "ctx_per_slot": 512,
                             "queue": queue, "args": ENDLESS}}}


def test_ten_streams_on_two_slots_never_exceed_two_upstream(
    corral: Start, smollm2: Path
) -> None:
    # The last of the eight may wait long on a loaded machine: not the default 60 s.
    server = corral(config(smollm2, 2, timeout="5m"))
    assert server.http.post("/admin/models/m/load").status_code == 200
    busiest, deepest, deferred, scrapes, admitted = 0, 0, 0.0, 0, 0
    done = threading.Event()

    def watch() -> None:
        nonlocal busiest, deepest, deferred, scrapes, admitted
        while not done.is_set():
            slots = server.http.get("/slots", params={"model": "m"}).json()
            busiest = max(busiest, sum(s["is_processing"] for s in slots))
            totals = server.http.get("/admin/status").json()["totals"]
            deepest = max(deepest, totals["queue_depth"])
            admitted = max(admitted, totals["in_flight"])  # corral's own count upstream
            # llama-server's own count of requests it had to hold back for want of a slot:
            # a third request upstream would show here, not in is_processing.
            for line in server.http.get("/metrics").text.splitlines():
                if line.startswith('llamacpp_requests_deferred{model="m"}'):
                    deferred = max(deferred, float(line.split()[-1]))
                    scrapes += 1
            time.sleep(0.02)

    def stream(_: int) -> str:
        with server.http.stream("POST", "/v1/chat/completions", json=long_body(8)) as r:
            assert r.status_code == 200
            return "".join(r.iter_text())

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        with ThreadPoolExecutor(8) as pool, contextlib.ExitStack() as holders:
            # Two streams hold both slots until eight more wait in corral's queue, however
            # fast the model answers; then all of them go through the two slots.
            for _ in range(2):
                holders.enter_context(holding_a_slot(server, "m"))
            streams = [pool.submit(stream, i) for i in range(8)]
            server.wait_for(lambda: server.model_status("m")["queue_depth"] == 8)
            server.wait_for(lambda: busiest == 2 and deepest == 8)  # the watcher saw it too
            holders.close()
            bodies = [s.result() for s in streams]
    finally:
        done.set()
        watcher.join()
    assert all(b.rstrip().endswith("data: [DONE]") for b in bodies)
    assert busiest == 2 and admitted == 2  # both slots worked, never more
    # Never a third request upstream: ten at once would leave eight deferred in llama-server.
    # A slot's end is seen by corral with the answer's last byte, a moment before llama-server
    # frees it, so the request corral admits then may be counted deferred for that moment
    # (seen in fresh-clone runs with both cores busy: 1, and 2 under stress-ng when both slots
    # handed over at once): at most one per slot, never the eight a third request would add.
    assert scrapes > 0 and deferred <= 2
    metrics = server.http.get("/metrics").text
    assert 'corral_queue_wait_seconds_count{model="m"} 10.0' in metrics
    assert 'corral_requests_total{code="200",endpoint="/v1/chat/completions",model="m"} 8.0' \
        in metrics
    # The two that held the slots were closed by the client (499).
    assert 'corral_requests_total{code="499",endpoint="/v1/chat/completions",model="m"} 2.0' \
        in metrics


def test_queue_full_gives_429_and_timeout_gives_503(corral: Start, smollm2: Path) -> None:
    # The queued request must still be waiting when the next one comes: 10 s between two
    # requests of the test is more than a busy machine takes, and not long to wait.
    server = corral(config(smollm2, 1, max=1, timeout="10s"))
    assert server.http.post("/admin/models/m/load").status_code == 200
    with ThreadPoolExecutor(1) as pool, holding_a_slot(server, "m"):
        assert server.model_status("m")["slots_busy"] == 1
        queued = pool.submit(server.http.post, "/v1/chat/completions",
                             json=long_body(4, stream=False))
        server.wait_for(lambda: server.model_status("m")["queue_depth"] == 1)
        full = server.http.post("/v1/chat/completions", json=long_body(4, stream=False))
        assert full.status_code == 429
        assert full.headers["retry-after"] == "1"
        assert full.json()["error"]["code"] == "queue_full"
        timed_out = queued.result()  # the slot stays busy past its 10 s queue timeout
        assert timed_out.status_code == 503, timed_out.text
        assert timed_out.json()["error"]["code"] == "queue_timeout"
        assert "retry-after" in timed_out.headers
    metrics = server.http.get("/metrics").text
    assert 'corral_queue_rejected_total{model="m",reason="full"} 1.0' in metrics
    assert 'corral_queue_rejected_total{model="m",reason="timeout"} 1.0' in metrics
    # The wait that timed out counts in the histogram too: that is the wait a p99 must show.
    assert 'corral_queue_wait_seconds_count{model="m"} 2.0' in metrics
    assert 'corral_queue_wait_seconds_bucket{le="1.0",model="m"} 1.0' in metrics


def test_a_client_that_disconnects_while_queued_leaves_the_queue(
    corral: Start, smollm2: Path
) -> None:
    server = corral(config(smollm2, 1))
    assert server.http.post("/admin/models/m/load").status_code == 200
    with holding_a_slot(server, "m"):
        body = b'{"model": "m", "prompt": "hi", "max_tokens": 4}'
        sock = socket.create_connection(("127.0.0.1", server.port))
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: localhost\r\nContent-Type: "
                     b"application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
        server.wait_for(lambda: server.model_status("m")["queue_depth"] == 1)
        sock.close()
        # It leaves at once, not at its queue timeout (60 s): the slot is still held.
        server.wait_for(lambda: server.model_status("m")["queue_depth"] == 0, timeout=30)
        assert server.model_status("m")["slots_busy"] == 1
    # The request that left is counted as 499 and never reached the child.
    metrics = server.http.get("/metrics").text
    assert 'corral_requests_total{code="499",endpoint="/v1/completions",model="m"} 1.0' \
        in metrics
    assert 'corral_requests_total{code="200",endpoint="/v1/completions",model="m"} 0.0' \
        in metrics


def test_requests_waiting_for_a_load_are_counted_as_queued(
    corral: Start, smollm2: Path, tmp_path: Path
) -> None:
    # A cold model: the first request starts the load, the other two wait behind it. All three
    # are queued from a client's view, and /admin/status and the metrics must say so.
    # The fake, whose load lasts until the test ends it: a real one may be ready before a look.
    loaded = tmp_path / "loaded"
    server = corral({"models": {"m": {
        "path": str(smollm2), "binary": FAKE_LLAMA_SERVER, "slots": 1, "ctx_per_slot": 256,
        "env": {"FAKE_LOADING_UNTIL": str(loaded)}}}})
    with ThreadPoolExecutor(3) as pool:
        replies = [pool.submit(server.http.post, "/v1/chat/completions",
                               json=long_body(2, stream=False)) for _ in range(3)]
        server.wait_for(lambda: server.model_status("m")["queue_depth"] == 3)
        status = server.model_status("m")
        assert status["state"] == "starting"
        assert status["slots_busy"] == 0  # nothing is upstream before the load ends
        assert 'corral_queue_depth{model="m"} 3.0' in server.http.get("/metrics").text
        loaded.touch()
        assert [r.result().status_code for r in replies] == [200, 200, 200]
    assert server.model_status("m")["queue_depth"] == 0
