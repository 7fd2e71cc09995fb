"""ModelProfile from plain metadata: shapes, sliding-window patterns, recurrent layers, bytes."""

from __future__ import annotations

import pytest

from corral.placement.profile import profile_from_fields
from tests.placement.public_models import gemma3_27b, llama31_8b, mixtral_8x7b


def fields(arch: str = "llama", n_layer: int = 4, **extra: object) -> dict[str, object]:
    base: dict[str, object] = {
        "general.architecture": arch,
        f"{arch}.block_count": n_layer,
        f"{arch}.embedding_length": 256,
        f"{arch}.attention.head_count": 4,
        f"{arch}.attention.head_count_kv": 2,
        f"{arch}.context_length": 4096,
        f"{arch}.vocab_size": 1000,
    }
    base.update({f"{arch}.{k}" if not k.startswith("general.") else k: v
                 for k, v in extra.items()})
    return base


def test_defaults_follow_llama_cpp() -> None:
    p = profile_from_fields(fields(), [])
    # head dims default to n_embd / n_head = 256 / 4
    assert (p.key_length, p.value_length) == (64, 64)
    assert p.n_head == (4,) * 4 and p.n_head_kv == (2,) * 4
    assert p.kv_widths(0) == (128, 128)
    assert p.sliding_window == 0 and not p.is_swa(0)
    assert p.recurrent_layers == () and not p.is_recurrent(0)


def test_no_head_count_kv_means_no_gqa() -> None:
    f = fields()
    del f["llama.attention.head_count_kv"]
    assert profile_from_fields(f, []).n_head_kv == (4,) * 4


def test_per_layer_arrays() -> None:
    p = profile_from_fields(fields(**{"attention.head_count_kv": [2, 0, 4, 2],
                                      "feed_forward_length": [10, 20, 30, 40]}), [])
    assert p.n_head_kv == (2, 0, 4, 2)
    assert p.n_ff == (10, 20, 30, 40)
    assert p.kv_widths(1) == (0, 0)  # no KV heads, no cache
    assert p.kv_widths(2) == (256, 256)


def test_array_of_wrong_length_is_an_error() -> None:
    with pytest.raises(ValueError, match="head_count_kv: 3 values for 4 layers"):
        profile_from_fields(fields(**{"attention.head_count_kv": [1, 2, 3]}), [])


def test_missing_key_is_named() -> None:
    f = fields()
    del f["llama.block_count"]
    with pytest.raises(ValueError, match=r"llama\.block_count: missing"):
        profile_from_fields(f, [])
    with pytest.raises(ValueError, match="general.architecture"):
        profile_from_fields({}, [])


def test_vocab_from_token_list_length() -> None:
    f = fields()
    del f["llama.vocab_size"]
    f["tokenizer.ggml.tokens"] = range(777)  # the reader passes a length-only sequence
    assert profile_from_fields(f, []).n_vocab == 777


def test_tensor_bytes_by_block() -> None:
    tensors = [("token_embd.weight", 100), ("output_norm.weight", 4), ("output.weight", 300),
               ("blk.0.attn_q.weight", 10), ("blk.0.ffn_up.weight", 20),
               ("blk.3.attn_q.weight", 7), ("blk.9.nextn.eh_proj.weight", 50)]
    p = profile_from_fields(fields(), tensors)
    assert p.layer_bytes == (30, 0, 0, 7)
    assert (p.token_embd_bytes, p.output_bytes) == (100, 300)
    assert p.other_bytes == 54  # output norm + a block beyond block_count (an MTP head)
    assert not p.tied_output
    assert p.weight_bytes == 100 + 300 + 54 + 37


def test_gemma3_default_pattern_every_sixth_layer_global() -> None:
    p = profile_from_fields(fields("gemma3", 12, **{"attention.sliding_window": 512}), [])
    # llama.cpp set_swa_pattern(6): il % 6 < 5 slides, so layers 5 and 11 are global
    assert [il for il in range(12) if not p.is_swa(il)] == [5, 11]
    assert p.sliding_window == 512


def test_gemma3_without_window_has_no_swa() -> None:
    p = profile_from_fields(fields("gemma3", 12), [])
    assert p.sliding_window == 0 and not any(p.is_swa(il) for il in range(12))


