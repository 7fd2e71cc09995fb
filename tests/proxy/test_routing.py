from __future__ import annotations

from typing import Any

import pytest

from corral.proxy.errors import BadRequestError
from corral.proxy.routing import check_fields, model_name, parse_body


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"", "the request body is empty"),
        (b"{", "not valid JSON"),
        (b"\xff\xfe", "not valid JSON"),
        (b"[1, 2]", "must be a JSON object, got an array"),
        (b'"text"', "must be a JSON object, got a string"),
        (b"null", "must be a JSON object, got null"),
        (b"[" * 100_000, "nested too deeply"),
    ],
)
def test_bodies_that_are_not_objects(body: bytes, message: str) -> None:
    with pytest.raises(BadRequestError, match=message) as info:
        parse_body(body)
    assert info.value.status == 400


def test_model_name() -> None:
    assert model_name({"model": "smol"}, None) == "smol"
    assert model_name({"model": "smol"}, "other") == "smol"
    assert model_name({}, "dflt") == "dflt"
    with pytest.raises(BadRequestError, match="no default_model"):
        model_name({}, None)
    with pytest.raises(BadRequestError, match="must be a string, got a number"):
        model_name({"model": 3}, "dflt")
    with pytest.raises(BadRequestError, match="must not be empty"):
        model_name({"model": ""}, "dflt")


@pytest.mark.parametrize(("path", "body", "n_vocab", "code"), [
    ("/v1/chat/completions", {"tools": "x"}, None, "invalid_tools"),
    ("/v1/chat/completions", {"tools": [{"type": "function", "function": {}}]}, None,
     "invalid_tools"),
    ("/v1/messages", {}, None, "invalid_messages"),
    ("/v1/messages", {"messages": [], "tools": [{"input_schema": {}}]}, None, "invalid_tools"),
    ("/v1/messages", {"messages": [], "tools": "x"}, None, "invalid_tools"),
    ("/v1/responses", {"tools": [{"type": "function"}]}, None, "invalid_tools"),
    ("/v1/responses", {"tools": [{}]}, None, "invalid_tools"),
    ("/detokenize", {"tokens": [True]}, None, "invalid_tokens"),
    ("/detokenize", {"tokens": [100]}, 100, "invalid_tokens"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [
        {"type": "text", "text": "What is this?"},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]}]}, None,
     "unsupported_content"),
])
def test_check_fields_refuses(path: str, body: dict[str, Any], n_vocab: int | None,
                              code: str) -> None:
    with pytest.raises(BadRequestError) as caught:
        check_fields(path, body, n_vocab, multimodal=False)
    assert caught.value.code == code


@pytest.mark.parametrize(("path", "body", "n_vocab"), [
    ("/v1/chat/completions", {"tools": [{"type": "function", "function": {"name": "f"}}]}, None),
    # The Responses API's flat tool shape is not the chat one.
    ("/v1/responses", {"tools": [{"type": "function", "name": "f"}]}, None),
    ("/v1/messages", {"messages": []}, None),
    # Anthropic tools have no "type": {name, description, input_schema}.
    ("/v1/messages", {"messages": [], "tools": [
        {"name": "get_time", "description": "now", "input_schema": {"type": "object"}}]}, None),
    ("/v1/responses", {"tools": [{"type": "web_search"}]}, None),
    ("/v1/completions", {"prompt": "x", "tools": "ignored here"}, None),
    ("/detokenize", {"tokens": [0, 99]}, 100),
    ("/detokenize", {"tokens": [10**6]}, None),  # unknown vocabulary: llama-server judges
    ("/v1/completions", {"prompt": "x"}, None),
])
def test_check_fields_accepts(path: str, body: dict[str, Any], n_vocab: int | None) -> None:
    check_fields(path, body, n_vocab, multimodal=False)


def test_media_parts_pass_for_a_model_with_a_projector() -> None:
    image = {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}
    body = {"messages": [{"role": "user", "content": [image]}]}
    check_fields("/v1/chat/completions", body, None, multimodal=True)
    text_parts = {"messages": [{"role": "user", "content": [{"type": "text", "text": "x"}]}]}
    check_fields("/v1/chat/completions", text_parts, None, multimodal=False)
