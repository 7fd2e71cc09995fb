"""Small GGUF models with random weights that the real llama-server loads.

Each exercises one term of corral's memory estimate that SmolLM2 (a plain llama) does not:

- ``kv_split``: architecture ``mimo2``, grouped-query attention with K heads of 96 and V heads
  of 64 (llama.cpp's ``llama`` architecture sizes its output projection by the K head size, so
  it cannot load K != V; ``mimo2`` can), plus a per-layer sliding-window pattern array.
- ``swa``: architecture ``gemma3`` with a 512-token window and its default pattern (every sixth
  layer global).
- ``moe``: architecture ``qwen3moe``, 16 experts with 4 used per token.

Weights are random (Q8_0 matrices, F32 norms); the vocabulary is a synthetic byte-level BPE.
Nothing here is meant to produce sensible text, only to be loaded and measured.

Usage: ``python bench/synthetic_models.py OUTDIR`` writes all of them.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import gguf
import numpy as np

Q8 = gguf.GGMLQuantizationType.Q8_0
F32 = gguf.GGMLQuantizationType.F32
T = gguf.MODEL_TENSOR


@dataclass(frozen=True)
class Synthetic:
    """One synthetic model: its architecture, hyper-parameters and tensors (llama.cpp ``ne``)."""

    name: str
    arch: str
    n_layer: int
    n_embd: int
    n_head: int
    n_head_kv: int
    key_length: int
    value_length: int
    n_ff: int
    n_vocab: int = 32000
    n_ctx_train: int = 8192
    extra: dict[str, object] = field(default_factory=dict)  # add_* writer calls
    layer_tensors: Callable[[Synthetic], list[tuple[T, tuple[int, ...]]]] | None = None

    def tensors(self) -> list[tuple[str, tuple[int, ...]]]:
        """Every tensor as (name, ne) in llama.cpp order (ne[0] is the row length)."""
        out: list[tuple[str, tuple[int, ...]]] = [
            ("token_embd.weight", (self.n_embd, self.n_vocab)),
            ("output_norm.weight", (self.n_embd,)),
            ("output.weight", (self.n_embd, self.n_vocab)),
        ]
        assert self.layer_tensors is not None
        for bid in range(self.n_layer):
            for kind, ne in self.layer_tensors(self):
                out.append((gguf.TENSOR_NAMES[kind].format(bid=bid) + ".weight", ne))
        return out


def _attention(m: Synthetic) -> list[tuple[T, tuple[int, ...]]]:
    return [
        (T.ATTN_NORM, (m.n_embd,)),
        (T.ATTN_Q, (m.n_embd, m.n_head * m.key_length)),
        (T.ATTN_K, (m.n_embd, m.n_head_kv * m.key_length)),
        (T.ATTN_V, (m.n_embd, m.n_head_kv * m.value_length)),
        (T.ATTN_OUT, (m.n_head * m.value_length, m.n_embd)),
        (T.FFN_NORM, (m.n_embd,)),
    ]


def _dense_ffn(m: Synthetic) -> list[tuple[T, tuple[int, ...]]]:
    return [
        (T.FFN_GATE, (m.n_embd, m.n_ff)),
        (T.FFN_UP, (m.n_embd, m.n_ff)),
        (T.FFN_DOWN, (m.n_ff, m.n_embd)),
    ]


def _mimo2_layer(m: Synthetic) -> list[tuple[T, tuple[int, ...]]]:
    return _attention(m) + _dense_ffn(m)


def _gemma3_layer(m: Synthetic) -> list[tuple[T, tuple[int, ...]]]:
    return _attention(m) + _dense_ffn(m) + [
        (T.ATTN_POST_NORM, (m.n_embd,)),
        (T.ATTN_Q_NORM, (m.key_length,)),
        (T.ATTN_K_NORM, (m.key_length,)),
        (T.FFN_POST_NORM, (m.n_embd,)),
    ]


def _qwen3moe_layer(m: Synthetic) -> list[tuple[T, tuple[int, ...]]]:
    n_expert = int(m.extra["expert_count"])  # type: ignore[call-overload]
    n_ff_exp = int(m.extra["expert_feed_forward_length"])  # type: ignore[call-overload]
    return _attention(m) + [
        (T.ATTN_Q_NORM, (m.key_length,)),
        (T.ATTN_K_NORM, (m.key_length,)),
        (T.FFN_GATE_INP, (m.n_embd, n_expert)),
        (T.FFN_GATE_EXP, (m.n_embd, n_ff_exp, n_expert)),
        (T.FFN_UP_EXP, (m.n_embd, n_ff_exp, n_expert)),
        (T.FFN_DOWN_EXP, (n_ff_exp, m.n_embd, n_expert)),
    ]


MODELS: dict[str, Synthetic] = {
    "kv_split": Synthetic(
        "kv_split", "mimo2", n_layer=8, n_embd=512, n_head=8, n_head_kv=2, key_length=96,
        value_length=64, n_ff=1536,
        extra={"sliding_window": 256, "sliding_window_pattern": [True, True, True, False] * 2,
               "expert_feed_forward_length": 512, "rope_dimension_count": 64},
        layer_tensors=_mimo2_layer,
    ),
    "swa": Synthetic(
        "swa", "gemma3", n_layer=12, n_embd=512, n_head=8, n_head_kv=4, key_length=64,
        value_length=64, n_ff=2048, extra={"sliding_window": 512},
        layer_tensors=_gemma3_layer,
    ),
    "moe": Synthetic(
        "moe", "qwen3moe", n_layer=8, n_embd=512, n_head=8, n_head_kv=4, key_length=64,
        value_length=64, n_ff=1536,
        extra={"expert_count": 16, "expert_used_count": 4, "expert_feed_forward_length": 512},
        layer_tensors=_qwen3moe_layer,
    ),
}


def _vocab(n: int) -> list[str]:
    # GPT-2 byte-level alphabet first (every byte must be a token), then filler tokens.
    alphabet = [chr(c) for c in range(33, 127)] + [chr(c) for c in range(161, 173)]
    alphabet += [chr(c) for c in range(174, 256)]
    alphabet += [chr(256 + i) for i in range(256 - len(alphabet))]
    return alphabet + ["<|endoftext|>"] + [f"w{i}" for i in range(n - len(alphabet) - 1)]


def write(model: Synthetic, path: Path, seed: int = 0) -> Path:
    """Write ``model`` to ``path`` (random weights, reproducible for a given seed)."""
    rng = np.random.default_rng(seed)
    writer = gguf.GGUFWriter(str(path), model.arch)
    writer.add_name(f"corral synthetic {model.name}")
    writer.add_block_count(model.n_layer)
    writer.add_context_length(model.n_ctx_train)
    writer.add_embedding_length(model.n_embd)
    writer.add_feed_forward_length(model.n_ff)
    writer.add_head_count(model.n_head)
    writer.add_head_count_kv(model.n_head_kv)
    writer.add_key_length(model.key_length)
    writer.add_value_length(model.value_length)
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_rope_freq_base(10000.0)
    writer.add_vocab_size(model.n_vocab)
    for key, value in model.extra.items():
        getattr(writer, f"add_{key}")(value)
    tokens = _vocab(model.n_vocab)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([1] * len(tokens))
    writer.add_token_merges(["w 0"])
    writer.add_eos_token_id(tokens.index("<|endoftext|>"))
    writer.add_bos_token_id(tokens.index("<|endoftext|>"))
    for name, ne in model.tensors():
        shape = tuple(reversed(ne))
        if len(ne) == 1:
            writer.add_tensor(name, np.ones(shape, dtype=np.float32))
            continue
        data = (rng.standard_normal(shape, dtype=np.float32) * 0.02).astype(np.float32)
        writer.add_tensor(name, gguf.quants.quantize(data, Q8), raw_dtype=Q8)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def write_all(outdir: Path, names: Sequence[str] = tuple(MODELS)) -> dict[str, Path]:
    """Write the named models into ``outdir`` (skipping files already there)."""
    outdir.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name in names:
        path = outdir / f"{name}.gguf"
        if not path.exists():
            write(MODELS[name], path)
        paths[name] = path
    return paths


if __name__ == "__main__":
    for name, p in write_all(Path(sys.argv[1] if len(sys.argv) > 1 else "bench/models")).items():
        print(name, p, p.stat().st_size)
