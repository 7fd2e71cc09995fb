"""Ollama requests mapped onto the child's, and the child's events back onto Ollama's: the
shapes SmolLM2 cannot produce on demand (thinking, a tool call streamed in fragments)."""

from __future__ import annotations

import json
import math
from typing import Any

import pytest

from corral.proxy.errors import BadRequestError
from corral.proxy.ollama import translate
from corral.proxy.ollama.stream import Collector, embedded
from corral.proxy.ollama.translate import Model

TEXT = Model(ctx_per_slot=512, vision=False, thinks=False)
RICH = Model(ctx_per_slot=512, vision=True, thinks=True)
PNG = "iVBORw0KGgoAAAANSUhEUg=="


@pytest.mark.parametrize(("given", "seconds"), [
    ("10m", 600.0), ("1h30m", 5400.0), ("30s", 30.0), ("1.5h", 5400.0), ("0", 0.0), (0, 0.0),
    ("0s", 0.0), ("5m0s", 300.0), ("10 minutes", 600.0), (300, 300.0), (2.5, 2.5),
    ("-1", math.inf), (-1, math.inf), ("-5m", math.inf),
    (None, None),
])
def test_keep_alive(given: object, seconds: float | None) -> None:
    assert translate.keep_alive(given) == seconds


@pytest.mark.parametrize("given", ["soon", "5m3x", True, [], "", "nan"])
def test_keep_alive_refuses_what_is_no_duration(given: object) -> None:
    with pytest.raises(BadRequestError, match="keep_alive"):
        translate.keep_alive(given)


def test_options_map_to_llama_server_fields() -> None:
    mapped = translate.options({"options": {
        "num_predict": 8, "num_keep": 4, "temperature": 0.2, "top_k": 5, "min_p": 0.1,
        "typical_p": 0.9, "repeat_penalty": 1.1, "repeat_last_n": 32, "seed": 7,
        "stop": ["\n"], "num_ctx": 512, "presence_penalty": 0.5, "frequency_penalty": 0.5,
    }}, 512)
    assert mapped == {"max_tokens": 8, "n_keep": 4, "temperature": 0.2, "top_k": 5,
                      "min_p": 0.1, "typical_p": 0.9, "repeat_penalty": 1.1,
                      "repeat_last_n": 32, "seed": 7, "stop": ["\n"], "presence_penalty": 0.5,
                      "frequency_penalty": 0.5}
    assert translate.options({"options": {"num_predict": -1}}, 512) == {}


@pytest.mark.parametrize(("option", "words"), [
    ({"num_ctx": 4096}, "4096 is larger than this model's context: each of its slots holds 512"),
    ({"num_gpu": 10}, "gpu_layers"),
    ({"num_thread": 4}, "--threads"),
    ({"num_batch": 64}, "--batch-size"),
    ({"tfs_z": 1.0}, "tfs_z"),
    ({"made_up": 1}, "made_up"),
])
def test_options_that_cannot_apply_are_refused(option: dict[str, Any], words: str) -> None:
    with pytest.raises(BadRequestError, match=words):
        translate.options({"options": option}, 512)


def test_chat_maps_images_tools_thinking_format_and_think() -> None:
    done = translate.chat({
        "messages": [
            {"role": "user", "content": "What is it?", "images": [PNG]},
            {"role": "assistant", "content": "", "thinking": "hmm", "tool_calls": [
                {"function": {"name": "look", "arguments": {"at": "it"}}}]},
            {"role": "tool", "content": "a cat", "tool_name": "look"},
        ],
        "tools": [{"type": "function", "function": {"name": "look"}}],
        "format": {"type": "object"}, "think": True, "keep_alive": "5m",
    }, RICH)
    assert (done.path, done.stream, done.keep_alive, done.empty) == (
        "/v1/chat/completions", True, 300.0, False)
    user, assistant, tool = done.body["messages"]
    assert user["content"] == [{"type": "text", "text": "What is it?"}, {
        "type": "image_url", "image_url": {"url": f"data:image/png;base64,{PNG}"}}]
    assert assistant["reasoning_content"] == "hmm"
    call = assistant["tool_calls"][0]
    assert call["type"] == "function" and json.loads(call["function"]["arguments"]) == {
        "at": "it"}
    assert tool == {"role": "tool", "content": "a cat", "name": "look",
                    "tool_call_id": call["id"]}
    assert done.body["tools"] == [{"type": "function", "function": {"name": "look"}}]
    assert done.body["response_format"] == {
        "type": "json_schema", "json_schema": {"name": "format", "schema": {"type": "object"}}}
    assert done.body["chat_template_kwargs"] == {"enable_thinking": True}
    assert done.body["stream"] is True  # the child always streams; the answer is merged
    json_mode = translate.chat({"messages": [], "format": "json", "stream": False}, TEXT)
    assert json_mode.body["response_format"] == {"type": "json_object"}
    assert json_mode.empty and not json_mode.stream


@pytest.mark.parametrize(("body", "words"), [
    ({"messages": [{"role": "user", "content": "x", "images": [PNG]}]}, "projector"),
    ({"messages": [], "think": True}, "thinking"),
    ({"messages": "hi"}, "array"),
    ({"messages": [], "format": "yaml"}, "format"),
    ({"messages": [], "stream": "yes"}, "stream"),
    ({"messages": [], "logprobs": True}, "logprobs"),
])
def test_chat_refuses_what_it_cannot_map(body: dict[str, Any], words: str) -> None:
    with pytest.raises(BadRequestError, match=words):
        translate.chat(body, TEXT)


