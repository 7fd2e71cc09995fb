"""A tiny llama with random weights, standing in for the tests' ``stories260K``.

llama.cpp's server tests run most of their files with ``stories260K`` (260K parameters, a
512-token vocabulary), which is not available offline. SmolLM2-135M in its place is 500 times
bigger: on a small shared machine the files that generate most (``test_completion.py``,
``test_ctx_shift.py``, ...) then take hours. This writes a llama of about the same size as
``stories260K`` in its layers (2 layers, 64 wide), with SmolLM2's real tokenizer and chat
template read from SmolLM2's GGUF, so prompts are tokenized and templated as a real model's,
and the cost of a token is mostly the 64 x 49152 output matrix: nearly free.

The weights are random, with three choices that make the tests meaningful:

- Every token's embedding has a large constant first component, which survives the layers and
  the final norm; the output rows of control tokens (``<|im_end|>``, ``<|endoftext|>``, ...)
  weigh it strongly negative, so the model never ends a text by itself (as a story model
  asked for 64 tokens gives 64): counts of predicted tokens are what ``n_predict`` asked for.
- The output rows are large enough that one token clearly leads (greedy decoding does not flip
  with the batch size or rounding) while sampling at the tests' temperatures still varies with
  the seed.
- ``add_bos_token`` is on, as ``stories260K``'s tokenizer has it (SmolLM2's BOS is id 1 too).

It says nothing sensible: a test that checks a story's words fails against both servers, as
with any model other than ``stories260K``. Nothing of it is committed: ``run.py`` writes it
into its output directory at start (a few seconds), the same file for both servers.

Usage: ``python bench/llamacpp_suite/tiny_model.py OUT.gguf [SOURCE.gguf]``.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import gguf
import numpy as np

ROOT = Path(__file__).resolve().parents[2]
SOURCE = ROOT / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
# Part of the file's name: a change to the recipe writes a new file instead of reusing one.
VERSION = 1
N_LAYER, N_EMBD, N_HEAD, N_HEAD_KV, N_FF = 2, 64, 2, 1, 128
HEAD = N_EMBD // N_HEAD  # 32: a multiple of the q8_0/q4_0 block, for quantized KV caches
CONTROL = int(gguf.TokenType.CONTROL)
F32 = np.float32


def _tokenizer(source: Path) -> dict[str, Any]:
    """The tokenizer fields of ``source`` (lists and scalars, as read)."""
    reader = gguf.GGUFReader(str(source))
    wanted = ("tokenizer.ggml.model", "tokenizer.ggml.pre", "tokenizer.ggml.tokens",
              "tokenizer.ggml.token_type", "tokenizer.ggml.merges",
              "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id",
              "tokenizer.ggml.unknown_token_id", "tokenizer.ggml.padding_token_id",
              "tokenizer.chat_template")
    fields = {}
    for key in wanted:
        field = reader.get_field(key)
        if field is None:
            raise ValueError(f"{source}: no {key}, not a model to take a tokenizer from")
        fields[key] = field.contents()
    return fields


def write(path: Path, source: Path = SOURCE, seed: int = 0) -> Path:
    """Write the tiny model to ``path`` with ``source``'s tokenizer (reproducible per seed)."""
    tok = _tokenizer(source)
    tokens: list[str] = tok["tokenizer.ggml.tokens"]
    types: list[int] = tok["tokenizer.ggml.token_type"]
    n_vocab = len(tokens)
    rng = np.random.default_rng(seed)

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("corral tiny stand-in for stories260K")
    writer.add_block_count(N_LAYER)
    writer.add_context_length(8192)
    writer.add_embedding_length(N_EMBD)
    writer.add_feed_forward_length(N_FF)
    writer.add_head_count(N_HEAD)
    writer.add_head_count_kv(N_HEAD_KV)
    writer.add_rope_dimension_count(HEAD)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(n_vocab)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    writer.add_tokenizer_model(tok["tokenizer.ggml.model"])
    writer.add_tokenizer_pre(tok["tokenizer.ggml.pre"])
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(tok["tokenizer.ggml.merges"])
    writer.add_bos_token_id(tok["tokenizer.ggml.bos_token_id"])
    writer.add_eos_token_id(tok["tokenizer.ggml.eos_token_id"])
    writer.add_unk_token_id(tok["tokenizer.ggml.unknown_token_id"])
    writer.add_pad_token_id(tok["tokenizer.ggml.padding_token_id"])
    writer.add_add_bos_token(True)
    writer.add_add_space_prefix(False)
    writer.add_chat_template(tok["tokenizer.chat_template"])

    def matrix(rows: int, cols: int, scale: float) -> np.ndarray:
        # numpy shape (rows, cols) is llama.cpp's ne (cols, rows): ne[0] is the row length.
        return (rng.standard_normal((rows, cols), dtype=F32) * scale).astype(np.float16)

    embd = rng.standard_normal((n_vocab, N_EMBD), dtype=F32)
    embd[:, 0] = 4.0  # the constant component the output reads the "never stop" from
    output = rng.standard_normal((n_vocab, N_EMBD), dtype=F32) * 0.5
    output[:, 0] = 0.0
    output[np.asarray(types) == CONTROL, 0] = -30.0
    writer.add_tensor("token_embd.weight", embd.astype(np.float16))
    writer.add_tensor("output_norm.weight", np.ones(N_EMBD, dtype=F32))
    writer.add_tensor("output.weight", output.astype(np.float16))
    for layer in range(N_LAYER):
        prefix = f"blk.{layer}."
        writer.add_tensor(prefix + "attn_norm.weight", np.ones(N_EMBD, dtype=F32))
        writer.add_tensor(prefix + "attn_q.weight", matrix(N_HEAD * HEAD, N_EMBD, 0.05))
        writer.add_tensor(prefix + "attn_k.weight", matrix(N_HEAD_KV * HEAD, N_EMBD, 0.05))
        writer.add_tensor(prefix + "attn_v.weight", matrix(N_HEAD_KV * HEAD, N_EMBD, 0.05))
        writer.add_tensor(prefix + "attn_output.weight", matrix(N_EMBD, N_HEAD * HEAD, 0.05))
        writer.add_tensor(prefix + "ffn_norm.weight", np.ones(N_EMBD, dtype=F32))
        writer.add_tensor(prefix + "ffn_gate.weight", matrix(N_FF, N_EMBD, 0.05))
        writer.add_tensor(prefix + "ffn_up.weight", matrix(N_FF, N_EMBD, 0.05))
        writer.add_tensor(prefix + "ffn_down.weight", matrix(N_EMBD, N_FF, 0.05))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def ensure(outdir: Path, source: Path = SOURCE) -> Path:
    """The tiny model in ``outdir``, written if not there yet."""
    path = outdir / f"tiny-stories-v{VERSION}.gguf"
    if not path.exists():
        outdir.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(".partial")
        write(partial, source)
        partial.rename(path)  # never a half-written model for a second run to pick up
    return path


if __name__ == "__main__":
    print(write(Path(sys.argv[1]), Path(sys.argv[2]) if len(sys.argv) > 2 else SOURCE))
