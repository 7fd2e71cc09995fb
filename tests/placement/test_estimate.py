"""estimate_memory against what llama-server 515e855 printed for the same settings.

The "printed" numbers below were read off ``llama-server --log-verbosity 4`` on the CPU build
(see docs/benchmarks.md for the full table and the command that reproduces it).
"""

from __future__ import annotations

import pytest

from corral.placement.estimate import (
    DEFAULT_GPU_OVERHEAD,
    estimate_memory,
    layer_devices,
    row_bytes,
    seq_context,
)
from corral.placement.profile import ModelProfile, profile_from_fields

MiB = 1 << 20


def smollm2() -> ModelProfile:
    """SmolLM2-135M-Instruct Q4_1 as its GGUF describes it (tied output, Q8_0 embeddings)."""
    fields: dict[str, object] = {
        "general.architecture": "llama", "llama.block_count": 30,
        "llama.embedding_length": 576, "llama.feed_forward_length": 1536,
        "llama.attention.head_count": 9, "llama.attention.head_count_kv": 3,
        "llama.context_length": 8192, "llama.vocab_size": 49152,
    }
    tensors = [("token_embd.weight", 30081024), ("output_norm.weight", 2304)]
    tensors += [(f"blk.{i}.all.weight", 2216448) for i in range(30)]
    return profile_from_fields(fields, tensors)


def kv_split() -> ModelProfile:
    """The bench's mimo2 model: 8 layers, K heads 96, V heads 64, 2 KV heads, window 256."""
    return profile_from_fields({
        "general.architecture": "mimo2", "mimo2.block_count": 8,
        "mimo2.embedding_length": 512, "mimo2.feed_forward_length": 1536,
        "mimo2.attention.head_count": 8, "mimo2.attention.head_count_kv": 2,
        "mimo2.attention.key_length": 96, "mimo2.attention.value_length": 64,
        "mimo2.attention.sliding_window": 256,
        "mimo2.attention.sliding_window_pattern": [True, True, True, False] * 2,
        "mimo2.vocab_size": 32000,
    }, [(f"blk.{i}.w.weight", 1000) for i in range(8)])


def test_smollm2_matches_llama_server() -> None:
    e = estimate_memory(smollm2(), slots=4, ctx_per_slot=2048).on("cpu")
    # printed: model 92.10, KV 180.00, output 0.75, compute 16.64 MiB
    assert round(e.weights / MiB, 2) == 92.10
    assert e.kv_cache == 180 * MiB  # 2 x 30 layers x 8192 cells x 192 x 2 bytes
    assert e.output == 49152 * 4 * 4  # vocab x f32 x one output per slot = 0.75 MiB
    assert abs(e.compute - 16.64 * MiB) < 0.1 * MiB
    assert e.recurrent_state == 0


@pytest.mark.parametrize(
    ("slots", "ctx", "k", "v", "kv_mib", "compute_mib"),
    [
        (1, 2048, "f16", "f16", 45.0, 16.64),
        (2, 4096, "q8_0", "q8_0", 95.625, 18.67),  # 34 bytes per 32 values
        (4, 2048, "q4_0", "q4_0", 50.625, 16.67),  # 18 bytes per 32 values
        (1, 8192, "f16", "q8_0", 137.8125, 22.66),
        (16, 512, "f16", "f16", 180.0, 15.14),
    ],
)
def test_smollm2_settings(
    slots: int, ctx: int, k: str, v: str, kv_mib: float, compute_mib: float
) -> None:
    e = estimate_memory(smollm2(), slots=slots, ctx_per_slot=ctx, cache_type_k=k,
                        cache_type_v=v).on("cpu")
    assert e.kv_cache == kv_mib * MiB
    assert abs(e.compute - compute_mib * MiB) < 0.1 * MiB


def test_without_flash_attention_compute_grows_and_stays_above() -> None:
    e = estimate_memory(smollm2(), slots=2, ctx_per_slot=2048, flash_attn=False).on("cpu")
    # printed 47.51 MiB: the attention scores 2048 x 512 x 9 heads x 4 bytes dominate
    assert 47.51 * MiB <= e.compute < 47.51 * MiB * 1.1
    with pytest.raises(ValueError, match="flash attention"):
        estimate_memory(smollm2(), slots=1, ctx_per_slot=256, cache_type_v="q8_0",
                        flash_attn=False)


