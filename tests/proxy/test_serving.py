"""Serving through corral with the real llama-server and SmolLM2 (the official openai client)."""

from __future__ import annotations

import json
import socket
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import ENDLESS, CorralProcess, endless_chat, holding_a_slot

pytestmark = pytest.mark.integration

Start = Callable[..., CorralProcess]
CHAT = [{"role": "user", "content": "Say hello."}]
# The model may end its answer at once (its sampling is seeded at random): an empty answer
# would fail a test about serving, not about the model.
WHATEVER_IT_SAMPLES = {"ignore_eos": True}


def two_models(smollm2: Path, **extra: Any) -> dict[str, Any]:
    # Requests queued behind others may wait long on a loaded machine: not the default 60 s.
    queue = {"timeout": "5m"}
    return {
        "models": {
            # ENDLESS: a test may hold a slot with a stream that ends only when it leaves.
            "smollm2": {"path": str(smollm2), "aliases": ["smol"], "slots": 2,
                        "ctx_per_slot": 1024, "args": ENDLESS, "queue": queue},
            "smollm2-wide": {"path": str(smollm2), "slots": 3, "ctx_per_slot": 512,
                             "queue": queue},
        },
        **extra,
    }


def test_two_models_from_one_gguf_with_their_own_slots(corral: Start, smollm2: Path) -> None:
    server = corral(two_models(smollm2))
    oai = server.openai()
    for name in ("smollm2", "smollm2-wide"):
        reply = oai.chat.completions.create(model=name, messages=CHAT, max_tokens=8,
                                            extra_body=WHATEVER_IT_SAMPLES)
        assert reply.choices[0].message.content
        assert reply.model == name
    assert len(server.children()) == 2
    slots = server.http.get("/slots", params={"model": "smollm2"}).json()
    assert [s["n_ctx"] for s in slots] == [1024, 1024]
    wide = server.http.get("/slots", params={"model": "smollm2-wide"}).json()
    assert [s["n_ctx"] for s in wide] == [512, 512, 512]
    listed = {m["id"]: m["corral"] for m in oai.models.list().model_dump()["data"]}
    assert listed["smollm2"] == {"state": "ready", "slots": 2, "ctx_per_slot": 1024,
                                 "alias_of": None}
    assert listed["smol"]["alias_of"] == "smollm2"
    assert listed["smollm2-wide"]["slots"] == 3


def test_chat_streamed_and_not_and_completions(corral: Start, smollm2: Path) -> None:
    server = corral(two_models(smollm2))
    oai = server.openai()
    reply = oai.chat.completions.create(model="smol", messages=CHAT, max_tokens=16,
                                        extra_body=WHATEVER_IT_SAMPLES)
    assert reply.choices[0].message.content
    assert reply.usage is not None and reply.usage.completion_tokens > 0

    chunks = list(oai.chat.completions.create(
        model="smol", messages=CHAT, max_tokens=16, stream=True,
        extra_body=WHATEVER_IT_SAMPLES))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert len(chunks) > 3 and text.strip()

    completion = oai.completions.create(model="smollm2", prompt="The capital of France is",
                                        max_tokens=8, temperature=0)
    assert completion.choices[0].text


def test_stream_is_passed_through_as_it_is_produced(corral: Start, smollm2: Path) -> None:
    server = corral(two_models(smollm2))
    assert server.http.post("/admin/models/smollm2/load").status_code == 200
    with server.http.stream("POST", "/v1/chat/completions",
                            json=endless_chat("smollm2")) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        chunks = response.iter_raw()
        raw = b""
        while b'"content":"' not in raw:
            raw += next(chunks)
        # Tokens reached us from a generation that never ends by itself: corral did not hold
        # the stream back (a buffering proxy would deliver nothing before the end).
        slots = server.http.get("/slots", params={"model": "smollm2"}).json()
        assert [s["is_processing"] for s in slots].count(True) == 1

    # And a whole stream arrives whole, its last events included.
    body = {"model": "smollm2", "messages": CHAT, "max_tokens": 16, "stream": True,
            "ignore_eos": True}
    with server.http.stream("POST", "/v1/chat/completions", json=body) as response:
        assert response.status_code == 200
        raw = response.read()
    events = [line for line in raw.decode().split("\n") if line.startswith("data: ")]
    assert events[-1] == "data: [DONE]"
    # Tokens that end inside a UTF-8 character are merged, so count tokens, not events.
    final = json.loads(events[-2][len("data: "):])
    assert final["timings"]["predicted_n"] == 16
    assert final["choices"][0]["finish_reason"] == "length"


def test_embeddings(corral: Start, smollm2: Path) -> None:
    server = corral({"models": {"embed": {"path": str(smollm2), "slots": 1,
                                          "ctx_per_slot": 512,
                                          "args": ["--embeddings", "--pooling", "mean"]}}})
    result = server.openai().embeddings.create(model="embed", input=["hello", "world"])
    assert len(result.data) == 2
    assert len(result.data[0].embedding) == 576  # SmolLM2-135M's n_embd


