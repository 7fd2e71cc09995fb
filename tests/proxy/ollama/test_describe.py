"""Models described from their GGUF headers, as /api/tags, /api/show and /api/ps show them."""

from __future__ import annotations

import os
from pathlib import Path

import gguf
import numpy as np

from corral.config import parse_config
from corral.config.schema import ModelSpec
from corral.proxy.ollama.describe import describe

TEMPLATE = "{% if tools %}{{ tools }}{% endif %}<think>{{ messages }}</think>"


def write_gguf(path: Path, template: str | None, fim: bool = False) -> Path:
    writer = gguf.GGUFWriter(str(path), "qwen3")
    writer.add_context_length(32768)
    writer.add_size_label("8B")
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_Q4_K_M)
    writer.add_string("general.languages", "en")  # an array in real files: never shown
    if template is not None:
        writer.add_chat_template(template)
    if fim:
        writer.add_uint32("tokenizer.ggml.fim_pre_token_id", 1)
    writer.add_tensor_info("token_embd.weight", (4, 4), np.dtype(np.float32), 64,
                           raw_dtype=gguf.GGMLQuantizationType.F32)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    writer.close()
    return path


def spec(path: Path, *args: str) -> ModelSpec:
    return parse_config({"models": {"m": {"path": str(path), "args": list(args)}}}).models["m"]


def test_a_chat_model_with_tools_thinking_and_a_projector(tmp_path: Path) -> None:
    model = write_gguf(tmp_path / "m.gguf", TEMPLATE, fim=True)
    projector = tmp_path / "mmproj.gguf"
    projector.write_bytes(b"GGUF" + bytes(96))
    about = describe(spec(model, "--mmproj", str(projector)))
    assert about.details() == {"parent_model": "", "format": "gguf", "family": "qwen3",
                               "families": ["qwen3"], "parameter_size": "8B",
                               "quantization_level": "Q4_K_M"}
    assert about.capabilities == ("completion", "tools", "insert", "vision", "thinking")
    assert about.context_length == 32768 and about.template == TEMPLATE
    assert about.size == model.stat().st_size + 100
    assert about.info["qwen3.context_length"] == 32768
    assert "general.languages" not in about.info and "tokenizer.chat_template" not in about.info


def test_an_embedding_model_and_a_stable_digest(tmp_path: Path) -> None:
    model = write_gguf(tmp_path / "e.gguf", None)
    about = describe(spec(model, "--embeddings"))
    assert about.capabilities == ("embedding",)
    assert about.template == ""
    moved = tmp_path / "moved.gguf"
    os.link(model, moved)
    os.utime(moved, (1, 1))  # touched: a new cache entry, the same content
    again = describe(spec(moved))
    assert again.digest == about.digest and len(about.digest) == 64
    assert again.capabilities == ("completion",)
    other = describe(spec(write_gguf(tmp_path / "o.gguf", TEMPLATE)))
    assert other.digest != about.digest


def test_a_template_given_in_args_is_the_one_described(tmp_path: Path) -> None:
    model = write_gguf(tmp_path / "m.gguf", "{{ messages }}")
    assert describe(spec(model)).capabilities == ("completion",)
    given = tmp_path / "t.jinja"
    given.write_text(TEMPLATE)
    about = describe(spec(model, "--chat-template-file", str(given)))
    assert about.template == TEMPLATE
    assert about.capabilities == ("completion", "tools", "thinking")
    inline = describe(spec(model, f"--chat-template={TEMPLATE}"))
    assert inline.capabilities == ("completion", "tools", "thinking")