def test_context_padding_like_llama_cpp() -> None:
    assert seq_context(3, 1000) == 1024  # -np 3 -c 3000: total padded to 3072
    assert seq_context(2, 500) == 512  # -np 2 -c 1000
    assert seq_context(4, 2048) == 2048


def test_row_bytes() -> None:
    assert row_bytes("f16", 192) == 384
    assert row_bytes("q8_0", 192) == 6 * 34
    assert row_bytes("q4_0", 64) == 36
    with pytest.raises(ValueError, match="multiple of 32"):
        row_bytes("q8_0", 48)
    with pytest.raises(ValueError, match="unknown cache type"):
        row_bytes("q3_k", 32)


def test_k_and_v_heads_of_different_sizes_with_sliding_window() -> None:
    e = estimate_memory(kv_split(), slots=2, ctx_per_slot=4096)
    # printed 10.00 + 5.62 MiB: 2 global layers x 2 slots x 4096 x (2x96 + 2x64) x 2 bytes,
    # 6 sliding layers x 2 slots x pad256(256 + 512) = 768 cells x 320 x 2 bytes
    assert e.on("cpu").kv_cache == 2 * 2 * 4096 * 320 * 2 + 6 * 2 * 768 * 320 * 2
    assert e.swa_cells == 768


def test_sliding_window_cells() -> None:
    p = kv_split()
    assert estimate_memory(p, slots=1, ctx_per_slot=512).swa_cells == 512  # min(ctx, ...)
    assert estimate_memory(p, slots=1, ctx_per_slot=4096, n_ubatch=256).swa_cells == 512
    assert estimate_memory(p, slots=1, ctx_per_slot=4096, swa_full=True).swa_cells == 4096


def test_transposed_v_is_padded_to_the_widest_layer() -> None:
    p = profile_from_fields({
        "general.architecture": "llama", "llama.block_count": 2, "llama.embedding_length": 256,
        "llama.attention.head_count": 4, "llama.attention.head_count_kv": [1, 4],
    }, [])
    fa = estimate_memory(p, slots=1, ctx_per_slot=256).on("cpu").kv_cache
    no_fa = estimate_memory(p, slots=1, ctx_per_slot=256, flash_attn=False).on("cpu").kv_cache
    assert fa == 256 * (64 + 64 + 256 + 256) * 2
    assert no_fa == 256 * (64 + 256 + 256 + 256) * 2  # layer 0's V padded to 4 heads


def test_recurrent_state() -> None:
    p = profile_from_fields({
        "general.architecture": "mamba", "mamba.block_count": 3, "mamba.embedding_length": 768,
        "mamba.ssm.conv_kernel": 4, "mamba.ssm.inner_size": 1536, "mamba.ssm.state_size": 16,
    }, [])
    e = estimate_memory(p, slots=2, ctx_per_slot=256).on("cpu")
    assert e.kv_cache == 0
    assert e.recurrent_state == 3 * 2 * (3 * 1536 + 16 * 1536) * 4


def test_gpu_layers_count_the_output_layer() -> None:
    split = [("cuda:0", 1.0)]
    assert layer_devices(4, 0, split) == ("cpu",) * 5
    assert layer_devices(4, 1, split) == ("cpu",) * 4 + ("cuda:0",)  # only the output layer
    assert layer_devices(4, 2, split) == ("cpu",) * 3 + ("cuda:0",) * 2
    assert layer_devices(4, 99, split) == ("cuda:0",) * 5
    two = [("cuda:0", 1.0), ("cuda:1", 1.0)]
    # split points 0.5, 1.0 over 5 layers: 0, .2, .4 -> first GPU; .6, .8 -> second
    assert layer_devices(4, 5, two) == ("cuda:0",) * 3 + ("cuda:1",) * 2
    # integer weights = layer counts reproduce themselves
    assert layer_devices(4, 5, [("cuda:0", 2.0), ("cuda:1", 3.0)]).count("cuda:0") == 2