def test_concurrent_requests_during_a_cold_load_share_one_process(
    corral: Start, smollm2: Path
) -> None:
    server = corral(two_models(smollm2))
    assert server.children() == []

    def ask(_: int) -> int:
        body = {"model": "smollm2-wide", "prompt": "Hi", "max_tokens": 4}
        return server.http.post("/v1/completions", json=body).status_code

    with ThreadPoolExecutor(8) as pool:
        codes = list(pool.map(ask, range(8)))
    assert codes == [200] * 8
    assert len(server.children()) == 1
    assert server.model("smollm2-wide")["loads"] == 1
    assert server.model("smollm2")["state"] == "unloaded"


def test_idle_model_is_stopped_after_its_ttl_and_reloaded(corral: Start, smollm2: Path) -> None:
    config = two_models(smollm2)
    # Long enough that a busy machine still sees the child between the answer and the checks.
    config["models"]["smollm2"]["ttl"] = "8s"
    server = corral(config)
    oai = server.openai()
    oai.completions.create(model="smollm2", prompt="Hi", max_tokens=2)
    pid = server.model("smollm2")["pid"]
    assert [p.pid for p in server.children()] == [pid]
    server.wait_for(lambda: server.model("smollm2")["state"] == "unloaded")
    info = server.model("smollm2")
    assert info["last_stop_reason"] == "idle"
    assert server.children() == []
    oai.completions.create(model="smollm2", prompt="Hi", max_tokens=2)
    info = server.model("smollm2")
    assert info["state"] == "ready" and info["loads"] == 2 and info["pid"] != pid


def test_admin_load_and_unload(corral: Start, smollm2: Path) -> None:
    server = corral(two_models(smollm2))
    loaded = server.http.post("/admin/models/smol/load")
    assert loaded.status_code == 200
    info = loaded.json()
    assert info["name"] == "smollm2" and info["state"] == "ready"
    assert info["slots"] == 2 and info["ctx_per_slot"] == 1024
    assert info["pid"] == server.children()[0].pid and info["socket"].endswith(".sock")
    assert info["uptime_seconds"] >= 0

    unloaded = server.http.post("/admin/models/smollm2/unload")
    assert unloaded.status_code == 200
    assert unloaded.json()["state"] == "unloaded"
    assert unloaded.json()["last_stop_reason"] == "manual"
    assert server.children() == []
    missing = server.http.post("/admin/models/nope/load")
    assert missing.status_code == 404
    assert "available models: smollm2, smollm2-wide, smol" in missing.json()["error"]["message"]


def test_invalid_gguf_gives_503_with_the_reason_and_others_keep_serving(
    corral: Start, smollm2: Path, tmp_path: Path
) -> None:
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(b"GGUF" + b"\x00" * 64)  # the magic, then nonsense
    truncated = tmp_path / "truncated.gguf"
    with smollm2.open("rb") as whole:
        truncated.write_bytes(whole.read(8 * 2**20))  # the header, a fraction of the weights
    config = two_models(smollm2)
    config["models"]["broken"] = {"path": str(broken), "slots": 1, "ctx_per_slot": 256}
    config["models"]["truncated"] = {"path": str(truncated), "slots": 1, "ctx_per_slot": 256}
    server = corral(config)
    chat = {"messages": CHAT, "max_tokens": 4}

    response = server.http.post("/v1/chat/completions", json={"model": "broken", **chat})
    assert response.status_code == 503
    assert int(response.headers["retry-after"]) >= 1
    error = response.json()["error"]
    assert error["code"] == "model_load_failed"
    assert "cannot read the model file" in error["message"]  # corral reads the header first
    assert server.model("broken")["state"] == "failed"

    response = server.http.post("/v1/chat/completions", json={"model": "truncated", **chat})
    assert response.status_code == 503
    message = response.json()["error"]["message"]
    assert "llama-server exited with code" in message
    assert "last lines from llama-server" in message
    assert "failed to load model" in message  # llama-server's own words
    info = server.model("truncated")
    assert info["state"] == "failed" and "exited with code" in info["last_error"]
    assert server.children() == []

    reply = server.openai().chat.completions.create(model="smol", messages=CHAT, max_tokens=4)
    assert reply.choices[0].message.content


