"""What a client written for one llama-server notices, answered without loading a model.

In-process (``create_app`` over httpx's ASGI transport): every answer here is corral's own,
given before any child is started (routing, CORS, the model list, the embeddings check), so no
llama-server is needed. ``tests/proxy/test_dropin_serving.py`` runs the same paths end to end.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from corral.config import load_config, parse_config
from corral.errors import ConfigError
from corral.proxy.routing import INFERENCE_PATHS
from corral.root import Corral, create_app

Client = Callable[..., AbstractAsyncContextManager[httpx.AsyncClient]]
EMBEDDINGS = ("/v1/embeddings", "/embeddings", "/embedding")
RERANK = ("/v1/rerank", "/v1/reranking", "/rerank", "/reranking")


@pytest.fixture
def client(tmp_path: Path) -> Client:
    """An in-process corral with ``extra`` merged into a two-model config (``chat`` with an
    alias, ``embed`` started for embeddings), ``chat`` the default."""
    @asynccontextmanager
    async def start(**extra: Any) -> AsyncIterator[httpx.AsyncClient]:
        path = tmp_path / "corral.yaml"
        model = {"path": str(tmp_path / "m.gguf"), "slots": 1, "ctx_per_slot": 256}
        path.write_text(yaml.safe_dump({
            "models": {"chat": {**model, "aliases": ["smol"]},
                       "embed": {**model, "args": ["--embeddings"]}},
            "default_model": "chat",
            "devices": [{"id": "cpu", "memory": "8GiB"}],
            "state_file": str(tmp_path / "children.json"),
            **extra,
        }))
        corral = Corral(load_config(path))
        app = create_app(corral.config, corral)
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                     base_url="http://127.0.0.1:8080") as http:
            yield http
    return start


def error(answer: httpx.Response, status: int, code: str) -> str:
    assert answer.status_code == status, answer.text
    assert answer.json()["error"]["code"] == code, answer.text
    return str(answer.json()["error"]["message"])


@pytest.mark.parametrize("name", ["gpt-3.5-turbo", "davinci-002", "test",
                                  "ggml-org/models:Q4_K_M"])
async def test_unknown_model_names_are_refused_by_default(client: Client, name: str) -> None:
    async with client() as http:
        answer = await http.post("/v1/embeddings", json={"model": name, "input": "x"})
    assert f"{name!r}" in error(answer, 404, "model_not_found")


@pytest.mark.parametrize("name", ["gpt-3.5-turbo", "davinci-002", "test",
                                  "ggml-org/models:Q4_K_M", ""])
async def test_unknown_model_names_go_to_the_default_when_asked(
    client: Client, name: str
) -> None:
    # The embeddings check answers for the model the request was routed to, before any load:
    # the message names "chat", the default, not what the client sent.
    async with client(unknown_model_to_default=True) as http:
        answer = await http.post("/v1/embeddings", json={"model": name, "input": "x"})
        listed = (await http.get("/v1/models")).json()["data"]
    assert error(answer, 400, "embeddings_not_enabled").startswith("model 'chat' ")
    assert sorted(e["id"] for e in listed) == ["chat", "embed", "smol"]


async def test_a_known_model_is_not_replaced_by_the_default(client: Client) -> None:
    async with client(unknown_model_to_default=True) as http:
        answer = await http.post("/v1/rerank", json={"model": "embed", "query": "q",
                                                     "documents": ["d"]})
    assert error(answer, 400, "rerank_not_enabled").startswith("model 'embed' ")


async def test_a_key_limited_to_other_models_still_gets_404(client: Client) -> None:
    keys = {"keys": [{"key": "team-key-0123456789", "scopes": ["inference"],
                      "models": ["embed"]}]}
    async with client(unknown_model_to_default=True, auth=keys) as http:
        answer = await http.post(
            "/v1/embeddings", json={"model": "gpt-3.5-turbo", "input": "x"},
            headers={"Authorization": "Bearer team-key-0123456789"})
    message = error(answer, 404, "model_not_found")
    assert "'gpt-3.5-turbo'" in message and "chat" not in message


def test_routing_unknown_names_needs_a_default_model() -> None:
    with pytest.raises(ConfigError, match="unknown_model_to_default: needs a default_model"):
        parse_config({"models": {"m": {"path": "m.gguf"}}, "unknown_model_to_default": True})


@pytest.mark.parametrize("path", EMBEDDINGS + RERANK)
async def test_embeddings_and_rerank_need_a_model_started_for_them(
    client: Client, path: str
) -> None:
    async with client() as http:
        answer = await http.post(path, json={"model": "smol", "input": "x", "query": "q",
                                             "documents": ["d"]})
    message = error(answer, 400, "rerank_not_enabled" if path in RERANK
                    else "embeddings_not_enabled")
    flag = "--reranking" if path in RERANK else "--embeddings"
    # corral's config key, not llama-server's command line to start it with.
    assert f"add {flag} to its args (models.chat.args)" in message


@pytest.mark.parametrize("path", [
    "/responses", "/chat/completions", "/completions", "/embeddings", "/rerank",
    "/chat/completions/input_tokens", "/responses/input_tokens", "/v1/reranking",
    "/v1/chat/completions/control", "/v1/systemone",
])
async def test_llama_servers_paths_without_v1_are_routed_by_model(
    client: Client, path: str
) -> None:
    assert path in INFERENCE_PATHS
    async with client() as http:
        answer = await http.post(path, json={"model": "nope"})
    error(answer, 404, "model_not_found")  # routed: "not_found" would be no such path


async def test_health_answers_on_v1_too(client: Client) -> None:
    async with client() as http:
        assert (await http.get("/v1/health")).json() == {"status": "ok"}


async def test_models_carry_llama_servers_fields(client: Client) -> None:
    async with client() as http:
        for path in ("/v1/models", "/models"):
            entries = {e["id"]: e for e in (await http.get(path)).json()["data"]}
            chat, smol = entries["chat"], entries["smol"]
            assert chat["aliases"] == ["chat", "smol"] and smol["aliases"] == ["chat", "smol"]
            assert chat["tags"] == []
            assert chat["architecture"] == {"input_modalities": ["text"],
                                            "output_modalities": ["text"]}
            assert chat["meta"] == {}  # nothing known before the model is placed
            assert chat["corral"]["state"] == "unloaded"
            assert smol["corral"]["alias_of"] == "chat"


BROWSER = {"Origin": "http://localhost:5173", "Access-Control-Request-Method": "POST",
           "Access-Control-Request-Headers": "authorization, content-type"}


async def test_a_page_of_this_machine_may_call_corral_by_default(client: Client) -> None:
    async with client() as http:
        preflight = await http.options("/v1/chat/completions", headers=BROWSER)
        assert preflight.status_code == 200, preflight.text
        assert preflight.headers["access-control-allow-origin"] == "http://localhost:5173"
        assert preflight.headers["access-control-allow-methods"] == (
            "GET, POST, DELETE, OPTIONS")
        assert preflight.headers["access-control-allow-headers"] == (
            "authorization, content-type")
        # Then the request itself, as the browser sends it: the page may read the answer.
        answer = await http.post("/v1/embeddings", json={"model": "chat", "input": "x"},
                                 headers={"Origin": "http://localhost:5173"})
        error(answer, 400, "embeddings_not_enabled")
        assert answer.headers["access-control-allow-origin"] == "http://localhost:5173"


@pytest.mark.parametrize("origin", ["http://evil.example", "http://localhost.evil.example",
                                    "null", "http://127.0.0.1.nip.io", "localhost"])
async def test_a_page_of_another_site_is_refused_by_default(
    client: Client, origin: str
) -> None:
    async with client() as http:
        preflight = await http.options("/v1/chat/completions",
                                       headers={**BROWSER, "Origin": origin})
        answer = await http.post("/v1/embeddings", json={"model": "chat", "input": "x"},
                                 headers={"Origin": origin})
    for refused in (preflight, answer):
        error(refused, 403, "cross_site_request")
        assert "access-control-allow-origin" not in refused.headers


async def test_cors_methods_and_headers_are_configurable(client: Client) -> None:
    cors = {"allow_origins": ["https://app.example.com"], "allow_methods": ["post", "GET"],
            "allow_headers": ["Authorization", "Content-Type"]}
    async with client(cors=cors) as http:
        preflight = await http.options("/v1/chat/completions", headers={
            **BROWSER, "Origin": "https://app.example.com",
            "Access-Control-Request-Headers": "x-other"})
        local = await http.options("/v1/chat/completions", headers=BROWSER)
    assert preflight.status_code == 200
    assert preflight.headers["access-control-allow-methods"] == "POST, GET"
    assert preflight.headers["access-control-allow-headers"] == "Authorization, Content-Type"
    # A list of origins replaces the default: pages of this machine are no longer served.
    error(local, 403, "cross_site_request")


@pytest.mark.parametrize(("cors", "problem"), [
    ({"allow_methods": ["GET POST"]}, "cors.allow_methods.0"),
    ({"allow_methods": []}, "cors.allow_methods"),
    ({"allow_headers": ["x y"]}, "cors.allow_headers.0"),
    ({"allow_origins": ["localhost:3000"]}, "cors.allow_origins.0"),
])
def test_bad_cors_settings_name_their_key(cors: dict[str, Any], problem: str) -> None:
    with pytest.raises(ConfigError, match=problem.replace(".", r"\.")):
        parse_config({"models": {"m": {"path": "m.gguf"}}, "cors": cors})


def test_listen_host_takes_a_list_with_the_same_keys_rule() -> None:
    both = parse_config({"models": {"m": {"path": "m.gguf"}},
                         "listen": {"host": ["127.0.0.1", "::1"]}})
    assert both.file.listen.hosts == ("127.0.0.1", "::1")
    with pytest.raises(ConfigError, match="'0.0.0.0' is reachable from other machines"):
        parse_config({"models": {"m": {"path": "m.gguf"}},
                      "listen": {"host": ["127.0.0.1", "0.0.0.0"]}})
    for bad in ([], ["127.0.0.1", "127.0.0.1"], ["::1", " x"]):
        with pytest.raises(ConfigError, match="listen.host"):
            parse_config({"models": {"m": {"path": "m.gguf"}}, "listen": {"host": bad}})
