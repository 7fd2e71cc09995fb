"""corral standing in for one llama-server, end to end: what its clients and a browser do.

One corral for the module, set up as the llama-server drop-in is (one model, default_model,
unknown names routed to it), listening on IPv4 and IPv6 loopback at once.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import ollama
import pytest

from tests.conftest import CorralProcess, launch

pytestmark = pytest.mark.integration
PAGE = "http://localhost:5173"  # a web app served from this machine (a dev server's port)


@pytest.fixture(scope="module")
def server(
    smollm2: Path, tmp_path_factory: pytest.TempPathFactory, llama_server: str
) -> Iterator[CorralProcess]:
    corral = launch(tmp_path_factory.mktemp("dropin"), llama_server, {
        "listen": {"host": ["127.0.0.1", "::1"]},
        "models": {"m": {"path": str(smollm2), "slots": 1, "ctx_per_slot": 512},
                   "e": {"path": str(smollm2), "slots": 1, "ctx_per_slot": 256,
                         "args": ["--embeddings", "--pooling", "mean"]}},
        "default_model": "m",
        "unknown_model_to_default": True,
    })
    try:
        corral.wait_healthy()
        yield corral
    finally:
        corral.close()


def chat(model: str = "m") -> dict[str, object]:
    return {"model": model, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}


def test_a_browser_calls_corral_from_another_origin(server: CorralProcess) -> None:
    # What fetch() with a JSON body and a key does from a page on another origin: a preflight,
    # then the request, whose answer the page may read only with its origin allowed.
    preflight = server.http.options("/v1/chat/completions", headers={
        "Origin": PAGE, "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization, content-type"})
    assert preflight.status_code == 200, preflight.text
    assert preflight.headers["access-control-allow-origin"] == PAGE
    assert "POST" in preflight.headers["access-control-allow-methods"].split(", ")
    assert {"authorization", "content-type"} <= {
        h.strip().lower() for h in preflight.headers["access-control-allow-headers"].split(",")}

    answer = server.http.post("/v1/chat/completions", json=chat(), headers={
        "Origin": PAGE, "Authorization": "Bearer none", "Sec-Fetch-Site": "cross-site",
        "Sec-Fetch-Mode": "cors"})
    assert answer.status_code == 200, answer.text
    assert answer.headers.get_list("access-control-allow-origin") == [PAGE]
    assert answer.json()["choices"][0]["message"]["role"] == "assistant"


def test_model_names_corral_does_not_know_reach_the_default(server: CorralProcess) -> None:
    client = server.openai()
    for name in ("gpt-3.5-turbo", "davinci-002", "ggml-org/models:Q4_K_M"):
        reply = client.chat.completions.create(
            model=name, messages=[{"role": "user", "content": "Hi"}], max_tokens=2)
        assert reply.choices[0].message.role == "assistant"
    assert sorted(m.id for m in client.models.list()) == ["e", "m"]


@pytest.mark.parametrize(("path", "body", "field"), [
    ("/chat/completions", chat("test"), "choices"),
    ("/completions", {"prompt": "Hi", "max_tokens": 2}, "content"),
    ("/responses", {"model": "m", "input": "Hi", "max_output_tokens": 2}, "output"),
    ("/chat/completions/input_tokens", chat(), "input_tokens"),
])
def test_paths_without_v1_are_served(
    server: CorralProcess, path: str, body: dict[str, object], field: str
) -> None:
    answer = server.http.post(path, json=body)
    assert answer.status_code == 200, answer.text
    assert field in answer.json()


def test_models_list_llama_servers_fields(server: CorralProcess) -> None:
    assert server.http.post("/tokenize", json={"content": "Hi"}).status_code == 200  # loaded
    entry = next(e for e in server.http.get("/models").json()["data"] if e["id"] == "m")
    assert entry["id"] == "m" and entry["aliases"] == ["m"]
    assert entry["architecture"]["input_modalities"] == ["text"]
    # Placed: the context each request gets.
    assert entry["meta"]["n_ctx"] == 512 and entry["meta"]["n_vocab"] == 49152


def test_every_listed_address_is_served(server: CorralProcess) -> None:
    for url in (f"http://127.0.0.1:{server.port}", f"http://[::1]:{server.port}"):
        assert httpx.get(url + "/health", timeout=30).json() == {"status": "ok"}, url


def test_embeddings_need_a_model_started_for_them(server: CorralProcess) -> None:
    refused = server.http.post("/v1/embeddings", json={"model": "m", "input": "Hi"})
    assert refused.status_code == 400, refused.text
    assert "add --embeddings to its args (models.m.args)" in refused.json()["error"]["message"]
    served = server.http.post("/v1/embeddings", json={"model": "e", "input": "Hi"})
    assert served.status_code == 200, served.text
    assert served.json()["data"][0]["embedding"]


def test_an_ollama_client_naming_an_unknown_model_reaches_the_default(
    server: CorralProcess,
) -> None:
    # An Ollama client pointed at a single-model corral names a model of its own (Open
    # WebUI's last choice, a script's "llama3.2"): generation and embeddings go to the
    # default, as OpenAI requests do; what describes models still names only the real ones.
    with ollama.Client(host=server.url, timeout=240) as client:
        for name in ("llama3.2", "llama3.2:latest", "qwen3:8b"):
            reply = client.chat(model=name, messages=[{"role": "user", "content": "Hi"}],
                                options={"num_predict": 2})
            assert reply.done and reply.model == name and reply.eval_count == 2
        made = client.generate(model="llama3.2", prompt="Hi", options={"num_predict": 2})
        assert made.done and made.eval_count == 2
        # A real name, with or without its tag, is that model: here the embedding one.
        assert len(client.embed(model="e:latest", input="hi").embeddings[0]) == 576
        assert sorted(m.model or "" for m in client.list().models) == ["e:latest", "m:latest"]
        with pytest.raises(ollama.ResponseError) as unknown:
            client.show("llama3.2")
        assert unknown.value.status_code == 404
