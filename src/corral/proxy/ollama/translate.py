"""Ollama requests as the child's requests: ``/api/chat`` and ``/api/generate`` become
llama-server's ``/v1/chat/completions`` (or ``/v1/completions`` for ``raw``, ``/infill`` for a
``suffix``), ``/api/embed`` its ``/v1/embeddings``, ``/api/embeddings`` its ``/embedding``.

Every field a client sends is mapped or refused (400, naming it): nothing is dropped silently.
The options that choose how Ollama loads a model cannot change a running child with fixed
slots: ``num_ctx`` is honoured up to the slot's context (larger is refused, naming it); the
others (``num_gpu``, ``num_batch``, ``num_thread``, ...) are corral's config and refused here.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any, Literal

from corral.config.units import parse_duration
from corral.echo import clip
from corral.proxy.errors import BadRequestError

Mode = Literal["chat", "generate", "embed", "embeddings"]

# Ollama option -> llama-server field, where the name differs.
_RENAMED = {"num_predict": "max_tokens", "num_keep": "n_keep"}
# Sampling options llama-server reads under the same name from an OpenAI-style body.
_SAME = frozenset({"temperature", "top_k", "top_p", "min_p", "typical_p", "repeat_penalty",
                   "repeat_last_n", "presence_penalty", "frequency_penalty", "seed", "stop",
                   "mirostat", "mirostat_tau", "mirostat_eta"})
# How Ollama loads a model: corral's config decides these for a child that serves everyone.
_LOADING = {
    "num_gpu": "gpu_layers", "num_batch": "args (--batch-size)", "num_thread": "args "
    "(--threads)", "main_gpu": "devices", "low_vram": "args", "numa": "args (--numa)",
    "use_mmap": "args (--no-mmap)", "use_mlock": "args (--mlock)", "vocab_only": "-",
    "logits_all": "-", "embedding_only": "args (--embeddings)",
}
_REMOVED = frozenset({"tfs_z", "penalize_newline"})  # gone from llama.cpp's samplers
# Ollama's bare base64 images, by their first bytes, for the data URI llama-server reads.
_IMAGE_TYPES = (("iVBOR", "image/png"), ("/9j/", "image/jpeg"), ("R0lGOD", "image/gif"),
                ("UklGR", "image/webp"), ("Qk", "image/bmp"))


@dataclass
class Translated:
    """A request for the child: where it goes, its body, and what the answer is turned into."""

    mode: Mode
    path: str
    body: dict[str, Any]
    stream: bool
    native: bool = False  # llama-server's own response shape (/infill, /embedding)
    keep_alive: float | None = None  # seconds; inf: for ever; None: the model's ttl
    empty: bool = False  # nothing to generate: only load (or, keep_alive 0, unload)
    extra: dict[str, Any] = field(default_factory=dict)


def keep_alive(value: object) -> float | None:
    """Ollama's ``keep_alive`` in seconds: a number of seconds or a duration ("10m", "1h30m",
    as corral's config reads them); negative ("-1", -1, "-5m"): for ever (``inf``); absent:
    None."""
    if value is None:
        return None
    if isinstance(value, int | float) and not isinstance(value, bool) and value < 0:
        return math.inf
    if isinstance(value, str) and value.strip().startswith("-"):
        value = value.strip()[1:]
        forever = True
    else:
        forever = False
    try:
        seconds = parse_duration(value)
    except ValueError:
        raise BadRequestError(
            f"\"keep_alive\" {clip(repr(value))} is not a duration (\"30s\", \"10m\", "
            "\"1h\", \"-1\") or a number of seconds", code="invalid_keep_alive") from None
    if math.isnan(seconds):
        raise BadRequestError("\"keep_alive\" must be a number", code="invalid_keep_alive")
    return math.inf if forever else seconds


def options(data: dict[str, Any], ctx_per_slot: int | None) -> dict[str, Any]:
    """Ollama's ``options`` as llama-server's sampling fields."""
    given = data.get("options")
    if given is None:
        return {}
    if not isinstance(given, dict):
        raise BadRequestError("\"options\" must be an object", code="invalid_options")
    out: dict[str, Any] = {}
    for name, value in given.items():
        if value is None:
            continue
        if name == "num_ctx":
            _check_ctx(value, ctx_per_slot)
        elif name in _LOADING:
            raise BadRequestError(
                f"options.{name} chooses how a model is loaded; corral loads each model once "
                f"for every client, as its config says ({_LOADING[name]}), so it cannot be "
                "set per request", code="unsupported_option")
        elif name in _REMOVED:
            raise BadRequestError(f"options.{name} is not supported by llama.cpp's sampler",
                                  code="unsupported_option")
        elif name == "num_predict":
            if not isinstance(value, int) or isinstance(value, bool):
                raise BadRequestError("options.num_predict must be an integer",
                                      code="invalid_options")
            if value >= 0:  # -1 (until done) and -2 (fill the context): no limit to send
                out["max_tokens"] = value
        elif name in _RENAMED:
            out[_RENAMED[name]] = value
        elif name in _SAME:
            out[name] = value
        else:
            raise BadRequestError(f"options.{name} is not an option corral knows",
                                  code="unsupported_option")
    return out


def _check_ctx(value: object, ctx_per_slot: int | None) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise BadRequestError("options.num_ctx must be a positive integer",
                              code="invalid_options")
    if ctx_per_slot is not None and value > ctx_per_slot:
        raise BadRequestError(
            f"options.num_ctx {value} is larger than this model's context: each of its slots "
            f"holds {ctx_per_slot} tokens (ctx_per_slot in corral's config)",
            code="context_too_large")


def _stream(data: dict[str, Any]) -> bool:
    stream = data.get("stream", True)  # Ollama streams unless told not to
    if not isinstance(stream, bool):
        raise BadRequestError("\"stream\" must be a boolean", code="invalid_body")
    return stream


def _format(data: dict[str, Any], chat: bool = True) -> dict[str, Any]:
    """``format`` as a chat's ``response_format``, or (``raw``, ``suffix``) as llama-server's
    own ``json_schema``, which its completion endpoints read."""
    fmt = data.get("format")
    if fmt is None or fmt == "":
        return {}
    if fmt == "json" or isinstance(fmt, dict):
        schema = fmt if isinstance(fmt, dict) else {"type": "object"}
        if not chat:
            return {"json_schema": schema}
        if fmt == "json":
            return {"response_format": {"type": "json_object"}}
        return {"response_format": {"type": "json_schema",
                                     "json_schema": {"name": "format", "schema": schema}}}
    raise BadRequestError("\"format\" must be \"json\" or a JSON schema object",
                          code="invalid_format")


def _think(data: dict[str, Any], thinks: bool) -> dict[str, Any]:
    think = data.get("think")
    if think is None:
        return {}
    if think is not False and not thinks:
        raise BadRequestError("this model does not support thinking (its chat template has no "
                              "reasoning block)", code="thinking_unsupported")
    if isinstance(think, bool):
        # "deepseek" either way: with "none" llama-server leaves the closed, empty block
        # that a template writes for enable_thinking false (<think></think>) in the content.
        return {"chat_template_kwargs": {"enable_thinking": think},
                "reasoning_format": "deepseek"}
    if think in ("low", "medium", "high"):
        return {"chat_template_kwargs": {"reasoning_effort": think},
                "reasoning_format": "deepseek"}
    raise BadRequestError("\"think\" must be true, false, \"low\", \"medium\" or \"high\"",
                          code="invalid_think")


def _images(value: object, vision: bool) -> list[dict[str, Any]]:
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(i, str) for i in value):
        raise BadRequestError("\"images\" must be an array of base64 strings",
                              code="invalid_images")
    if value and not vision:
        raise BadRequestError(
            "this model takes text only: it has no multimodal projector (--mmproj in its "
            "args), so images cannot be read", code="unsupported_content")
    return [{"type": "image_url", "image_url": {"url": _data_uri(i)}} for i in value]


def _data_uri(image: str) -> str:
    if image.startswith("data:"):
        return image
    kind = next((t for prefix, t in _IMAGE_TYPES if image.startswith(prefix)), "image/png")
    return f"data:{kind};base64,{image}"


def _message(message: object, i: int, vision: bool) -> dict[str, Any]:
    if not isinstance(message, dict) or not isinstance(message.get("role"), str):
        raise BadRequestError(f"messages[{i}] must be an object with a \"role\"",
                              code="invalid_messages")
    content = message.get("content") or ""
    if not isinstance(content, str):
        raise BadRequestError(f"messages[{i}].content must be a string",
                              code="invalid_messages")
    out: dict[str, Any] = {"role": message["role"], "content": content}
    images = _images(message.get("images"), vision)
    if images:
        out["content"] = [{"type": "text", "text": content}, *images]
    if isinstance(message.get("thinking"), str) and message["thinking"]:
        out["reasoning_content"] = message["thinking"]
    calls = message.get("tool_calls")
    if calls:
        out["tool_calls"] = [_tool_call(c, i, n) for n, c in enumerate(calls)]
    if message.get("tool_name"):
        out["name"] = message["tool_name"]
    return out


def _tool_call(call: object, i: int, n: int) -> dict[str, Any]:
    function = call.get("function") if isinstance(call, dict) else None
    if not isinstance(function, dict) or not isinstance(function.get("name"), str):
        raise BadRequestError(f"messages[{i}].tool_calls[{n}] needs a \"function\" with a "
                              "\"name\"", code="invalid_messages")
    arguments = function.get("arguments", {})
    return {"id": f"call_{i}_{n}", "type": "function",
            "function": {"name": function["name"],
                         "arguments": arguments if isinstance(arguments, str)
                         else json.dumps(arguments)}}


def _link_tool_results(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Give each tool result the id of the call it answers (OpenAI's ``tool_call_id``, which
    some chat templates read): Ollama names the tool, or relies on the order of the calls."""
    waiting: list[tuple[str, str]] = []  # (id, name) of calls not answered yet
    for message in messages:
        if message.get("tool_calls"):
            waiting = [(c["id"], c["function"]["name"]) for c in message["tool_calls"]]
        elif message["role"] == "tool" and waiting:
            name = message.get("name")
            match = next((w for w in waiting if w[1] == name), waiting[0])
            waiting.remove(match)
            message["tool_call_id"] = match[0]
    return messages