def test_generate_as_chat_raw_and_infill() -> None:
    chat = translate.generate({"prompt": "Hi", "system": "Be brief.",
                               "options": {"num_predict": 3}}, TEXT)
    assert chat.path == "/v1/chat/completions" and chat.body["max_tokens"] == 3
    assert chat.body["messages"] == [{"role": "system", "content": "Be brief."},
                                     {"role": "user", "content": "Hi"}]
    raw = translate.generate({"prompt": "Once", "raw": True, "format": "json"}, TEXT)
    assert raw.path == "/v1/completions" and raw.body["prompt"] == "Once"
    assert raw.body["json_schema"] == {"type": "object"}  # what /v1/completions reads
    infill = translate.generate({"prompt": "def f(", "suffix": "return x",
                                 "options": {"num_predict": 5}}, TEXT)
    assert infill.path == "/infill" and infill.native
    assert infill.body["input_prefix"] == "def f(" and infill.body["input_suffix"] == "return x"
    assert infill.body["n_predict"] == 5 and "max_tokens" not in infill.body
    assert translate.generate({"keep_alive": 0}, TEXT).empty
    for refused in ({"prompt": "x", "template": "{{ .Prompt }}"}, {"prompt": "x",
                                                                   "context": [1, 2]}):
        with pytest.raises(BadRequestError, match="not supported"):
            translate.generate(refused, TEXT)


def test_a_tool_call_streamed_in_fragments_goes_out_whole() -> None:
    collector = Collector(translate.chat({"messages": [{"role": "user", "content": "x"}]},
                                         TEXT))
    events = [
        {"choices": [{"delta": {"tool_calls": [{"index": 0, "id": "c",
                                                "function": {"name": "get_weather",
                                                             "arguments": ""}}]}}]},
        {"choices": [{"delta": {"tool_calls": [{"index": 0,
                                                "function": {"arguments": "{\"city\":"}}]}}]},
        {"choices": [{"delta": {"tool_calls": [{"index": 0,
                                                "function": {"arguments": "\"Paris\"}"}}]}}]},
        {"choices": [{"delta": {}, "finish_reason": "tool_calls"}],
         "timings": {"prompt_n": 5, "prompt_ms": 2.0, "predicted_n": 9, "predicted_ms": 3.0}},
    ]
    assert [collector.feed(e) for e in events] == [None] * 4  # no fragment goes out alone
    whole = {"function": {"index": 0, "name": "get_weather", "arguments": {"city": "Paris"}}}
    assert collector.calls_part() == {
        "message": {"role": "assistant", "content": "", "tool_calls": [whole]}, "done": False}
    last = collector.final(whole=True, total=1.0, load=0.5)
    assert last["message"]["tool_calls"][0]["function"]["arguments"] == {"city": "Paris"}
    assert (last["done"], last["done_reason"], last["eval_count"], last["prompt_eval_count"],
            last["eval_duration"], last["prompt_eval_duration"], last["total_duration"],
            last["load_duration"]) == (True, "stop", 9, 5, 3_000_000, 2_000_000,
                                       1_000_000_000, 500_000_000)


def test_reasoning_becomes_thinking() -> None:
    chat = Collector(translate.chat({"messages": [{"role": "user", "content": "x"}]}, RICH))
    assert chat.feed({"choices": [{"delta": {"reasoning_content": "let me see"}}]}) == {
        "message": {"role": "assistant", "content": "", "thinking": "let me see"},
        "done": False}
    assert chat.feed({"choices": [{"delta": {"content": "4"}}]}) == {
        "message": {"role": "assistant", "content": "4"}, "done": False}
    assert chat.final(whole=True, total=0, load=0)["message"] == {
        "role": "assistant", "content": "4", "thinking": "let me see"}
    generate = Collector(translate.generate({"prompt": "x"}, RICH))
    assert generate.feed({"choices": [{"delta": {"reasoning_content": "hm"}}]}) == {
        "response": "", "thinking": "hm", "done": False}


def test_native_infill_events_and_a_length_stop() -> None:
    collector = Collector(translate.generate({"prompt": "a", "suffix": "b"}, TEXT))
    assert collector.feed({"content": "x", "stop": False}) == {"response": "x", "done": False}
    collector.feed({"content": "", "stop": True, "stop_type": "limit", "tokens_evaluated": 6,
                    "timings": {"predicted_n": 1}})
    last = collector.final(whole=False, total=0, load=0)
    assert (last["done_reason"], last["prompt_eval_count"], last["response"]) == (
        "length", 6, "")


def test_embeddings_shapes() -> None:
    embed = translate.embed({"input": "hi"}, TEXT)
    answer = embedded(embed, {"data": [{"index": 1, "embedding": [2.0]},
                                       {"index": 0, "embedding": [1.0]}],
                              "usage": {"prompt_tokens": 3}}, 1.0, 0.0)
    assert answer["embeddings"] == [[1.0], [2.0]] and answer["prompt_eval_count"] == 3
    legacy = translate.embeddings({"prompt": "hi"}, TEXT)
    assert legacy.body == {"content": "hi", "embd_normalize": -1}
    assert embedded(legacy, [{"index": 0, "embedding": [[0.5, 2.0]]}], 0, 0) == {
        "embedding": [0.5, 2.0]}
    with pytest.raises(BadRequestError, match="dimensions"):
        translate.embed({"input": "hi", "dimensions": 8}, TEXT)
