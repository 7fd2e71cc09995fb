"""Which model a request is for: the JSON body's ``model``, else the configured default."""

from __future__ import annotations

import json
from typing import Any

from corral.proxy.errors import BadRequestError

# Every POST endpoint of llama-server that serves a model. The body goes upstream unchanged.
INFERENCE_PATHS = (
    "/v1/chat/completions",
    "/v1/completions",
    "/v1/embeddings",
    "/v1/rerank",
    "/v1/messages",
    "/v1/messages/count_tokens",
    "/v1/responses",
    "/chat/completions",
    "/completions",
    "/completion",
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
    if not isinstance(data, dict):
        raise BadRequestError(
            f"the request body must be a JSON object, got {_json_type(data)}",
            code="invalid_body",
        )
    return data


def model_name(data: dict[str, Any], default: str | None) -> str:
    """The model a parsed body asks for; the default when it names none."""
    name = data.get("model")
    if name is None:
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