def test_pattern_array_and_number_override_the_default() -> None:
    flags = [True, False, True, False]
    p = profile_from_fields(fields("mimo2", 4, **{"attention.sliding_window": 128,
                                                  "attention.sliding_window_pattern": flags}), [])
    assert [p.is_swa(il) for il in range(4)] == flags
    p = profile_from_fields(fields("gemma3", 4, **{"attention.sliding_window": 128,
                                                   "attention.sliding_window_pattern": 2}), [])
    assert [p.is_swa(il) for il in range(4)] == [True, False, True, False]


def test_dense_first_pattern_and_default_window() -> None:
    # cohere2moe: set_swa_pattern(4, dense_first) -> layers 0 and 4 are global
    p = profile_from_fields(fields("cohere2moe", 8, **{"attention.sliding_window": 4096}), [])
    assert [il for il in range(8) if not p.is_swa(il)] == [0, 4]
    # gemma2 has a 4096 window even when the file does not say so
    assert profile_from_fields(fields("gemma2", 4), []).sliding_window == 4096


def test_unknown_architecture_with_window_but_no_pattern_counts_full_cache() -> None:
    p = profile_from_fields(fields("llama", 4, **{"attention.sliding_window": 4096}), [])
    assert not any(p.is_swa(il) for il in range(4))  # over-estimates, never under


def test_swa_head_dims() -> None:
    p = profile_from_fields(fields("gemma3", 6, **{
        "attention.sliding_window": 512, "attention.key_length": 512,
        "attention.value_length": 512, "attention.key_length_swa": 256,
        "attention.value_length_swa": 128}), [])
    assert p.head_dims(0) == (256, 128)  # sliding layer
    assert p.head_dims(5) == (512, 512)  # global layer


def test_mamba_is_recurrent_everywhere() -> None:
    p = profile_from_fields(fields("mamba", 2, **{
        "ssm.conv_kernel": 4, "ssm.inner_size": 1536, "ssm.state_size": 16,
        "attention.head_count": 0, "attention.head_count_kv": 0}), [])
    assert p.recurrent_layers == (True, True)
    assert p.kv_widths(0) == (0, 0)
    assert p.recurrent_r_elements == 3 * 1536  # (kernel - 1) x inner (no groups)
    assert p.recurrent_s_elements == 16 * 1536


def test_hybrid_layers_without_kv_heads_are_recurrent() -> None:
    p = profile_from_fields(fields("granitehybrid", 4, **{
        "attention.head_count_kv": [0, 0, 0, 2], "ssm.conv_kernel": 4,
        "ssm.inner_size": 512, "ssm.state_size": 64, "ssm.group_count": 1}), [])
    assert p.recurrent_layers == (True, True, True, False)
    assert p.recurrent_r_elements == 3 * (512 + 2 * 64)
    assert p.kv_widths(3) == (128, 128)


def test_full_attention_interval_and_parallel_hybrid() -> None:
    p = profile_from_fields(fields("qwen3next", 8, **{
        "full_attention_interval": 4, "ssm.state_size": 128, "ssm.inner_size": 256,
        "ssm.conv_kernel": 4, "ssm.group_count": 2}), [])
    assert [il for il in range(8) if not p.is_recurrent(il)] == [3, 7]
    assert p.kv_widths(0) == (0, 0) and p.kv_widths(3) == (128, 128)
    p = profile_from_fields(fields("falcon-h1", 2, **{
        "ssm.state_size": 16, "ssm.inner_size": 64, "ssm.conv_kernel": 4}), [])
    assert p.parallel_hybrid and p.is_recurrent(0) and p.kv_widths(0) == (128, 128)


def test_mla_caches_k_only() -> None:
    p = profile_from_fields(fields("deepseek2", 2, **{
        "attention.head_count_kv": 1, "attention.key_length": 576,
        "attention.value_length": 512, "attention.key_length_mla": 192}), [])
    assert p.kv_widths(0) == (576, 0)


def test_public_profiles() -> None:
    llama = llama31_8b()
    assert llama.kv_widths(0) == (1024, 1024)  # 8 KV heads x 128
    assert 4.5 < llama.weight_bytes / 2**30 < 4.8  # a Q4_K_M 8B file is ~4.6 GiB
    mixtral = mixtral_8x7b()
    assert mixtral.n_ff_expert == 14336 and mixtral.ffn_width == 2 * 14336
    gemma = gemma3_27b()
    assert gemma.tied_output and sum(gemma.swa_layers) == 52  # 62 layers, 10 global


def test_explicit_zero_window_disables_the_default() -> None:
    assert profile_from_fields(fields("llama4", 8), []).sliding_window == 8192
    p = profile_from_fields(fields("llama4", 8, **{"attention.sliding_window": 0}), [])
    assert p.sliding_window == 0
