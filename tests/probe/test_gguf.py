"""read_profile on the real SmolLM2 file and on small GGUFs written here with GGUFWriter."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import gguf
import numpy as np
import pytest

from corral.probe.gguf import clear_cache, read_profile


@pytest.mark.integration
def test_smollm2(smollm2: Path, smollm2_header: Path) -> None:
    p = read_profile(smollm2)
    assert p.architecture == "llama"
    assert (p.n_layer, p.n_embd, p.n_vocab, p.n_ctx_train) == (30, 576, 49152, 8192)
    assert p.n_head == (9,) * 30 and p.n_head_kv == (3,) * 30
    assert (p.key_length, p.value_length) == (64, 64)
    assert p.tied_output and p.sliding_window == 0 and p.n_expert == 0
    # llama-server prints "CPU_Mapped model buffer size = 92.10 MiB" for this file
    assert round(p.weight_bytes / 2**20, 2) == 92.10
    assert p.token_embd_bytes == 576 * 49152 // 32 * 34  # Q8_0
    assert read_profile(smollm2) is p  # cached
    # What the other tests place instead of the model, so they need no model wheel.
    assert read_profile(smollm2_header) == p


def write(path: Path, arch: str, fields: dict[str, object],
          tensors: Sequence[tuple[str, tuple[int, ...], gguf.GGMLQuantizationType]]) -> Path:
    writer = gguf.GGUFWriter(str(path), arch)
    for key, value in fields.items():
        if isinstance(value, bool):
            writer.add_bool(key, value)
        elif isinstance(value, int):
            writer.add_uint32(key, value)
        elif isinstance(value, list):
            writer.add_array(key, value)
        else:
            writer.add_string(key, str(value))
    for name, shape, qtype in tensors:
        data = np.zeros(shape, dtype=np.float32)
        if qtype == gguf.GGMLQuantizationType.F32:
            writer.add_tensor(name, data)
        else:
            writer.add_tensor(name, gguf.quants.quantize(data, qtype), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


Q8 = gguf.GGMLQuantizationType.Q8_0
F32 = gguf.GGMLQuantizationType.F32


def gemma3(path: Path, n_layer: int = 6, tied: bool = True) -> Path:
    tensors = [("token_embd.weight", (100, 64), Q8), ("output_norm.weight", (64,), F32)]
    if not tied:
        tensors.append(("output.weight", (100, 64), Q8))
    for i in range(n_layer):
        tensors += [(f"blk.{i}.attn_q.weight", (64, 64), Q8),
                    (f"blk.{i}.attn_norm.weight", (64,), F32)]
    return write(path, "gemma3", {
        "gemma3.block_count": n_layer, "gemma3.embedding_length": 64,
        "gemma3.feed_forward_length": 256, "gemma3.attention.head_count": 4,
        "gemma3.attention.head_count_kv": 2, "gemma3.attention.key_length": 32,
        "gemma3.attention.value_length": 32, "gemma3.attention.sliding_window": 512,
        "gemma3.context_length": 32768, "tokenizer.ggml.tokens": [f"t{i}" for i in range(100)],
    }, tensors)


def test_synthetic_gemma3_sliding_window(tmp_path: Path) -> None:
    p = read_profile(gemma3(tmp_path / "g.gguf", n_layer=12))
    assert p.sliding_window == 512
    assert [il for il in range(12) if not p.is_swa(il)] == [5, 11]
    assert p.n_vocab == 100  # no vocab_size key: the token list's length
    assert p.layer_bytes == (64 * 64 // 32 * 34 + 64 * 4,) * 12
    assert p.tied_output and p.other_bytes == 64 * 4


def test_untied_output(tmp_path: Path) -> None:
    p = read_profile(gemma3(tmp_path / "g.gguf", tied=False))
    assert p.output_bytes == 100 * 64 // 32 * 34 and not p.tied_output


def test_per_layer_arrays_and_pattern_array(tmp_path: Path) -> None:
    path = write(tmp_path / "m.gguf", "mimo2", {
        "mimo2.block_count": 4, "mimo2.embedding_length": 128,
        "mimo2.attention.head_count": [4, 4, 8, 8], "mimo2.attention.head_count_kv": [1, 1, 2, 2],
        "mimo2.attention.key_length": 96, "mimo2.attention.value_length": 64,
        "mimo2.attention.sliding_window": 128,
        "mimo2.attention.sliding_window_pattern": [True, False, True, False],
        "mimo2.expert_count": 8, "mimo2.expert_used_count": 2,
        "mimo2.expert_feed_forward_length": 64,
    }, [("blk.0.attn_q.weight", (32, 128), Q8)])
    p = read_profile(path)
    assert p.n_head_kv == (1, 1, 2, 2) and p.n_head == (4, 4, 8, 8)
    assert [p.is_swa(il) for il in range(4)] == [True, False, True, False]
    assert p.kv_widths(2) == (192, 128)
    assert (p.n_expert, p.n_expert_used, p.ffn_width) == (8, 2, 128)


def test_mamba_state_sizes(tmp_path: Path) -> None:
    path = write(tmp_path / "mamba.gguf", "mamba", {
        "mamba.block_count": 2, "mamba.embedding_length": 64, "mamba.ssm.conv_kernel": 4,
        "mamba.ssm.inner_size": 128, "mamba.ssm.state_size": 16,
        "mamba.ssm.time_step_rank": 4, "mamba.context_length": 1048576,
    }, [])
    p = read_profile(path)
    assert p.recurrent_layers == (True, True)
    assert (p.recurrent_r_elements, p.recurrent_s_elements) == (3 * 128, 16 * 128)


def test_cache_follows_size_and_mtime(tmp_path: Path) -> None:
    path = gemma3(tmp_path / "g.gguf", n_layer=6)
    first = read_profile(path)
    assert read_profile(str(path)) is first
    gemma3(path, n_layer=12)  # rewritten: new size
    assert read_profile(path).n_layer == 12
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    assert read_profile(path) is not first
    clear_cache()


def test_errors_name_the_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a gguf at all, just bytes" * 10)
    with pytest.raises(ValueError):
        read_profile(bad)
    incomplete = write(tmp_path / "inc.gguf", "llama", {"llama.embedding_length": 64}, [])
    with pytest.raises(ValueError, match=r"inc\.gguf: llama\.block_count: missing"):
        read_profile(incomplete)
    with pytest.raises(OSError):
        read_profile(tmp_path / "absent.gguf")