def _refuse(data: dict[str, Any], *names: str) -> None:
    for name in names:
        if data.get(name):
            raise BadRequestError(
                f"\"{name}\" is not supported by corral's Ollama API", code="unsupported_field")


@dataclass(frozen=True)
class Model:
    """What translation needs to know of the model: its slot context and capabilities."""

    ctx_per_slot: int | None
    vision: bool
    thinks: bool


def chat(data: dict[str, Any], model: Model) -> Translated:
    """``/api/chat`` as ``/v1/chat/completions``."""
    _refuse(data, "logprobs", "top_logprobs")
    messages = data.get("messages")
    if messages is None:
        messages = []
    if not isinstance(messages, list):
        raise BadRequestError("\"messages\" must be an array", code="invalid_messages")
    body: dict[str, Any] = {
        "messages": _link_tool_results([_message(m, i, model.vision)
                                        for i, m in enumerate(messages)]),
        "stream": True, "stream_options": {"include_usage": True},
        **options(data, model.ctx_per_slot), **_format(data), **_think(data, model.thinks),
    }
    tools = data.get("tools")
    if tools:
        body["tools"] = tools
    return Translated("chat", "/v1/chat/completions", body, _stream(data),
                      keep_alive=keep_alive(data.get("keep_alive")), empty=not messages)


