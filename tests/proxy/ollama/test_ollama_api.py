"""The Ollama API, driven by the official ``ollama`` client (sync and async) against corral.

One corral for the module: ``smol`` (SmolLM2 for chat), ``embed`` (SmolLM2 with
``--embeddings``), ``thinker`` and ``caller`` (SmolLM2 with a chat template of ours, given
with ``--chat-template-file``, that llama-server reads as a reasoning template with the
``<think>`` block forced open, and as a ``<tool_call>`` tool template) and ``crashy``: the
fake llama-server (tests/fake_llama_server.py), which exits after two tokens of a stream,
because the real one cannot be made to die mid-answer on demand. Keys: ``admin``
(everything) and ``user`` (inference on ``smol`` only).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import ollama
import psutil
import pytest

from tests.conftest import FAKE_LLAMA_SERVER, CorralProcess, launch
from tests.metrics.test_metrics import samples, value
from tests.proxy.ollama.clients import ADMIN, USER, client, serving
from tests.proxy.ollama.projector import red_square, write_projector

pytestmark = pytest.mark.integration

TEMPLATES = Path(__file__).parent / "templates"

FEW = {"num_predict": 4}
HI = [{"role": "user", "content": "Hi"}]
# For answers that must run into num_predict: to "Hi" the model sometimes says "Hi." and stops
# (its sampling is seeded at random); a count goes on for longer than four tokens.
COUNTING = "Count from one to twenty in words."
COUNT = [{"role": "user", "content": COUNTING}]
COUNT_FEW = {**FEW, "temperature": 0, "top_k": 1, "seed": 1}  # the same answer every time


@pytest.fixture(scope="module")
def server(
    tmp_path_factory: pytest.TempPathFactory, llama_server: str, smollm2: Path
) -> Iterator[CorralProcess]:
    model = {"path": str(smollm2), "slots": 1, "ctx_per_slot": 512}
    files = tmp_path_factory.mktemp("ollama")
    projector = write_projector(files / "mmproj.gguf")
    corral = launch(files, llama_server, {
        "auth": {"keys": [
            {"key": "admin-key", "scopes": ["inference", "admin"]},
            {"key": "user-key", "models": ["smol"]},
        ]},
        "models": {
            "smol": {**model, "aliases": ["tiny"]},
            "embed": {**model, "args": ["--embeddings", "--pooling", "mean"]},
            "thinker": {**model, "args": ["--chat-template-file",
                                          str(TEMPLATES / "thinking.jinja")]},
            "caller": {**model, "args": ["--chat-template-file",
                                         str(TEMPLATES / "tools.jinja")]},
            "seeing": {**model, "args": ["--mmproj", str(projector)]},
            "crashy": {**model, "binary": FAKE_LLAMA_SERVER,
                       "env": {"FAKE_MODE": "crash_after:2"}},
        },
    })
    with serving(corral) as ready:
        yield ready


def pid(server: CorralProcess, name: str) -> int | None:
    found: int | None = server.model(name)["pid"]
    return found


def loaded(server: CorralProcess) -> set[str]:
    return {m.model or "" for m in client(server).ps().models}


def test_version_root_and_tags(server: CorralProcess) -> None:
    version = server.http.get("/api/version").json()["version"]
    assert [int(p) for p in version.split(".")] >= [0, 5, 0]
    assert server.http.get("/").text == "Ollama is running"
    assert server.http.head("/").status_code == 200
    tags = {m.model: m for m in client(server).list().models}
    assert set(tags) == {"smol:latest", "tiny:latest", "embed:latest", "crashy:latest",
                         "thinker:latest", "caller:latest", "seeing:latest"}
    smol = tags["smol:latest"]
    assert smol.details is not None
    assert (smol.details.family, smol.details.parameter_size,
            smol.details.quantization_level) == ("llama", "135M", "Q4_1")
    assert smol.size == Path(server.model("smol")["path"]).stat().st_size
    assert smol.digest and len(smol.digest) == 64 and smol.digest == tags["tiny:latest"].digest
    # The key restricted to smol sees smol and its alias only.
    mine = {m.model for m in client(server, USER).list().models}
    assert mine == {"smol:latest", "tiny:latest"}


def test_show_describes_the_gguf_and_real_context(server: CorralProcess) -> None:
    shown = client(server).show("smol:latest")
    assert shown.capabilities == ["completion"]
    assert shown.modelinfo is not None and shown.modelinfo["llama.context_length"] == 8192
    assert shown.parameters == "num_ctx 512"
    assert shown.template is not None and "<|im_start|>" in shown.template
    assert client(server).show("embed").capabilities == ["embedding"]
    with pytest.raises(ollama.ResponseError) as unknown:
        client(server).show("nope")
    assert unknown.value.status_code == 404 and "nope" in unknown.value.error


def test_chat_streamed_and_not(server: CorralProcess) -> None:
    whole = client(server).chat(model="smol", messages=COUNT, options=COUNT_FEW)
    assert whole.done and whole.done_reason == "length"
    assert whole.message.role == "assistant" and whole.message.content
    assert whole.eval_count == 4 and whole.prompt_eval_count
    assert whole.total_duration and whole.eval_duration and whole.prompt_eval_duration
    parts = list(client(server).chat(model="tiny:latest", messages=COUNT, options=COUNT_FEW,
                                     stream=True))
    assert [p.done for p in parts] == [False] * (len(parts) - 1) + [True]
    assert "".join(p.message.content or "" for p in parts)
    assert parts[-1].done_reason == "length" and parts[-1].eval_count == 4
    assert parts[-1].model == "tiny:latest"


def test_generate_streamed_and_not_with_system_and_raw(server: CorralProcess) -> None:
    answer = client(server).generate(model="smol", prompt=COUNTING,
                                     system="You count aloud, one number after another.",
                                     options=COUNT_FEW)
    assert answer.response and answer.done_reason == "length" and answer.eval_count == 4
    raw = list(client(server).generate(model="smol", prompt="Once upon a time", raw=True,
                                       options={"num_predict": 3, "temperature": 0,
                                                "top_k": 1, "seed": 1}, stream=True))
    assert raw[-1].done and raw[-1].eval_count == 3
    assert "".join(p.response for p in raw if p.response)


# llama.cpp's grammar for this schema lets the model write whitespace at five places, each at
# most 22 characters ("\n"{1,2} [ \t]{0,20}, common/json-schema-to-grammar.cpp), around 12
# characters of JSON: at most 122 tokens of one character or more, then it must stop. A CI run
# once saw the model fill 32 tokens with whitespace; 128 leaves it no way to run out.
BOUNDED_JSON = {"num_predict": 128, "temperature": 0, "top_k": 1, "seed": 1}


def test_format_schema_gives_json(server: CorralProcess) -> None:
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"],
              "additionalProperties": False}
    answer = client(server).chat(model="smol", messages=[{"role": "user", "content": "Ok?"}],
                                 format=schema, options=BOUNDED_JSON)
    assert answer.done_reason == "stop", answer.message.content
    assert isinstance(json.loads(answer.message.content or "")["ok"], bool)
    raw = client(server).generate(model="smol", prompt="Answer: ", raw=True, format=schema,
                                  options=BOUNDED_JSON)
    assert raw.done_reason == "stop", raw.response
    assert isinstance(json.loads(raw.response or "")["ok"], bool)


WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                   "required": ["city"]}}}


def _asked(city: str) -> list[dict[str, Any]]:
    return [{"role": "user", "content": f"Weather in {city}?"},
            {"role": "assistant", "content": "",
             "tool_calls": [{"function": {"name": "get_weather", "arguments": {"city": city}}}]}]


# Two calls answered before: at temperature 0 SmolLM2 calls the tool a third time, through
# the ``<tool_call>`` template that llama-server parses (and constrains with its grammar once
# the model opens a call). Deterministic: greedy sampling, one slot. The call's JSON may carry
# whitespace the grammar allows (see BOUNDED_JSON): room for all of it.
CALLING = [*_asked("Paris"), {"role": "tool", "content": "sunny", "tool_name": "get_weather"},
           *_asked("Berlin"), {"role": "tool", "content": "rain", "tool_name": "get_weather"},
           {"role": "user", "content": "Weather in Rome?"}]
GREEDY = {"num_predict": 160, "temperature": 0, "top_k": 1, "seed": 1}


def warm(server: CorralProcess, options: dict[str, Any], **chat: Any) -> None:
    """The same chat once for one token, so that the answers compared next both start from the
    prompt cache: a cold prompt is computed in one batch, a cached one from its last token, and
    the logits of the two paths may differ in their last bits, enough to flip a near tie."""
    assert client(server).chat(**chat, options={**options, "num_predict": 1}).done


def _one_call(calls: Any) -> None:
    assert calls is not None and len(calls) == 1
    function = calls[0].function
    assert function.name == "get_weather"
    assert isinstance(function.arguments, dict) and set(function.arguments) == {"city"}
    assert isinstance(function.arguments["city"], str) and function.arguments["city"]


def test_tool_calls_come_whole_with_object_arguments(server: CorralProcess) -> None:
    assert "tools" in (client(server).show("caller").capabilities or [])
    warm(server, GREEDY, model="caller", messages=CALLING, tools=[WEATHER])
    whole = client(server).chat(model="caller", messages=CALLING, tools=[WEATHER],
                                options=GREEDY)
    assert whole.done and whole.done_reason == "stop"
    _one_call(whole.message.tool_calls)
    # llama-server streams the call's arguments in fragments; Ollama's clients get it once,
    # whole, in one line of its own.
    parts = list(client(server).chat(model="caller", messages=CALLING, tools=[WEATHER],
                                     options=GREEDY, stream=True))
    with_calls = [p for p in parts if p.message.tool_calls]
    assert len(with_calls) == 1 and not with_calls[0].done
    _one_call(with_calls[0].message.tool_calls)
    assert with_calls[0].message.tool_calls == whole.message.tool_calls
    assert parts[-1].done and not parts[-1].message.tool_calls


def test_tool_calls_from_the_async_client(server: CorralProcess) -> None:
    async def run() -> tuple[Any, list[Any]]:
        async with ollama.AsyncClient(host=server.url, headers=ADMIN, timeout=240) as agent:
            whole = await agent.chat(model="caller", messages=CALLING, tools=[WEATHER],
                                     options=GREEDY)
            parts = [p async for p in await agent.chat(
                model="caller", messages=CALLING, tools=[WEATHER], options=GREEDY,
                stream=True)]
        return whole, parts

    whole, parts = asyncio.run(run())
    _one_call(whole.message.tool_calls)
    calls = [p.message.tool_calls for p in parts if p.message.tool_calls]
    assert len(calls) == 1
    _one_call(calls[0])


def test_a_tool_result_is_answered(server: CorralProcess) -> None:
    history = [*_asked("Paris"), {"role": "tool", "content": "sunny",
                                  "tool_name": "get_weather"}]
    answer = client(server).chat(model="caller", messages=history, tools=[WEATHER],
                                 options=FEW)
    assert answer.done
    for call in answer.message.tool_calls or []:  # words or a call: calls come as objects
        assert isinstance(call.function.arguments, dict)


def test_think_on_a_model_without_thinking_is_refused(server: CorralProcess) -> None:
    with pytest.raises(ollama.ResponseError) as refused:
        client(server).chat(model="smol", messages=HI, think=True, options=FEW)
    assert refused.value.status_code == 400 and "thinking" in refused.value.error
    assert client(server).chat(model="smol", messages=HI, think=False, options=FEW).done


THINKING = {"num_predict": 6, "temperature": 0, "top_k": 1, "seed": 1}


def test_think_gives_thinking_streamed_and_not(server: CorralProcess) -> None:
    # The template opens <think> for the model (enable_thinking), and llama-server, reading
    # it as a reasoning template, returns what follows as reasoning: six tokens, all thought.
    assert "thinking" in (client(server).show("thinker").capabilities or [])
    warm(server, THINKING, model="thinker", messages=HI, think=True)
    whole = client(server).chat(model="thinker", messages=HI, think=True, options=THINKING)
    assert whole.done and whole.done_reason == "length" and whole.eval_count == 6
    assert whole.message.thinking and not whole.message.content
    assert "<think>" not in whole.message.thinking
    parts = list(client(server).chat(model="thinker", messages=HI, think=True,
                                     options=THINKING, stream=True))
    assert [p.done for p in parts] == [False] * (len(parts) - 1) + [True]
    streamed = "".join(p.message.thinking or "" for p in parts[:-1])
    assert streamed == whole.message.thinking  # greedy: the same thought, piece by piece
    assert not "".join(p.message.content or "" for p in parts)
    generated = client(server).generate(model="thinker", prompt="Hi", think=True,
                                        options=THINKING)
    assert generated.thinking and not generated.response


def test_think_false_gives_no_thinking(server: CorralProcess) -> None:
    # enable_thinking false: the template closes the block itself; the answer is content,
    # without the empty <think></think> the template wrote.
    warm(server, THINKING, model="thinker", messages=HI, think=False)
    whole = client(server).chat(model="thinker", messages=HI, think=False, options=THINKING)
    assert whole.message.content and not whole.message.thinking
    assert "<think>" not in whole.message.content and "</think>" not in whole.message.content
    parts = list(client(server).chat(model="thinker", messages=HI, think=False,
                                     options=THINKING, stream=True))
    assert not any(p.message.thinking for p in parts)
    assert "".join(p.message.content or "" for p in parts) == whole.message.content


def test_think_from_the_async_client(server: CorralProcess) -> None:
    async def run() -> tuple[Any, list[Any]]:
        async with ollama.AsyncClient(host=server.url, headers=ADMIN, timeout=240) as agent:
            whole = await agent.chat(model="thinker", messages=HI, think=True,
                                     options=THINKING)
            parts = [p async for p in await agent.generate(
                model="thinker", prompt="Hi", think=True, options=THINKING, stream=True)]
        return whole, parts

    whole, parts = asyncio.run(run())
    assert whole.message.thinking and not whole.message.content
    assert "".join(p.thinking or "" for p in parts) and parts[-1].done


def test_options_that_choose_the_load_are_refused_or_checked(server: CorralProcess) -> None:
    ok = client(server).chat(model="smol", messages=HI, options={"num_ctx": 512, **FEW})
    assert ok.done
    with pytest.raises(ollama.ResponseError) as large:
        client(server).chat(model="smol", messages=HI, options={"num_ctx": 4096, **FEW})
    assert large.value.status_code == 400 and "512" in large.value.error
    with pytest.raises(ollama.ResponseError) as gpu:
        client(server).generate(model="smol", prompt="Hi", options={"num_gpu": 1, **FEW})
    assert gpu.value.status_code == 400 and "num_gpu" in gpu.value.error


def test_images_are_refused_without_a_projector(server: CorralProcess) -> None:
    with pytest.raises(ollama.ResponseError) as refused:
        client(server).chat(model="smol", messages=[
            {"role": "user", "content": "What is it?", "images": ["iVBORw0KGgo="]}])
    assert refused.value.status_code == 400 and "projector" in refused.value.error
    with pytest.raises(ollama.ResponseError) as generated:
        client(server).generate(model="smol", prompt="What is it?", images=[red_square()])
    assert generated.value.status_code == 400 and "--mmproj" in generated.value.error
    with pytest.raises(ollama.ResponseError) as insert:
        client(server).generate(model="smol", prompt="def f(", suffix="return 1")
    assert insert.value.status_code == 400 and "fill-in-the-middle" in insert.value.error


def test_images_reach_a_model_with_a_projector(server: CorralProcess) -> None:
    # SmolLM2 with a tiny synthetic projector (tests/proxy/ollama/projector.py): the image
    # becomes a data URI part that llama-server reads into image tokens of the prompt.
    assert "vision" in (client(server).show("seeing").capabilities or [])
    words = [{"role": "user", "content": "What is it?"}]
    looked = [{**words[0], "images": [red_square()]}]
    plain = client(server).chat(model="seeing", messages=words, options=COUNT_FEW)
    whole = client(server).chat(model="seeing", messages=looked, options=COUNT_FEW)
    assert whole.done and whole.message.content and whole.eval_count == 4
    assert whole.prompt_eval_count is not None and plain.prompt_eval_count is not None
    assert whole.prompt_eval_count > plain.prompt_eval_count  # the image's tokens
    parts = list(client(server).chat(model="seeing", messages=looked, options=COUNT_FEW,
                                     stream=True))
    assert parts[-1].done and parts[-1].prompt_eval_count == whole.prompt_eval_count
    made = client(server).generate(model="seeing", prompt="What is it?",
                                   images=[red_square()], options=COUNT_FEW)
    assert made.done and made.response and made.eval_count == 4


def test_embeddings(server: CorralProcess) -> None:
    embedded = client(server).embed(model="embed", input=["hello", "world"])
    assert len(embedded.embeddings) == 2 and len(embedded.embeddings[0]) == 576
    norm = sum(x * x for x in embedded.embeddings[0]) ** 0.5
    assert abs(norm - 1.0) < 1e-3  # /api/embed normalises, as Ollama's does
    legacy = client(server).embeddings(model="embed", prompt="hello")
    assert len(legacy.embedding) == 576
    assert abs(sum(x * x for x in legacy.embedding) ** 0.5 - 1.0) > 1e-3  # the raw vector
    with pytest.raises(ollama.ResponseError) as chat:
        client(server).chat(model="embed", messages=HI)
    assert chat.value.status_code == 400 and "embedding" in chat.value.error
    with pytest.raises(ollama.ResponseError) as no_embed:
        client(server).embed(model="smol", input="hi")
    assert no_embed.value.status_code == 400 and "--embeddings" in no_embed.value.error


def test_keep_alive_zero_unloads_after_the_answer(server: CorralProcess) -> None:
    client(server).generate(model="smol", prompt="Hi", options=COUNT_FEW)
    first = pid(server, "smol")
    assert first is not None
    answer = client(server).generate(model="smol", prompt="Hi", options=COUNT_FEW, keep_alive=0)
    assert answer.response
    server.wait_for(lambda: server.model("smol")["state"] == "unloaded")
    assert not psutil.pid_exists(first) or psutil.Process(first).status() == "zombie"
    assert "smol:latest" not in loaded(server)


def test_keep_alive_load_for_ever_then_unload_now(server: CorralProcess) -> None:
    client(server).generate(model="smol", keep_alive=0)  # unloaded, whatever ran before
    loading = client(server).generate(model="smol", keep_alive=-1)
    assert loading.done and loading.done_reason == "load" and loading.response == ""
    assert loading.load_duration and loading.load_duration > 0
    assert server.model("smol")["state"] == "ready"
    ps = {m.model: m for m in client(server).ps().models}
    assert ps["smol:latest"].context_length == 512
    expires = ps["smol:latest"].expires_at
    assert expires is not None and expires.year > 2200  # for ever
    five = client(server).chat(model="smol", messages=HI, options=COUNT_FEW, keep_alive="5m")
    assert five.done and five.load_duration == 0  # it was loaded already
    ps = {m.model: m for m in client(server).ps().models}
    left = ps["smol:latest"].expires_at
    assert left is not None
    seconds = (left - datetime.now(UTC)).total_seconds()
    assert 250 < seconds <= 300  # 5m, not the configured ttl (10 minutes)
    running = pid(server, "smol")
    unloading = client(server).chat(model="smol", messages=[], keep_alive=0)
    assert unloading.done_reason == "unload"
    assert server.model("smol")["state"] == "unloaded"  # at once, not after a ttl
    assert running is not None and not (psutil.pid_exists(running)
                                        and psutil.Process(running).status() != "zombie")


def test_errors_before_the_stream_are_ollama_shaped(server: CorralProcess) -> None:
    with pytest.raises(ollama.ResponseError) as unknown:
        client(server).chat(model="nope", messages=HI)
    assert unknown.value.status_code == 404
    answer = server.http.post("/api/chat", json={"model": "nope", "messages": HI})
    assert answer.status_code == 404 and set(answer.json()) == {"error"}
    # A key that may not use the model is told it does not exist.
    with pytest.raises(ollama.ResponseError) as hidden:
        client(server, USER).chat(model="embed", messages=HI)
    assert hidden.value.status_code == 404
    assert "embed" not in hidden.value.error.split("available models:")[1]
    with pytest.raises(ollama.ResponseError) as nokey:
        client(server, {}).chat(model="smol", messages=HI)
    assert nokey.value.status_code == 401
    with pytest.raises(ollama.ResponseError) as push:
        client(server).push("smol")
    assert push.value.status_code == 501 and "config" in push.value.error
    # The child's own refusal, before any token: its status, in Ollama's shape.
    with pytest.raises(ollama.ResponseError) as too_long:
        client(server).chat(model="smol", stream=True, options=COUNT_FEW, messages=[
            {"role": "user", "content": "word " * 2000}]).__next__()
    assert too_long.value.status_code == 400 and "context" in too_long.value.error
    bad = server.http.post("/api/generate", json={"model": "smol", "keep_alive": "soon"})
    assert bad.status_code == 400 and "keep_alive" in bad.json()["error"]


def test_a_child_dying_mid_stream_ends_it_with_an_error_line(server: CorralProcess) -> None:
    lines = []
    with server.http.stream("POST", "/api/chat", json={
            "model": "crashy", "messages": HI, "options": {"num_predict": 10}}) as response:
        assert response.status_code == 200
        assert response.headers["content-type"] == "application/x-ndjson"
        lines = [json.loads(line) for line in response.iter_lines() if line]
    assert lines[0]["message"]["content"]
    assert set(lines[-1]) == {"error"} and "failed" in lines[-1]["error"]
    assert not any(line.get("done") for line in lines)
    with pytest.raises(ollama.ResponseError):
        for _ in client(server).chat(model="crashy", messages=HI, stream=True, options=COUNT_FEW):
            pass


def test_requests_are_counted_like_openai_ones(server: CorralProcess) -> None:
    client(server).chat(model="smol", messages=HI, options=COUNT_FEW)
    with pytest.raises(ollama.ResponseError):
        client(server).chat(model="smol", messages=HI, options={"num_gpu": 2})
    found = samples(server)
    assert value(found, "corral_requests_total", model="smol", endpoint="/api/chat",
                 code="200") >= 1
    assert value(found, "corral_requests_total", model="smol", endpoint="/api/chat",
                 code="400") >= 1
    assert '"path": "/api/chat"' in server.log()


def test_async_client(server: CorralProcess) -> None:
    async def run() -> tuple[str, list[Any], list[float]]:
        async_client = ollama.AsyncClient(host=server.url, headers=ADMIN, timeout=240)
        whole = await async_client.generate(model="smol", prompt="Hi", options=COUNT_FEW)
        parts = [p async for p in await async_client.chat(
            model="smol", messages=HI, options=COUNT_FEW, stream=True)]
        vector = (await async_client.embed(model="embed", input="hi")).embeddings[0]
        await async_client.close()
        return whole.response or "", parts, list(vector)

    response, parts, vector = asyncio.run(run())
    assert response and parts[-1].done and len(vector) == 576


def test_open_webui_replay(server: CorralProcess) -> None:
    """What Open WebUI does against an Ollama server (OLLAMA_BASE_URL): version, tags, ps, a
    streamed chat, then its unload with keep_alive 0."""
    http = httpx.Client(base_url=server.url, headers=USER, timeout=240)
    with http:
        assert http.get("/api/version").status_code == 200
        names = [m["name"] for m in http.get("/api/tags").json()["models"]]
        assert "smol:latest" in names
        assert http.get("/api/ps").status_code == 200
        body = {"model": "smol:latest", "messages": COUNT, "stream": True,
                "options": COUNT_FEW}
        with http.stream("POST", "/api/chat", json=body) as streamed:
            assert streamed.status_code == 200
            lines = [json.loads(line) for line in streamed.iter_lines() if line]
        assert lines[-1]["done"] is True and lines[-1]["done_reason"] == "length"
        assert all(line["model"] == "smol:latest" for line in lines)
        assert "smol:latest" in [m["name"] for m in http.get("/api/ps").json()["models"]]
        unload = http.post("/api/generate", json={"model": "smol:latest", "keep_alive": 0})
        assert unload.status_code == 200 and unload.json()["done_reason"] == "unload"
        assert "smol:latest" not in [m["name"] for m in http.get("/api/ps").json()["models"]]
