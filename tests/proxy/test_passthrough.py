"""What corral forwards: the body byte for byte, no client credentials, every llama.cpp route."""

from __future__ import annotations

import base64
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from tests.conftest import FAKE_LLAMA_SERVER, CorralProcess

pytestmark = pytest.mark.integration

Start = Callable[..., CorralProcess]
CLIENT_KEY = "client-secret-0123456789abcdef"

# Valid JSON that any parse-and-serialise step would rewrite: whitespace (tabs, CRLF, trailing),
# "model" after the other keys, escaped and raw UTF-8, an escaped slash and quote, a surrogate
# pair, a float beyond double precision, an integer beyond 64 bits and an exponent.
RAW_BODY = (
    b'\n {  "messages"\t:[{"role":"user" , "content":"caf\\u00e9 / caf\xc3\xa9 \\ud83d\\ude00'
    b' \\"q\\" \\/"}],\r\n"model" :"echo","temperature":0.1000000000000000055511151231257827,'
    b'"seed":123456789012345678901234567890,"top_p":1E-2,"max_tokens":2 ,'
    b'"x_extra":{"nested":[null,true,false,-0.0]}}  \n'
)


def test_the_body_goes_upstream_byte_for_byte_without_the_clients_key(
    corral: Start, smollm2: Path
) -> None:
    # A fake child, because the real llama-server cannot show the bytes and headers it got.
    server = corral({
        "models": {"echo": {"path": str(smollm2), "binary": FAKE_LLAMA_SERVER, "slots": 1,
                            "ctx_per_slot": 256, "env": {"FAKE_MODE": "echo_body"}}},
        "auth": {"keys": [{"name": "client", "key": CLIENT_KEY}]},
    })
    assert json.loads(RAW_BODY)["model"] == "echo"  # valid JSON, routed by its "model"

    def in_pieces() -> Iterator[bytes]:
        # Chunked, cut inside the two-byte "é": corral must join the pieces, not decode them.
        cut = RAW_BODY.index(b"\xc3") + 1
        yield RAW_BODY[:7]
        yield RAW_BODY[7:cut]
        yield RAW_BODY[cut:]

    sent: list[tuple[dict[str, str], bytes | Iterator[bytes]]] = [
        ({"Authorization": f"Bearer {CLIENT_KEY}", "X-Api-Key": CLIENT_KEY}, RAW_BODY),
        ({"X-Api-Key": CLIENT_KEY}, in_pieces()),
    ]
    for credentials, content in sent:
        reply = server.http.post("/v1/chat/completions", content=content, headers={
            **credentials, "Content-Type": "application/json; charset=utf-8",
            "X-Trace-Note": "kept"})
        assert reply.status_code == 200, reply.text
        echoed = reply.json()
        assert base64.b64decode(echoed["body_base64"]) == RAW_BODY

        headers = [(name, value) for name, value in echoed["headers"]]
        names = [name for name, _ in headers]
        (child,) = server.children(None)
        private = psutil.Process(child.pid).environ()["LLAMA_API_KEY"]
        # The child gets corral's private key for it, once, and never the client's key.
        assert [v for n, v in headers if n == "authorization"] == [f"Bearer {private}"]
        assert "x-api-key" not in names
        assert not any(CLIENT_KEY in value for _, value in headers)
        # Other headers pass: the credentials were dropped on purpose, not with everything.
        assert ("x-trace-note", "kept") in headers
        assert ("content-type", "application/json; charset=utf-8") in headers
        assert ("content-length", str(len(RAW_BODY))) in headers


def llama_error(status: int, type_: str, words: str) -> Callable[[Any], bool]:
    """llama-server's own error: ``{"error": {"code": <the status as a number>, "type",
    "message"}}``. corral's errors have a string code, so the shape tells who answered."""
    def check(body: Any) -> bool:
        error = body["error"]
        return (error["code"] == status and error["type"] == type_
                and words in error["message"])
    return check


