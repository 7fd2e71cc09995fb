"""Malformed requests: every one gets a 4xx OpenAI-shaped error and corral stays up."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import CorralProcess, launch

pytestmark = pytest.mark.integration

CHAT = "/v1/chat/completions"
JSON = {"Content-Type": "application/json"}

# (method, path, body, extra headers, expected status, expected error code)
CASES: list[tuple[str, str, bytes, dict[str, str], int, str]] = [
    ("POST", CHAT, b"", JSON, 400, "invalid_body"),
    ("POST", CHAT, b"{", JSON, 400, "invalid_json"),
    ("POST", CHAT, b"{'model': 'm'}", JSON, 400, "invalid_json"),
    ("POST", CHAT, b"\xff\xfe\x00", JSON, 400, "invalid_json"),
    ("POST", CHAT, b"NaN", JSON, 400, "invalid_body"),
    ("POST", CHAT, b"[]", JSON, 400, "invalid_body"),
    ("POST", CHAT, b"[{\"model\": \"m\"}]", JSON, 400, "invalid_body"),
    ("POST", CHAT, b"\"m\"", JSON, 400, "invalid_body"),
    ("POST", CHAT, b"42", JSON, 400, "invalid_body"),
    ("POST", CHAT, b"[" * 1_500, JSON, 400, "invalid_json"),  # Python's parser: RecursionError
    ("POST", CHAT, b'{"model": "m", "x": ' + b"[" * 1_500 + b"]" * 1_500 + b"}", JSON, 400,
     "invalid_json"),
    # More values than max_body / 32 (2048 here): refused before it is parsed.
    ("POST", CHAT, b'{"model": "m", "x": ' + b"[" * 20_000 + b"]" * 20_000 + b"}", JSON, 413,
     "request_too_large"),
    ("POST", CHAT, b"true", JSON, 400, "invalid_body"),
    ("POST", CHAT, b"null", JSON, 400, "invalid_body"),
    ("POST", CHAT, b"{}", JSON, 400, "model_required"),
    ("POST", CHAT, b"{\"model\": null}", JSON, 400, "model_required"),
    ("POST", CHAT, b"{\"model\": \"\"}", JSON, 400, "invalid_model"),
    ("POST", CHAT, b"{\"model\": 7}", JSON, 400, "invalid_model"),
    ("POST", CHAT, b"{\"model\": [\"m\"]}", JSON, 400, "invalid_model"),
    ("POST", CHAT, b"{\"model\": {\"name\": \"m\"}}", JSON, 400, "invalid_model"),
    ("POST", CHAT, b"{\"model\": true}", JSON, 400, "invalid_model"),
    ("POST", CHAT, b"{\"model\": \"gpt-4o\"}", JSON, 404, "model_not_found"),
    ("POST", CHAT, b"{\"model\": \"m \"}", JSON, 404, "model_not_found"),
    ("POST", CHAT, b"{\"model\": \"../m\"}", JSON, 404, "model_not_found"),
    ("POST", CHAT, b"{\"model\": \"m\"}", {"Content-Type": "text/plain"}, 415,
     "unsupported_media_type"),
    ("POST", CHAT, b"model=m", {"Content-Type": "application/x-www-form-urlencoded"}, 415,
     "unsupported_media_type"),
    ("POST", CHAT, b"{\"model\": \"m\"}", {"Content-Type": "multipart/form-data; b=x"}, 415,
     "unsupported_media_type"),
    ("POST", CHAT, b"x" * (64 * 1024 + 1), JSON, 413, "request_too_large"),
    ("GET", CHAT, b"", {}, 405, "method_not_allowed"),
    ("PUT", "/v1/completions", b"{}", JSON, 405, "method_not_allowed"),
    ("DELETE", "/v1/models", b"", {}, 405, "method_not_allowed"),
    ("GET", "/v1/nothing", b"", {}, 404, "not_found"),
    ("POST", "/admin/models/nope/load", b"", {}, 404, "model_not_found"),
    ("POST", "/admin/models/nope/unload", b"", {}, 404, "model_not_found"),
    ("GET", "/v1/models/nope", b"", {}, 404, "model_not_found"),
    ("GET", "/props", b"", {}, 400, "model_required"),
    ("GET", "/slots?model=nope", b"", {}, 404, "model_not_found"),
    ("POST", "/tokenize", b"{\"model\": 1, \"content\": \"x\"}", JSON, 400, "invalid_model"),
    ("POST", "/v1/embeddings", b"[1, 2]", JSON, 400, "invalid_body"),
]


@pytest.fixture(scope="module")
def server(
    smollm2: Path, tmp_path_factory: pytest.TempPathFactory, llama_server: str
) -> Iterator[CorralProcess]:
    # One corral for the whole module: malformed requests must not need a fresh one each.
    corral = launch(tmp_path_factory.mktemp("bad-input"), llama_server, {
        "limits": {"max_body": "64KiB", "header_timeout": "1s", "body_timeout": "1s"},
        "models": {"m": {"path": str(smollm2), "slots": 1, "ctx_per_slot": 256}},
    })
    try:
        corral.wait_healthy()
        yield corral
    finally:
        corral.close()


def check_error(response: httpx.Response, status: int, code: str) -> None:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "code"} and error["message"]
    assert error["code"] == code


@pytest.mark.parametrize(("method", "path", "body", "headers", "status", "code"), CASES,
                         ids=[f"{i}-{c[4]}-{c[5]}" for i, c in enumerate(CASES)])
def test_malformed_request(server: CorralProcess, method: str, path: str, body: bytes,
                           headers: dict[str, str], status: int, code: str) -> None:
    check_error(server.http.request(method, path, content=body, headers=headers), status, code)
    assert server.http.get("/health").status_code == 200


def test_no_mistake_loaded_a_model(server: CorralProcess) -> None:
    assert server.model("m")["state"] == "unloaded"
    assert server.children() == []


def test_slow_headers_are_cut_off(server: CorralProcess) -> None:
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", server.port), timeout=60) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\n")
        assert sock.recv(1024) == b""  # closed by corral
        took = time.monotonic() - started
    # At header_timeout (1 s); the default (10 s) would take longer than that and the margin.
    assert 1.0 <= took < 1.0 + 8.0
    assert server.http.get("/health").status_code == 200


def test_slow_body_gets_408(server: CorralProcess) -> None:
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\nContent-Type: "
                     b"application/json\r\nContent-Length: 100\r\n\r\n{\"model\":")
        sock.settimeout(60)
        answer = b""
        while b"request_timeout" not in answer and (data := sock.recv(4096)):
            answer += data
    assert answer.startswith(b"HTTP/1.1 408")
    assert b"request_timeout" in answer


def test_a_client_that_leaves_half_way_through_its_body_is_logged_as_gone(
    server: CorralProcess,
) -> None:
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\nContent-Type: "
                     b"application/json\r\nX-Request-Id: half-a-body\r\n"
                     b"Content-Length: 100\r\n\r\n{\"model\":")
    server.wait_for(lambda: "half-a-body" in server.log())
    line = next(json.loads(x) for x in server.log().splitlines() if "half-a-body" in x)
    assert line["event"] == "request" and line["status"] == 499
    assert "Traceback" not in server.log() and "Exception in ASGI" not in server.log()


def test_declared_oversize_body_is_refused_before_it_is_read(server: CorralProcess) -> None:
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\nContent-Type: "
                     b"application/json\r\nContent-Length: 999999999\r\n\r\n")
        sock.settimeout(60)
        answer = sock.recv(4096)
    assert answer.startswith(b"HTTP/1.1 413")


json_values: st.SearchStrategy[Any] = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)
# Printable without spaces: httpx itself refuses values with leading or trailing blanks.
header_values = st.text(st.characters(min_codepoint=33, max_codepoint=126), min_size=1,
                        max_size=40)


@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    path=st.sampled_from([CHAT, "/v1/completions", "/v1/embeddings", "/completion",
                          "/tokenize", "/v1/messages", "/props", "/admin/models/x/load"]),
    body=st.one_of(
        st.binary(max_size=300),
        json_values.map(lambda v: json.dumps(v).encode()),
        st.dictionaries(st.sampled_from(["model", "messages", "prompt", "stream"]), json_values,
                        max_size=4).map(lambda v: json.dumps(v).encode()),
    ),
    content_type=st.sampled_from(["application/json", "text/plain", "", "application/json; x",
                                  "application/vnd.api+json"]),
    extra=st.dictionaries(st.sampled_from(["X-Request-Id", "Authorization", "X-Api-Key",
                                           "Accept", "X-Anything"]), header_values, max_size=3),
)
def test_fuzzed_requests_never_get_a_5xx(
    server: CorralProcess, path: str, body: bytes, content_type: str, extra: dict[str, str]
) -> None:
    headers = {**extra, **({"Content-Type": content_type} if content_type else {})}
    if b'"model": "m"' in body:
        body = body.replace(b'"model": "m"', b'"model": "m?"')  # never start real work here
    response = server.http.request("GET" if path == "/props" else "POST", path,
                                   content=body, headers=headers)
    assert response.status_code < 500, (response.status_code, response.text)
    if response.status_code >= 400:
        assert set(response.json()["error"]) == {"message", "type", "code"}


# Mistakes only the model can judge: they reach the real llama-server, which must not turn any
# of them into a 5xx either (where it would, corral refuses them first).
USER = [{"role": "user", "content": "Hi"}]
MODEL_CASES: list[tuple[str, dict[str, Any]]] = [
    (CHAT, {"messages": "hello"}),
    (CHAT, {"messages": [{"role": "user"}]}),
    (CHAT, {"messages": USER, "max_tokens": "x"}),
    (CHAT, {"messages": USER, "stream": "yes"}),
    (CHAT, {"messages": USER, "n": 3}),
    (CHAT, {"messages": USER, "grammar": "root ::= ???"}),
    (CHAT, {"messages": USER, "tools": "x"}),  # llama-server: 500
    (CHAT, {"messages": USER, "tools": [1]}),  # llama-server: 500
    (CHAT, {"messages": USER, "tools": [{}]}),  # llama-server: 500
    (CHAT, {"messages": [{"role": "user", "content": [  # llama-server without --mmproj: 500
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}}]}]}),
    (CHAT, {"messages": USER, "tools": [{"type": "function"}]}),  # llama-server: 500
    ("/v1/messages", {"max_tokens": 1}),  # llama-server: 500
    ("/v1/messages", {"messages": USER, "max_tokens": 1, "tools": [{}]}),  # llama-server: ignored
    ("/v1/responses", {"input": "Hi", "tools": [{"type": "function"}]}),  # llama-server: 500
    ("/v1/messages/count_tokens", {}),  # llama-server: 500
    ("/v1/messages", {"messages": "x", "max_tokens": 1}),
    ("/v1/completions", {"prompt": 5}),
    ("/v1/completions", {"prompt": "Hi", "lora": "x"}),
    ("/completion", {"prompt": [[-5]]}),
    ("/tokenize", {"content": 5}),
    ("/detokenize", {"tokens": ["a"]}),
    ("/detokenize", {"tokens": [-1]}),
    ("/detokenize", {"tokens": [99999999]}),  # llama-server: 500 (out of the vocabulary)
]


@pytest.mark.parametrize(("path", "body"), MODEL_CASES,
                         ids=[f"{p} {json.dumps(b)[:40]}" for p, b in MODEL_CASES])
def test_mistakes_the_model_judges_get_a_4xx(
    server: CorralProcess, path: str, body: dict[str, Any]
) -> None:
    response = server.http.post(path, json={"model": "m", **body})
    assert 400 <= response.status_code < 500, response.text
    assert response.json()["error"]["message"]


def test_still_healthy_after_everything(server: CorralProcess) -> None:
    assert server.http.get("/health").json() == {"status": "ok"}
    assert server.proc.poll() is None
    reply = server.http.post(CHAT, json={"model": "m", "messages": [
        {"role": "user", "content": "Hi"}], "max_tokens": 2})
    assert reply.status_code == 200



def test_well_formed_tools_still_reach_the_model(server: CorralProcess) -> None:
    # corral's own checks on tools must not refuse what llama-server accepts.
    tool = {"type": "function", "function": {"name": "get_time", "parameters": {
        "type": "object", "properties": {}}}}
    reply = server.http.post(CHAT, json={"model": "m", "messages": USER, "tools": [tool],
                                         "max_tokens": 2})
    assert reply.status_code == 200, reply.text
    reply = server.http.post("/v1/messages", json={"model": "m", "messages": USER,
                                                   "max_tokens": 2})
    assert reply.status_code == 200, reply.text
    # The Anthropic and Responses tool shapes are not the chat one.
    anthropic = {"name": "get_time", "description": "the time now",
                 "input_schema": {"type": "object", "properties": {}}}
    reply = server.http.post("/v1/messages", json={"model": "m", "messages": USER,
                                                   "tools": [anthropic], "max_tokens": 2})
    assert reply.status_code == 200, reply.text
    assert reply.json()["type"] == "message"
    flat = {"type": "function", "name": "get_time", "parameters": {"type": "object"}}
    reply = server.http.post("/v1/responses", json={"model": "m", "input": "Hi",
                                                    "tools": [flat], "max_output_tokens": 2})
    assert reply.status_code == 200, reply.text
