"""The model from request bodies as Envoy streams them: every split of the body alike."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from corral.picker.bodies import MORE, BodyError, ModelSniffer, sniff_model

# Bodies as each API's clients send them.
OPENAI = {"model": "smol", "messages": [{"role": "user", "content": "hi"}], "stream": True}
ANTHROPIC = {"max_tokens": 64, "system": [{"type": "text", "text": "be {brief}"}],
             "messages": [{"role": "user", "content": [{"type": "text", "text": "\"hi\"\\"}]}],
             "model": "claude-ish"}
LLAMA_NATIVE = {"prompt": "Once upon", "n_predict": -1, "temperature": 0.5e-1, "stop": ["]"],
                "cache_prompt": True, "model": None}
LLAMA_NATIVE_NONE = {"prompt": [1, 2, 3], "id_slot": -1}
OLLAMA = {"messages": [{"role": "user", "content": "ünïcödé ✓"}], "options": {"num_ctx": 512},
          "model": "smol:latest", "stream": False}


def feed_in(body: bytes, cuts: list[int]) -> str | None:
    sniffer = ModelSniffer()
    points = sorted({c % (len(body) + 1) for c in cuts}) if body else []
    start = 0
    for point in [*points, len(body)]:
        found = sniffer.feed(body[start:point], end_of_stream=point == len(body))
        start = point
        if found is not MORE:
            assert isinstance(found, str) or found is None
            return found
    raise AssertionError("no answer at the end of the body")


@pytest.mark.parametrize(("body", "model"), [
    (OPENAI, "smol"), (ANTHROPIC, "claude-ish"), (LLAMA_NATIVE, None),
    (LLAMA_NATIVE_NONE, None), (OLLAMA, "smol:latest"), ({}, None),
    ({"model": "a\u00e9\\\"b"}, "a\u00e9\\\"b"), ({"Model": "x", "models": "y"}, None),
    ({"x": {"model": "nested"}, "y": [{"model": "deeper"}]}, None),
])
def test_model_of_each_api(body: dict[str, Any], model: str | None) -> None:
    assert sniff_model(json.dumps(body).encode()) == model
    assert sniff_model(json.dumps(body, ensure_ascii=False, indent=2).encode()) == model


def test_empty_body_names_no_model() -> None:
    assert sniff_model(b"") is None
    assert sniff_model(b"  \n") is None


def test_answers_once_the_model_is_known_without_the_rest() -> None:
    sniffer = ModelSniffer()
    assert sniffer.feed(b'{"model": "smo') is MORE
    assert sniffer.feed(b'l", "prompt": "never closed') == "smol"
    assert sniffer.feed(b"garbage that is never read") == "smol"


def test_a_huge_prompt_before_the_model_is_skipped_not_kept() -> None:
    sniffer = ModelSniffer()
    assert sniffer.feed(b'{"messages": [{"content": "') is MORE
    for _ in range(64):
        assert sniffer.feed(b"x\\\"{[" * 16384) is MORE     # 5 MiB of one string
    assert sniffer.feed(b'"}], "model": "big"}', end_of_stream=True) == "big"
    assert len(sniffer._buf) < 64


@pytest.mark.parametrize(("body", "message"), [
    (b"[1, 2]", "not a JSON object"),
    (b"model=smol", "not a JSON object"),
    (b'{"model": 7}', '"model" must be a string'),
    (b'{"model": ["a"]}', '"model" must be a string'),
    (b'{"model": nope}', '"model" must be a string'),
    (b'{"a" 1}', "':' was expected"),
    (b'{"a": 1 "b": 2}', "',' or '}' expected"),
    (b'{"prompt": "x"', "ends before its JSON object does"),
    (b'{"model": "' + b"m" * 600 + b'"}', "longer than 512 bytes"),
    (b'{"model": "bad \\x escape"}', "malformed JSON string"),
])
def test_malformed_bodies_are_refused_clearly(body: bytes, message: str) -> None:
    with pytest.raises(BodyError, match=message) as caught:
        sniff_model(body)
    assert caught.value.status == 400


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=12)


@settings(max_examples=300, deadline=None)
@given(before=st.dictionaries(st.text().filter(lambda k: k != "model"), json_values,
                              max_size=4),
       model=st.none() | st.text(max_size=40),
       after=st.dictionaries(st.text().filter(lambda k: k != "model"), json_values, max_size=3),
       cuts=st.lists(st.integers(min_value=0), max_size=12),
       ascii_only=st.booleans())
def test_any_split_of_any_body_gives_the_same_model(
        before: dict[str, Any], model: str | None, after: dict[str, Any], cuts: list[int],
        ascii_only: bool) -> None:
    body: dict[str, Any] = dict(before)
    if model is not None:
        body["model"] = model
    body.update({k: v for k, v in after.items() if k not in body})
    raw = json.dumps(body, ensure_ascii=ascii_only).encode()
    assert feed_in(raw, cuts) == model
    assert sniff_model(raw) == json.loads(raw).get("model")
