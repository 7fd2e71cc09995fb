"""Profiles of public models built from their published hyper-parameters, without any file.

Tensor sizes assume a Q4_K_M-like file: every block matrix at 4.85 bits per weight, token
embeddings at Q4_K (4.5 bits), the output projection at Q6_K (6.5625 bits), norms in F32. Real
files differ by a few percent (llama.cpp mixes Q4_K and Q6_K inside blocks); the planner tests
work their expectations out from the same numbers, so they test the decisions, not the quant.

Hyper-parameters (config.json of each model card):

| model | layers | n_embd | n_ff | heads/kv | head | vocab | ctx | other |
| --- | --- | --- | --- | --- | --- | --- | --- | --- |
| Llama-3.1-8B | 32 | 4096 | 14336 | 32/8 | 128 | 128256 | 131072 | |
| Llama-3.1-70B | 80 | 8192 | 28672 | 64/8 | 128 | 128256 | 131072 | |
| Qwen2.5-32B | 64 | 5120 | 27648 | 40/8 | 128 | 152064 | 32768 | q/k/v biases |
| Mixtral-8x7B | 32 | 4096 | 14336 | 32/8 | 128 | 32000 | 32768 | 8 experts, 2 used |
| Gemma-3-27B | 62 | 5376 | 21504 | 32/16 | 128 | 262208 | 131072 | window 1024, 5:1, tied |
"""

from __future__ import annotations

from corral.placement.profile import ModelProfile, profile_from_fields

BPW_BLOCK = 4.85
BPW_EMBD = 4.5
BPW_OUTPUT = 6.5625
GiB = 1 << 30
MiB = 1 << 20


def _q(n_params: int, bpw: float) -> int:
    return int(n_params * bpw / 8)


def _build(
    arch: str, *, n_layer: int, n_embd: int, n_ff: int, n_head: int, n_head_kv: int,
    head_dim: int, n_vocab: int, n_ctx: int, n_expert: int = 0, n_expert_used: int = 0,
    tied: bool = False, bias: bool = False, extra: dict[str, object] | None = None,
) -> ModelProfile:
    fields: dict[str, object] = {
        "general.architecture": arch,
        f"{arch}.block_count": n_layer,
        f"{arch}.embedding_length": n_embd,
        f"{arch}.feed_forward_length": n_ff,
        f"{arch}.attention.head_count": n_head,
        f"{arch}.attention.head_count_kv": n_head_kv,
        f"{arch}.attention.key_length": head_dim,
        f"{arch}.attention.value_length": head_dim,
        f"{arch}.context_length": n_ctx,
        f"{arch}.vocab_size": n_vocab,
    }
    if n_expert:
        fields[f"{arch}.expert_count"] = n_expert
        fields[f"{arch}.expert_used_count"] = n_expert_used
    fields.update(extra or {})
    q, kv = n_head * head_dim, n_head_kv * head_dim
    tensors: list[tuple[str, int]] = [("token_embd.weight", _q(n_vocab * n_embd, BPW_EMBD)),
                                      ("output_norm.weight", 4 * n_embd)]
    if not tied:
        tensors.append(("output.weight", _q(n_vocab * n_embd, BPW_OUTPUT)))
    for i in range(n_layer):
        blk = f"blk.{i}."
        tensors += [
            (blk + "attn_norm.weight", 4 * n_embd),
            (blk + "ffn_norm.weight", 4 * n_embd),
            (blk + "attn_q.weight", _q(n_embd * q, BPW_BLOCK)),
            (blk + "attn_k.weight", _q(n_embd * kv, BPW_BLOCK)),
            (blk + "attn_v.weight", _q(n_embd * kv, BPW_BLOCK)),
            (blk + "attn_output.weight", _q(q * n_embd, BPW_BLOCK)),
        ]
        if bias:
            tensors += [(blk + "attn_q.bias", 4 * q), (blk + "attn_k.bias", 4 * kv),
                        (blk + "attn_v.bias", 4 * kv)]
        if n_expert:
            tensors += [
                (blk + "ffn_gate_inp.weight", 4 * n_embd * n_expert),
                (blk + "ffn_gate_exps.weight", _q(n_expert * n_embd * n_ff, BPW_BLOCK)),
                (blk + "ffn_up_exps.weight", _q(n_expert * n_embd * n_ff, BPW_BLOCK)),
                (blk + "ffn_down_exps.weight", _q(n_expert * n_ff * n_embd, BPW_BLOCK)),
            ]
        else:
            tensors += [
                (blk + "ffn_gate.weight", _q(n_embd * n_ff, BPW_BLOCK)),
                (blk + "ffn_up.weight", _q(n_embd * n_ff, BPW_BLOCK)),
                (blk + "ffn_down.weight", _q(n_ff * n_embd, BPW_BLOCK)),
            ]
    return profile_from_fields(fields, tensors)


def llama31_8b() -> ModelProfile:
    return _build("llama", n_layer=32, n_embd=4096, n_ff=14336, n_head=32, n_head_kv=8,
                  head_dim=128, n_vocab=128256, n_ctx=131072)


def llama31_70b() -> ModelProfile:
    return _build("llama", n_layer=80, n_embd=8192, n_ff=28672, n_head=64, n_head_kv=8,
                  head_dim=128, n_vocab=128256, n_ctx=131072)


def qwen25_32b() -> ModelProfile:
    return _build("qwen2", n_layer=64, n_embd=5120, n_ff=27648, n_head=40, n_head_kv=8,
                  head_dim=128, n_vocab=152064, n_ctx=32768, bias=True)


def mixtral_8x7b() -> ModelProfile:
    return _build("llama", n_layer=32, n_embd=4096, n_ff=14336, n_head=32, n_head_kv=8,
                  head_dim=128, n_vocab=32000, n_ctx=32768, n_expert=8, n_expert_used=2)


def gemma3_27b() -> ModelProfile:
    return _build("gemma3", n_layer=62, n_embd=5376, n_ff=21504, n_head=32, n_head_kv=16,
                  head_dim=128, n_vocab=262208, n_ctx=131072, tied=True,
                  extra={"gemma3.attention.sliding_window": 1024})