def generate(data: dict[str, Any], model: Model) -> Translated:
    """``/api/generate``: a chat of one user message (``system`` before it), the bare prompt
    with ``raw``, or a fill-in-the-middle with ``suffix``."""
    _refuse(data, "logprobs", "top_logprobs", "template", "context")
    prompt = data.get("prompt") or ""
    if not isinstance(prompt, str):
        raise BadRequestError("\"prompt\" must be a string", code="invalid_prompt")
    images = _images(data.get("images"), model.vision)
    suffix = data.get("suffix")
    system = data.get("system")
    chat = not suffix and not data.get("raw")
    sampling = {**options(data, model.ctx_per_slot), **_format(data, chat)}
    alive = keep_alive(data.get("keep_alive"))
    stream = _stream(data)
    empty = not prompt and not images and not suffix
    if suffix:
        if not isinstance(suffix, str):
            raise BadRequestError("\"suffix\" must be a string", code="invalid_prompt")
        _refuse(data, "images", "think")
        if "max_tokens" in sampling:
            sampling["n_predict"] = sampling.pop("max_tokens")
        body = {"input_prefix": prompt, "input_suffix": suffix, "prompt": "", "stream": True,
                **sampling}
        return Translated("generate", "/infill", body, stream, native=True, keep_alive=alive,
                          empty=empty)
    if data.get("raw"):
        _refuse(data, "images", "think")
        body = {"prompt": prompt, "stream": True, "stream_options": {"include_usage": True},
                **sampling}
        return Translated("generate", "/v1/completions", body, stream, keep_alive=alive,
                          empty=empty)
    messages: list[dict[str, Any]] = []
    if system is not None:
        if not isinstance(system, str):
            raise BadRequestError("\"system\" must be a string", code="invalid_prompt")
        messages.append({"role": "system", "content": system})
    content: str | list[dict[str, Any]] = prompt
    if images:
        content = [{"type": "text", "text": prompt}, *images]
    messages.append({"role": "user", "content": content})
    body = {"messages": messages, "stream": True, "stream_options": {"include_usage": True},
            **sampling, **_think(data, model.thinks)}
    return Translated("generate", "/v1/chat/completions", body, stream, keep_alive=alive,
                      empty=empty)


def embed(data: dict[str, Any], model: Model) -> Translated:
    """``/api/embed`` as ``/v1/embeddings`` (which normalises, as Ollama's does)."""
    _refuse(data, "dimensions")
    given = data.get("input")
    inputs = [given] if isinstance(given, str) else given
    if inputs is None:
        inputs = []
    if not isinstance(inputs, list) or not all(isinstance(i, str) for i in inputs):
        raise BadRequestError("\"input\" must be a string or an array of strings",
                              code="invalid_input")
    options(data, model.ctx_per_slot)  # sampling options mean nothing here; bad ones still 400
    return Translated("embed", "/v1/embeddings", {"input": inputs}, False,
                      keep_alive=keep_alive(data.get("keep_alive")), empty=not inputs)


def embeddings(data: dict[str, Any], model: Model) -> Translated:
    """``/api/embeddings`` (the legacy shape): one prompt, its vector not normalised."""
    prompt = data.get("prompt") or ""
    if not isinstance(prompt, str):
        raise BadRequestError("\"prompt\" must be a string", code="invalid_prompt")
    options(data, model.ctx_per_slot)
    return Translated("embeddings", "/embedding", {"content": prompt, "embd_normalize": -1},
                      False, native=True, keep_alive=keep_alive(data.get("keep_alive")),
                      empty=not prompt)
