"""Which model a request is for: the JSON body's ``model``, else the configured default."""

from __future__ import annotations

import json
from typing import Any

from corral.proxy.errors import BadRequestError

# Every POST endpoint of llama-server that serves a model and takes JSON, with and without
# the /v1 prefix where llama-server has both. The body goes upstream unchanged.
INFERENCE_PATHS = (
    "/v1/chat/completions",
    "/v1/completions",
    "/v1/embeddings",
    "/v1/rerank",
    "/v1/reranking",
    "/v1/messages",
    "/v1/messages/count_tokens",
    "/v1/responses",
    "/v1/chat/completions/input_tokens",
    "/v1/responses/input_tokens",
    "/v1/chat/completions/control",
    "/v1/systemone",
    "/chat/completions",
    "/chat/completions/input_tokens",
    "/completions",
    "/completion",
    "/responses",
    "/responses/input_tokens",
    "/embeddings",
    "/embedding",
    "/rerank",
    "/reranking",
    "/infill",
    "/tokenize",
    "/detokenize",
    "/apply-template",
)

# Endpoints that use no slot (they never decode): they skip admission but still need the model.
SLOTLESS_PATHS = frozenset({
    "/tokenize", "/detokenize", "/apply-template", "/v1/messages/count_tokens",
    "/v1/chat/completions/input_tokens", "/chat/completions/input_tokens",
    "/v1/responses/input_tokens", "/responses/input_tokens",
    # Acts on a completion already running (stops it): must not wait behind it for a slot.
    "/v1/chat/completions/control",
})


def parse_body(body: bytes) -> dict[str, Any]:
    """The request body as a JSON object; ``BadRequestError`` for anything else."""
    if not body:
        raise BadRequestError("the request body is empty; expected a JSON object",
                              code="invalid_body")
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise BadRequestError(f"the request body is not valid JSON: {exc}",
                              code="invalid_json") from None
    except RecursionError:
        raise BadRequestError("the request body is nested too deeply to read",
                              code="invalid_json") from None
    if not isinstance(data, dict):
        raise BadRequestError(
            f"the request body must be a JSON object, got {_json_type(data)}",
            code="invalid_body",
        )
    return data


CHAT_PATHS = frozenset({"/v1/chat/completions", "/chat/completions",
                        "/v1/chat/completions/input_tokens", "/chat/completions/input_tokens"})
MESSAGES_PATHS = frozenset({"/v1/messages", "/v1/messages/count_tokens"})
RESPONSES_PATHS = frozenset({"/v1/responses", "/responses", "/v1/responses/input_tokens",
                             "/responses/input_tokens"})


def check_fields(
    path: str, data: dict[str, Any], n_vocab: int | None = None, multimodal: bool = True
) -> None:
    """Refuse (400) the client mistakes llama-server itself misreports as 500 errors.

    Everything else is llama-server's to judge: it answers 400 for what it cannot read. A few
    dictionary lookups on the hot path, no schema. ``n_vocab`` bounds ``/detokenize`` ids;
    a model that is not ``multimodal`` takes no image or audio parts in chat messages.
    """
    tools = data.get("tools")
    if tools is not None:
        _check_tools(path, tools)
    if not multimodal and path in CHAT_PATHS:
        _check_text_only(data.get("messages"))
    if path in MESSAGES_PATHS and not isinstance(data.get("messages"), list):
        raise BadRequestError(
            f"\"messages\" must be an array, got {_json_type(data.get('messages'))}",
            code="invalid_messages")
    if path == "/detokenize":
        tokens = data.get("tokens")
        limit = n_vocab if n_vocab else 2**31
        if tokens is not None and not (isinstance(tokens, list) and all(
            isinstance(t, int) and not isinstance(t, bool) and 0 <= t < limit for t in tokens
        )):
            bound = f" below the vocabulary size {n_vocab}" if n_vocab else ""
            raise BadRequestError(
                f"\"tokens\" must be an array of token ids (integers >= 0{bound})",
                code="invalid_tokens")


_MEDIA_PARTS = frozenset({"image_url", "input_audio"})


def _check_text_only(messages: object) -> None:
    if not isinstance(messages, list):
        return  # llama-server answers 400 for that itself
    for message in messages:
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, list) and any(
            isinstance(part, dict) and part.get("type") in _MEDIA_PARTS for part in content
        ):
            raise BadRequestError(
                "this model takes text only: it has no multimodal projector (--mmproj in its "
                "args), so image and audio parts cannot be read",
                code="unsupported_content")


def _check_tools(path: str, tools: object) -> None:
    """Each API names its tools its own way; refuse only what breaks that API's own shape.

    Chat: ``{"type": "function", "function": {"name": ...}}``; Responses: ``{"type":
    "function", "name": ...}``; Anthropic Messages: ``{"name": ..., "input_schema": ...}``,
    no ``type`` needed.
    """
    if path in MESSAGES_PATHS:
        needed = "name"
    elif path in CHAT_PATHS or path in RESPONSES_PATHS:
        needed = "type"
    else:
        return  # the other endpoints take no tools
    if not isinstance(tools, list):
        raise BadRequestError(f"\"tools\" must be an array, got {_json_type(tools)}",
                              code="invalid_tools")
    chat = path in CHAT_PATHS
    for i, tool in enumerate(tools):
        if not isinstance(tool, dict) or not isinstance(tool.get(needed), str):
            raise BadRequestError(f"tools[{i}] must be an object with a \"{needed}\"",
                                  code="invalid_tools")
        if needed == "type" and tool["type"] == "function":
            holder = tool.get("function") if chat else tool
            if not (isinstance(holder, dict) and isinstance(holder.get("name"), str)):
                where = "a \"function\" object with a \"name\"" if chat else "a \"name\""
                raise BadRequestError(f"tools[{i}] of type \"function\" needs {where}",
                                      code="invalid_tools")


def model_name(data: dict[str, Any], default: str | None, empty_is_none: bool = False) -> str:
    """The model a parsed body asks for; the default when it names none (or, with
    ``empty_is_none``, names ``""``, which a single llama-server ignores as any name)."""
    name = data.get("model")
    if name is None or (empty_is_none and name == ""):
        if default is None:
            raise BadRequestError(
                "the request has no \"model\" and corral has no default_model",
                code="model_required",
            )
        return default
    if not isinstance(name, str):
        raise BadRequestError(f"\"model\" must be a string, got {_json_type(name)}",
                              code="invalid_model")
    if not name:
        raise BadRequestError("\"model\" must not be empty", code="invalid_model")
    return name


def _json_type(value: object) -> str:
    return {dict: "an object", list: "an array", str: "a string", bool: "a boolean",
            int: "a number", float: "a number", type(None): "null"}.get(type(value), "a value")