def test_weights_follow_layers_and_tied_output_is_duplicated() -> None:
    p = smollm2()
    full = estimate_memory(p, slots=1, ctx_per_slot=256, gpu_layers=31,
                           gpu_split=[("cuda:0", 1.0)])
    # token embeddings stay on the CPU; the tied output is copied to the GPU with the norm
    assert full.on("cpu").weights == 30081024
    assert full.on("cuda:0").weights == 30 * 2216448 + 30081024 + 2304
    assert full.on("cuda:0").kv_cache == 30 * 256 * 384 * 2
    assert full.on("cuda:0").overhead == DEFAULT_GPU_OVERHEAD
    partial = estimate_memory(p, slots=1, ctx_per_slot=256, gpu_layers=10,
                              gpu_split=[("cuda:0", 1.0)])
    # -ngl 10: the output layer and the last 9 blocks on the GPU, 21 blocks on the CPU
    assert partial.on("cuda:0").weights == 9 * 2216448 + 30081024 + 2304
    assert partial.on("cpu").weights == 30081024 + 21 * 2216448
    assert partial.on("cpu").kv_cache == 21 * 256 * 384 * 2
    # the CPU runs layers too, so it needs a full compute buffer; the GPU also gets room for
    # one CPU layer's weights (large batches of CPU layers are computed on the GPU)
    assert partial.on("cpu").compute > full.on("cpu").compute
    assert partial.on("cuda:0").compute >= full.on("cuda:0").compute + 2216448


def test_pipeline_parallel_and_reservation() -> None:
    e = estimate_memory(smollm2(), slots=1, ctx_per_slot=256, gpu_layers=31,
                        gpu_split=[("cuda:0", 1.0), ("cuda:1", 1.0)])
    one = estimate_memory(smollm2(), slots=1, ctx_per_slot=256, gpu_layers=31,
                          gpu_split=[("cuda:0", 1.0)])
    assert e.on("cuda:0").compute > one.on("cuda:0").compute  # inputs kept in 4 copies
    assert set(e.reservation()) == {"cpu", "cuda:0", "cuda:1"}
    assert e.total == sum(e.reservation().values())
    with pytest.raises(ValueError, match="gpu_split"):
        estimate_memory(smollm2(), slots=1, ctx_per_slot=256, gpu_layers=3)


def test_host_extras() -> None:
    base = estimate_memory(kv_split(), slots=2, ctx_per_slot=1024).on("cpu").overhead
    extra = estimate_memory(kv_split(), slots=2, ctx_per_slot=1024, cache_ram=100 * MiB,
                            ctx_checkpoints=3).on("cpu").overhead
    # a checkpoint: the window's 256 cells of the 6 sliding layers, and each cell's position
    checkpoint = 6 * 256 * 320 * 2 + 12 * 256
    assert extra - base == 100 * MiB + 3 * 2 * checkpoint
    # a model without sliding or recurrent layers keeps no checkpoints
    assert estimate_memory(smollm2(), slots=1, ctx_per_slot=256, ctx_checkpoints=3).on(
        "cpu").overhead == estimate_memory(smollm2(), slots=1, ctx_per_slot=256).on(
        "cpu").overhead


def test_a_projector_goes_to_the_first_gpu_or_the_host() -> None:
    kw = {"slots": 1, "ctx_per_slot": 256}
    cpu = estimate_memory(smollm2(), **kw, projector_bytes=300 * MiB)
    assert cpu.on("cpu").weights == estimate_memory(smollm2(), **kw).on("cpu").weights + 300 * MiB
    split = [("cuda:0", 1.0), ("cuda:1", 1.0)]
    gpu = estimate_memory(smollm2(), **kw, gpu_layers=31, gpu_split=split,
                          projector_bytes=300 * MiB)
    plain = estimate_memory(smollm2(), **kw, gpu_layers=31, gpu_split=split)
    assert gpu.on("cuda:0").weights == plain.on("cuda:0").weights + 300 * MiB
    assert gpu.on("cuda:1").weights == plain.on("cuda:1").weights
    assert gpu.on("cpu").weights == plain.on("cpu").weights