def test_every_llama_cpp_endpoint_reaches_the_real_llama_server(
    corral: Start, smollm2: Path
) -> None:
    # /v1/chat/completions, /v1/completions, /completion, /tokenize, /props, /slots and
    # /v1/embeddings (with --embeddings) are exercised in test_serving.py; here: the rest.
    server = corral({"models": {"m": {"path": str(smollm2), "slots": 1, "ctx_per_slot": 512}}})
    chat = {"model": "m", "messages": [{"role": "user", "content": "Hi"}]}
    tokens = server.http.post("/tokenize", json={"model": "m", "content": "hello"}).json()
    # A model started without --embeddings / --reranking: corral says which config key enables
    # them (400) before any child is asked, instead of llama-server's 501 naming its flag.
    def not_enabled(code: str, flag: str) -> Callable[[Any], bool]:
        return lambda b: (b["error"]["code"] == code
                          and f"add {flag} to its args (models.m.args)" in b["error"]["message"])

    no_embeddings = not_enabled("embeddings_not_enabled", "--embeddings")
    no_reranking = not_enabled("rerank_not_enabled", "--reranking")
    rerank = {"model": "m", "query": "a", "documents": ["a", "b"]}

    # path, body, the status llama-server answers, what only llama-server's answer looks like
    cases: list[tuple[str, dict[str, Any], int, Callable[[Any], bool]]] = [
        # ignore_eos: an answer ended at once would count one token, not two.
        ("/chat/completions", {**chat, "max_tokens": 2, "ignore_eos": True}, 200,
         lambda b: b["object"] == "chat.completion" and b["usage"]["completion_tokens"] == 2),
        ("/completions", {"model": "m", "prompt": "Hi", "n_predict": 2, "ignore_eos": True},
         200,
         lambda b: b["tokens_predicted"] == 2 and "content" in b),
        ("/v1/messages", {**chat, "max_tokens": 2, "ignore_eos": True}, 200,  # Anthropic's
         lambda b: b["type"] == "message" and b["content"][0]["type"] == "text"),
        ("/v1/messages/count_tokens", chat, 200,
         lambda b: isinstance(b["input_tokens"], int) and b["input_tokens"] > 1),
        ("/v1/responses", {"model": "m", "input": "Hi", "max_output_tokens": 2}, 200,
         lambda b: b["object"] == "response" and b["output"]),
        ("/detokenize", {"model": "m", **tokens}, 200, lambda b: b["content"] == "hello"),
        ("/apply-template", chat, 200,
         lambda b: "<|im_start|>user\nHi<|im_end|>" in b["prompt"]),  # SmolLM2's template
        ("/v1/embeddings", {"model": "m", "input": "hi"}, 400, no_embeddings),
        ("/embeddings", {"model": "m", "content": "hi"}, 400, no_embeddings),
        ("/embedding", {"model": "m", "content": "hi"}, 400, no_embeddings),
        ("/v1/rerank", rerank, 400, no_reranking),
        ("/rerank", rerank, 400, no_reranking),
        ("/reranking", rerank, 400, no_reranking),
        # SmolLM2 has no fill-in-the-middle tokens: llama-server refuses with 501 Not
        # Implemented, and corral passes that on unchanged.
        ("/infill", {"model": "m", "input_prefix": "def f(", "input_suffix": "):",
                     "n_predict": 2}, 501,
         llama_error(501, "not_supported_error", "Infill is not supported by this model")),
        # A request llama-server finds wrong stays its 400: corral does not make it a 5xx.
        ("/v1/chat/completions", {"model": "m", "messages": "Hi", "max_tokens": 2}, 400,
         llama_error(400, "invalid_request_error", "'messages' to be an array")),
    ]
    failures = []
    for path, body, status, from_llama_server in cases:
        reply = server.http.post(path, json=body)
        try:
            answered = reply.status_code == status and from_llama_server(reply.json())
        except (ValueError, KeyError, IndexError, TypeError):
            answered = False
        if not answered:
            failures.append(f"{path}: {reply.status_code} {reply.text[:300]}")
    assert not failures, "\n".join(failures)
    assert server.model("m")["loads"] == 1  # no answer above took the child down