def test_request_errors_are_openai_shaped(corral: Start, smollm2: Path) -> None:
    server = corral(two_models(smollm2))
    post = server.http.post
    cases = [
        (post("/v1/chat/completions", json={"messages": CHAT}), 400, "model_required"),
        (post("/v1/chat/completions", content=b"{nope"), 400, "invalid_json"),
        (post("/v1/chat/completions", json=[1]), 400, "invalid_body"),
        (post("/v1/chat/completions", json={"model": 5}), 400, "invalid_model"),
        (post("/v1/chat/completions", json={"model": "gpt-4"}), 404, "model_not_found"),
        (server.http.get("/v1/chat/completions"), 405, "method_not_allowed"),
        (server.http.get("/nowhere"), 404, "not_found"),
        (server.http.get("/props"), 400, "model_required"),
    ]
    for response, status, code in cases:
        assert response.status_code == status, response.text
        assert set(response.json()["error"]) == {"message", "type", "code"}
        assert response.json()["error"]["code"] == code
    assert "available models: smollm2, smollm2-wide, smol" in cases[4][0].json()["error"][
        "message"]
    assert server.children() == []  # no mistake loaded anything
    assert server.http.get("/health").json() == {"status": "ok"}


def test_default_model_serves_clients_written_for_one_llama_server(
    corral: Start, smollm2: Path
) -> None:
    server = corral(two_models(smollm2, default_model="smol"))
    # /slots never loads a model: monitoring must not keep one from going idle.
    slots = server.http.get("/slots")
    assert slots.status_code == 503 and server.children() == []
    props = server.http.get("/props")
    assert props.status_code == 200
    assert props.json()["total_slots"] == 2
    tokens = server.http.post("/tokenize", json={"content": "hello world"})
    assert tokens.status_code == 200 and tokens.json()["tokens"]
    reply = server.http.post("/completion", json={"prompt": "Hi", "n_predict": 4})
    assert reply.status_code == 200 and "content" in reply.json()
    assert len(server.http.get("/slots").json()) == 2
    assert len(server.children()) == 1
    assert reply.headers["x-request-id"]


def test_a_finished_response_has_already_released_its_slot(corral: Start, smollm2: Path) -> None:
    # A client that sends its next request the moment a response ends must find the counts free.
    server = corral(two_models(smollm2))
    body = {"model": "smollm2", "messages": CHAT, "max_tokens": 2}
    for _ in range(10):
        assert server.http.post("/v1/chat/completions", json=body).status_code == 200
        assert server.model("smollm2")["in_flight"] == 0
        assert server.http.get("/slots", params={"model": "smollm2"}).status_code == 200
        assert server.model("smollm2")["in_flight"] == 0


def test_client_disconnect_frees_the_slot(corral: Start, smollm2: Path) -> None:
    server = corral(two_models(smollm2))

    def busy() -> bool:
        slots = server.http.get("/slots", params={"model": "smollm2"}).json()
        return any(s["is_processing"] for s in slots)

    with holding_a_slot(server, "smollm2"):
        assert busy()
    # Leaving the block closed the client's connection mid-stream. The generation never ends
    # by itself: only corral closing it upstream frees the slot.
    server.wait_for(lambda: not busy())
    server.wait_for(lambda: server.model("smollm2")["in_flight"] == 0)
    logs = [json.loads(line) for line in server.log().splitlines() if line.startswith("{")]
    assert any(e.get("event") == "request" and e.get("client_gone") for e in logs)
    assert ('corral_requests_total{code="499",endpoint="/v1/chat/completions",model="smollm2"} '
            '1.0') in server.http.get("/metrics").text


def test_a_client_that_leaves_a_non_streamed_request_frees_the_slot(
    corral: Start, smollm2: Path
) -> None:
    # A non-streamed answer has no headers until the generation ends; corral must not wait for
    # them to notice the client is gone. This one never ends by itself (ENDLESS).
    server = corral({"models": {"smollm2": {"path": str(smollm2), "slots": 2,
                                            "ctx_per_slot": 1024, "args": ENDLESS}}})
    body = json.dumps(endless_chat("smollm2", stream=False)).encode()

    def busy() -> bool:
        slots = server.http.get("/slots", params={"model": "smollm2"}).json()
        return any(s["is_processing"] for s in slots)

    server.wait_for(lambda: server.http.post("/v1/chat/completions", json={
        "model": "smollm2", "messages": CHAT, "max_tokens": 1}).status_code == 200)
    # The client leaves (closes its connection) once its request is being generated.
    with socket.create_connection(("127.0.0.1", server.port)) as client:
        client.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\nContent-Type: "
                       b"application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
        server.wait_for(busy)
    # corral notices the closed connection on its next look at the client.
    server.wait_for(lambda: server.model("smollm2")["in_flight"] == 0)
    # llama-server looks at a non-streamed request's connection only after a second without any
    # result from any task; each /slots read is one, so the looks leave it 2 s between them.
    server.wait_for(lambda: not busy(), interval=2.0)
    assert server.model_status("smollm2")["slots_busy"] == 0
    logs = [json.loads(line) for line in server.log().splitlines() if line.startswith("{")]
    assert any(e.get("event") == "request" and e.get("status") == 499 for e in logs), \
        [e for e in logs if e.get("event", "").startswith("request")]
