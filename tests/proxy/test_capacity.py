"""Slot-aware admission with the real llama-server: a model never gets more than its slots."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import CorralProcess

pytestmark = pytest.mark.integration

Start = Callable[..., CorralProcess]
CHAT = [{"role": "user", "content": "Tell me a story."}]


def long_body(tokens: int, stream: bool = True) -> dict[str, Any]:
    return {"model": "m", "messages": CHAT, "max_tokens": tokens, "ignore_eos": True,
            "stream": stream}


def config(smollm2: Path, slots: int, **queue: Any) -> dict[str, Any]:
    return {"models": {"m": {"path": str(smollm2), "slots": slots, "ctx_per_slot": 512,
                             "queue": queue}}}


def test_ten_streams_on_two_slots_never_exceed_two_upstream(
    corral: Start, smollm2: Path
) -> None:
    server = corral(config(smollm2, 2))
    assert server.http.post("/admin/models/m/load").status_code == 200
    busiest, deepest, deferred, scrapes = 0, 0, 0.0, 0
    done = threading.Event()

    def watch() -> None:
        nonlocal busiest, deepest, deferred, scrapes
        while not done.is_set():
            slots = server.http.get("/slots", params={"model": "m"}).json()
            busiest = max(busiest, sum(s["is_processing"] for s in slots))
            deepest = max(deepest, server.http.get("/admin/status").json()["totals"][
                "queue_depth"])
            # llama-server's own count of requests it had to hold back for want of a slot:
            # a third request upstream would show here, not in is_processing.
            for line in server.http.get("/metrics").text.splitlines():
                if line.startswith('llamacpp_requests_deferred{model="m"}'):
                    deferred = max(deferred, float(line.split()[-1]))
                    scrapes += 1
            time.sleep(0.02)

    def stream(_: int) -> str:
        with server.http.stream("POST", "/v1/chat/completions", json=long_body(24)) as r:
            assert r.status_code == 200
            return "".join(r.iter_text())

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        with ThreadPoolExecutor(10) as pool:
            bodies = list(pool.map(stream, range(10)))
    finally:
        done.set()
        watcher.join()
    assert all(b.rstrip().endswith("data: [DONE]") for b in bodies)
    assert busiest == 2  # both slots worked
    assert scrapes > 0 and deferred == 0  # never a third request upstream
    assert deepest >= 5  # the overflow waited in corral's queue, where it can be seen
    metrics = server.http.get("/metrics").text
    assert 'corral_queue_wait_seconds_count{model="m"} 10.0' in metrics
    assert 'corral_requests_total{code="200",endpoint="/v1/chat/completions",model="m"} 10.0' \
        in metrics


def test_queue_full_gives_429_and_timeout_gives_503(corral: Start, smollm2: Path) -> None:
    server = corral(config(smollm2, 1, max=1, timeout="2s"))
    assert server.http.post("/admin/models/m/load").status_code == 200
    with ThreadPoolExecutor(2) as pool:
        busy = pool.submit(server.http.post, "/v1/chat/completions",
                           json=long_body(400, stream=False))
        server.wait_for(lambda: server.model_status("m")["slots_busy"] == 1)
        queued = pool.submit(server.http.post, "/v1/chat/completions",
                             json=long_body(4, stream=False))
        server.wait_for(lambda: server.model_status("m")["queue_depth"] == 1)
        full = server.http.post("/v1/chat/completions", json=long_body(4, stream=False))
        assert full.status_code == 429
        assert full.headers["retry-after"] == "1"
        assert full.json()["error"]["code"] == "queue_full"
        timed_out = queued.result()
        assert timed_out.status_code == 503, timed_out.text
        assert timed_out.json()["error"]["code"] == "queue_timeout"
        assert "retry-after" in timed_out.headers
        assert busy.result().status_code == 200
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
    with ThreadPoolExecutor(1) as pool:
        busy = pool.submit(server.http.post, "/v1/chat/completions",
                           json=long_body(300, stream=False))
        server.wait_for(lambda: server.model_status("m")["slots_busy"] == 1)
        body = b'{"model": "m", "prompt": "hi", "max_tokens": 4}'
        sock = socket.create_connection(("127.0.0.1", server.port))
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: localhost\r\nContent-Type: "
                     b"application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
        server.wait_for(lambda: server.model_status("m")["queue_depth"] == 1)
        sock.close()
        server.wait_for(lambda: server.model_status("m")["queue_depth"] == 0, timeout=1.0)
        assert server.model_status("m")["slots_busy"] == 1
        assert busy.result().status_code == 200
    # The request that left is counted as 499 and never reached the child.
    metrics = server.http.get("/metrics").text
    assert 'corral_requests_total{code="499",endpoint="/v1/completions",model="m"} 1.0' \
        in metrics
    assert 'corral_requests_total{code="200",endpoint="/v1/completions",model="m"} 0.0' \
        in metrics


def test_requests_waiting_for_a_load_are_counted_as_queued(corral: Start, smollm2: Path) -> None:
    # A cold model: the first request starts the load, the other two wait behind it. All three
    # are queued from a client's view, and /admin/status and the metrics must say so.
    server = corral(config(smollm2, 1))
    depths: list[int] = []
    with ThreadPoolExecutor(3) as pool:
        replies = [pool.submit(server.http.post, "/v1/chat/completions",
                               json=long_body(2, stream=False)) for _ in range(3)]
        while not all(r.done() for r in replies):
            status = server.model_status("m")
            if status["state"] == "starting":
                depths.append(status["queue_depth"])
                assert status["slots_busy"] == 0  # nothing is upstream before the load ends
            time.sleep(0.01)
        assert [r.result().status_code for r in replies] == [200, 200, 200]
    assert depths and max(depths) == 3
    assert server.model_status("m")["queue_depth"] == 0
