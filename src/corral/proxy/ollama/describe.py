"""What the Ollama API says about a configured model, read from its GGUF header.

``/api/tags``, ``/api/show`` and ``/api/ps`` describe each model as Ollama describes the ones
it pulled: family, parameter size, quantization level, size on disk, a digest, the chat
template and what it can do (``capabilities``). Everything comes from the file's header (no
tensor data is read), but the chat template, which comes from the model's ``args`` when they
give llama-server one (``--chat-template-file``); it is cached by the files' size and
modification time.
"""

from __future__ import annotations

import functools
import hashlib
import os
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from corral.config import ModelSpec
from corral.probe.gguf import read_header, split_paths

# Flags that make llama-server an embedding server: it then refuses completions.
EMBEDDING_FLAGS = frozenset({"--embedding", "--embeddings"})
# Markers of a chat template that renders tool definitions, or a reasoning block.
_TOOL_MARKERS = ("tools", "tool_calls")
_THINKING_MARKERS = ("<think>", "enable_thinking", "reasoning_content", "thinking")
_NOT_SHOWN = frozenset({"tokenizer.chat_template", "general.languages", "general.tags",
                        "general.datasets"})
_DIGEST_SPAN = 1 << 20  # bytes hashed at each end of the file


@dataclass(frozen=True)
class Description:
    """One model file as the Ollama API shows it."""

    family: str
    parameter_size: str
    quantization_level: str
    size: int  # bytes on disk: every shard and the projector
    digest: str  # hex sha256 of the file's size and its first and last MiB
    modified_at: str
    context_length: int  # trained context (``{arch}.context_length``)
    template: str
    capabilities: tuple[str, ...]
    info: dict[str, Any]  # the header's scalar metadata (``model_info``)

    def details(self) -> dict[str, Any]:
        """Ollama's ``details`` object."""
        return {"parent_model": "", "format": "gguf", "family": self.family,
                "families": [self.family], "parameter_size": self.parameter_size,
                "quantization_level": self.quantization_level}


def describe(spec: ModelSpec) -> Description:
    """The description of ``spec``'s model file. Raises ``OSError`` or ``ValueError`` when the
    file cannot be read (the caller answers for that model with an error)."""
    if spec.path is None:
        raise OSError(f"its files ({spec.source}) are not downloaded yet")
    files = [os.path.abspath(spec.path)]
    if spec.projector:
        files.append(os.path.abspath(spec.projector))
    key = tuple((f, *_stat(f)) for f in files)
    return _describe(key, _embeds(spec.args), spec.projector is not None,
                     _template_in_args(spec.args))


def _template_in_args(args: tuple[str, ...]) -> str | None:
    """The chat template the model's ``args`` give llama-server instead of its GGUF's
    (``--chat-template-file PATH``, or ``--chat-template`` with the template itself): what
    the child really renders, so what its capabilities are read from. None: the GGUF's."""
    found: str | None = None
    for i, arg in enumerate(args):
        flag, eq, value = arg.partition("=")
        if flag not in ("--chat-template-file", "--chat-template"):
            continue
        if not eq:
            if i + 1 >= len(args):
                continue
            value = args[i + 1]
        if flag == "--chat-template-file":
            with open(value, encoding="utf-8") as fh:
                found = fh.read()
        else:
            found = value  # a built-in name (chatml, ...) or the Jinja source
    return found


def _stat(path: str) -> tuple[int, int]:
    stat = os.stat(path)
    return stat.st_size, stat.st_mtime_ns


def _embeds(args: tuple[str, ...]) -> bool:
    return any(a in EMBEDDING_FLAGS for a in args)


@functools.lru_cache(maxsize=64)
def _describe(files: tuple[tuple[str, int, int], ...], embeds: bool,
              vision: bool, given_template: str | None = None) -> Description:
    path, size, mtime = files[0]
    fields, _ = read_header(path)
    count = fields.get("split.count", 0)
    shards = split_paths(path, count)[1:] if isinstance(count, int) and count > 1 else []
    on_disk = sum(s for _, s, _ in files) + sum(_stat(p)[0] for p in shards)
    arch = str(fields.get("general.architecture", "unknown"))
    template = fields.get("tokenizer.chat_template")
    template = template if isinstance(template, str) else ""
    if given_template is not None:
        template = given_template
    capabilities = ["embedding"] if embeds else ["completion"]
    if not embeds and any(m in template for m in _TOOL_MARKERS):
        capabilities.append("tools")
    if not embeds and "tokenizer.ggml.fim_pre_token_id" in fields:
        capabilities.append("insert")
    if vision:
        capabilities.append("vision")
    if not embeds and any(m in template for m in _THINKING_MARKERS):
        capabilities.append("thinking")
    context = fields.get(f"{arch}.context_length")
    # Scalars only; string arrays were read as their lengths, which would mislead.
    info = {k: v for k, v in fields.items()
            if isinstance(v, str | int | float | bool) and k not in _NOT_SHOWN}
    return Description(
        family=arch,
        parameter_size=_parameter_size(fields),
        quantization_level=_quantization(fields.get("general.file_type")),
        size=on_disk,
        digest=_digest(path, size),
        modified_at=datetime.fromtimestamp(mtime / 1e9, UTC).isoformat().replace("+00:00", "Z"),
        context_length=context if isinstance(context, int) else 0,
        template=template,
        capabilities=tuple(capabilities),
        info=info,
    )


def _parameter_size(fields: dict[str, object]) -> str:
    label = fields.get("general.size_label")
    return label if isinstance(label, str) and label else "unknown"


def _quantization(file_type: object) -> str:
    from gguf.constants import LlamaFileType

    if not isinstance(file_type, int):
        return "unknown"
    try:
        name = LlamaFileType(file_type).name
    except ValueError:
        return "unknown"
    return name.removeprefix("MOSTLY_").removeprefix("ALL_")


def _digest(path: str, size: int) -> str:
    # A content digest of a file of many GiB would take minutes: its size and both ends tell
    # two different files apart (the header differs between quantizations) and stay the same
    # when the file is only copied, moved or touched.
    sha = hashlib.sha256(str(size).encode())
    with open(path, "rb") as fh:
        sha.update(fh.read(_DIGEST_SPAN))
        fh.seek(max(0, size - _DIGEST_SPAN))
        sha.update(fh.read(_DIGEST_SPAN))
    return sha.hexdigest()
