"""What a model file says about its memory needs: shapes per layer and tensor bytes per block.

``ModelProfile`` is a frozen summary of a GGUF file's metadata and tensor sizes, enough to
estimate the memory llama-server allocates for it (see ``corral.placement.estimate``). It is built
by ``profile_from_fields`` from plain values (metadata key -> value, tensor name -> bytes), so
tests can describe public models from their published hyper-parameters without any file;
``corral.probe.gguf.read_profile`` feeds it from a real file (the tensors of every shard of a
split model, metadata from the first).

Supported metadata, following llama.cpp (commit 515e855) key names, ``{arch}`` being
``general.architecture``:

- shapes: ``{arch}.block_count``, ``.embedding_length``, ``.feed_forward_length`` and
  ``.attention.head_count`` / ``.attention.head_count_kv`` (each a scalar or one value per layer),
  ``.attention.key_length`` / ``.value_length`` (head dims, default ``n_embd / n_head``) and their
  ``_swa`` variants for sliding-window layers, ``.context_length``, ``.vocab_size`` (else the
  length of ``tokenizer.ggml.tokens``), ``.expert_count``, ``.expert_used_count``,
  ``.expert_feed_forward_length``.
- sliding window: ``.attention.sliding_window`` (tokens) with ``.attention.sliding_window_pattern``
  either a per-layer array of booleans (true = sliding) or a number N; without the key, the
  architecture's own default from ``SWA_PATTERNS`` applies. A number N means llama.cpp's
  ``set_swa_pattern``: every N-th layer is global (the last of each group of N, or the first when
  the architecture is "dense first"); N = 0 makes every layer sliding. Architectures not in
  ``SWA_PATTERNS`` and without a pattern key get no sliding layers: the estimate then counts a
  full cache for every layer, which can only over-estimate.
- recurrent state: ``.ssm.conv_kernel``, ``.ssm.inner_size``, ``.ssm.state_size``,
  ``.ssm.group_count`` (Mamba, Mamba-2, gated delta nets), ``.wkv.head_size`` and
  ``.token_shift_count`` (RWKV). Pure recurrent architectures (``RECURRENT_ARCHS``) have only
  recurrent layers; in hybrid models a layer with ``head_count_kv == 0`` is recurrent, or every
  layer but each ``.full_attention_interval``-th.
- multi-head latent attention (DeepSeek-style): ``.attention.key_length_mla`` present means the
  cache holds K only (``key_length`` per position, no V).

Not modelled (each makes the estimate too high, never too low): KV sharing across layers
(Gemma-3n/Gemma-4 ``n_layer_kv_from_start``) and multi-token-prediction layers.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

# Architecture -> (default N of set_swa_pattern, dense_first, default window or 0 = from file).
# Read off each architecture's load_arch_hparams in llama.cpp 515e855 (src/models/*.cpp).
SWA_PATTERNS: dict[str, tuple[int, bool, int]] = {
    "gemma2": (2, False, 4096),
    "gemma3": (6, False, 0),
    "gemma-embedding": (6, False, 0),
    "gemma3n": (5, False, 0),
    "cohere2": (4, False, 0),
    "cohere2moe": (4, True, 0),
    "exaone4": (4, False, 4096),
    "exaone-moe": (4, False, 128),
    "llama4": (4, False, 8192),
    "olmo2": (4, False, 0),
    "gpt-oss": (2, False, 0),
    "afmoe": (4, False, 0),
    "mellum": (4, False, 0),
    "plamo3": (8, False, 0),
    "smallthinker": (4, True, 4096),
    "muse-glimmer": (4, False, 0),
    "laguna": (4, True, 0),
    "modern-bert": (3, True, 0),
}

# Architectures whose every layer keeps a recurrent state and none a KV cache.
RECURRENT_ARCHS = frozenset({"mamba", "mamba2", "rwkv6", "rwkv6qwen2", "rwkv7", "arwkv7"})

_BLOCK = re.compile(r"^blk\.(\d+)\.")


@dataclass(frozen=True)
class ModelProfile:
    """A model's memory-relevant shape. Per-layer tuples are indexed by block number."""

    architecture: str
    n_layer: int
    n_embd: int
    n_head: tuple[int, ...]
    n_head_kv: tuple[int, ...]
    key_length: int
    value_length: int
    n_vocab: int
    n_ctx_train: int
    layer_bytes: tuple[int, ...]
    token_embd_bytes: int
    output_bytes: int  # 0 when the output projection is tied to the token embeddings
    other_bytes: int  # output norm and any other tensor outside the blocks
    n_ff: tuple[int, ...] = ()
    key_length_swa: int = 0  # 0: same as key_length
    value_length_swa: int = 0
    sliding_window: int = 0  # 0: no sliding-window attention
    swa_layers: tuple[bool, ...] = ()  # True where the layer attends only to the window
    n_expert: int = 0
    n_expert_used: int = 0
    n_ff_expert: int = 0
    recurrent_layers: tuple[bool, ...] = ()
    ssm_conv_kernel: int = 0
    ssm_inner_size: int = 0
    ssm_state_size: int = 0
    ssm_group_count: int = 0
    wkv_head_size: int = 0
    token_shift_count: int = 0
    parallel_hybrid: bool = False  # recurrent and attention side by side in every layer
    mla: bool = False  # K-only latent cache
    # Each block's tensors by name, for the tensors --override-tensor / --cpu-moe move.
    layer_tensors: tuple[tuple[tuple[str, int], ...], ...] = ()

    @property
    def tied_output(self) -> bool:
        """True when llama.cpp reuses the token embeddings as the output projection."""
        return self.output_bytes == 0

    @property
    def weight_bytes(self) -> int:
        """Bytes of every tensor in the file (a tied output counted once)."""
        return (
            sum(self.layer_bytes) + self.token_embd_bytes + self.output_bytes + self.other_bytes
        )

    def is_swa(self, il: int) -> bool:
        """Whether layer ``il`` keeps only the sliding window in its cache."""
        return bool(self.swa_layers) and self.sliding_window > 0 and self.swa_layers[il]

    def is_recurrent(self, il: int) -> bool:
        """Whether layer ``il`` keeps a recurrent state instead of a KV cache."""
        return bool(self.recurrent_layers) and self.recurrent_layers[il]

    def head_dims(self, il: int) -> tuple[int, int]:
        """(K, V) head dimensions of layer ``il``; sliding layers may have their own."""
        if self.is_swa(il):
            return (
                self.key_length_swa or self.key_length,
                self.value_length_swa or self.value_length,
            )
        return (self.key_length, self.value_length)

    def kv_widths(self, il: int) -> tuple[int, int]:
        """Elements per cached token in layer ``il``: (K, V); (0, 0) for a recurrent layer."""
        if self.n_head_kv[il] == 0 or (self.is_recurrent(il) and not self.parallel_hybrid):
            return (0, 0)
        k, v = self.head_dims(il)
        heads = self.n_head_kv[il]
        return (k * heads, 0 if self.mla else v * heads)

    @property
    def recurrent_r_elements(self) -> int:
        """Conv/token-shift state per recurrent layer and sequence (llama.cpp ``n_embd_r``)."""
        if self.wkv_head_size:
            return self.token_shift_count * self.n_embd
        if self.ssm_conv_kernel <= 0:
            return 0
        return (self.ssm_conv_kernel - 1) * (
            self.ssm_inner_size + 2 * self.ssm_group_count * self.ssm_state_size
        )

    @property
    def recurrent_s_elements(self) -> int:
        """SSM/WKV state per recurrent layer and sequence (llama.cpp ``n_embd_s``)."""
        if self.wkv_head_size:
            return self.n_embd * self.wkv_head_size
        return self.ssm_state_size * self.ssm_inner_size

    @property
    def ffn_width(self) -> int:
        """Widest per-token feed-forward activation: dense, or all selected experts together."""
        dense = max(self.n_ff, default=0)
        experts = self.n_ff_expert * self.n_expert_used if self.n_expert else 0
        return max(dense, experts)


def _int(value: object, key: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{key}: expected a number, got {value!r}")
    return int(value)


def _per_layer(
    fields: Mapping[str, object], key: str, n_layer: int, default: int
) -> tuple[int, ...]:
    """A scalar or per-layer array as one value per layer."""
    value = fields.get(key)
    if value is None:
        return (default,) * n_layer
    if isinstance(value, Sequence) and not isinstance(value, str | bytes):
        values = tuple(_int(v, key) for v in value)
        if len(values) != n_layer:
            raise ValueError(f"{key}: {len(values)} values for {n_layer} layers")
        return values
    return (_int(value, key),) * n_layer


def _swa_layers(
    fields: Mapping[str, object], arch: str, n_layer: int, window: int
) -> tuple[bool, ...]:
    if window <= 0:
        return ()
    pattern = fields.get(f"{arch}.attention.sliding_window_pattern")
    if isinstance(pattern, Sequence) and not isinstance(pattern, str | bytes):
        flags = tuple(bool(v) for v in pattern)
        if len(flags) < n_layer:
            raise ValueError(f"{arch}.attention.sliding_window_pattern: too few values")
        return flags[:n_layer]
    n, dense_first, _ = SWA_PATTERNS.get(arch, (-1, False, 0))
    if pattern is not None:
        n = _int(pattern, f"{arch}.attention.sliding_window_pattern")
    if n < 0:
        return ()
    # llama.cpp set_swa_pattern: N = 0 means every layer slides, N = 1 none.
    if dense_first:
        return tuple(n == 0 or il % n != 0 for il in range(n_layer))
    return tuple(n == 0 or il % n < n - 1 for il in range(n_layer))


def _recurrent_layers(
    fields: Mapping[str, object], arch: str, n_layer: int, n_head_kv: tuple[int, ...]
) -> tuple[tuple[bool, ...], bool]:
    """Which layers keep a recurrent state, and whether they also keep a KV cache."""
    if arch in RECURRENT_ARCHS:
        return (True,) * n_layer, False
    has_state = any(k in fields for k in (f"{arch}.ssm.state_size", f"{arch}.wkv.head_size"))
    if not has_state:
        return (), False
    interval = fields.get(f"{arch}.full_attention_interval")
    if interval is not None:
        n = _int(interval, f"{arch}.full_attention_interval")
        if n < 1:
            raise ValueError(f"{arch}.full_attention_interval: must be >= 1, got {n}")
        return tuple((il + 1) % n != 0 for il in range(n_layer)), False
    if any(h == 0 for h in n_head_kv):
        return tuple(h == 0 for h in n_head_kv), False
    # Falcon-H1 style: every layer runs attention and a state-space mixer side by side.
    return (True,) * n_layer, True


def _tensor_bytes(
    tensors: Sequence[tuple[str, int]], n_layer: int
) -> tuple[tuple[int, ...], int, int, int, tuple[tuple[tuple[str, int], ...], ...]]:
    layers = [0] * n_layer
    named: list[list[tuple[str, int]]] = [[] for _ in range(n_layer)]
    token_embd = output = other = 0
    for name, size in tensors:
        match = _BLOCK.match(name)
        if match and int(match.group(1)) < n_layer:
            layers[int(match.group(1))] += size
            named[int(match.group(1))].append((name, size))
        elif name.startswith("token_embd."):
            token_embd += size
        elif name == "output.weight":
            output += size
        else:
            # Output norm, extra blocks (MTP heads): llama.cpp puts them with the output layer.
            other += size
    return tuple(layers), token_embd, output, other, tuple(tuple(t) for t in named)


def profile_from_fields(
    fields: Mapping[str, object], tensors: Sequence[tuple[str, int]]
) -> ModelProfile:
    """Build a profile from GGUF metadata (key -> value) and tensor sizes (name -> bytes).

    Values are plain Python: numbers, strings, or sequences for arrays; for
    ``tokenizer.ggml.tokens`` only the length is used. Raises ``ValueError`` naming the key
    when a required one is missing or malformed.
    """
    arch = fields.get("general.architecture")
    if not isinstance(arch, str) or not arch:
        raise ValueError("general.architecture: missing")

    def need(key: str) -> int:
        if f"{arch}.{key}" not in fields:
            raise ValueError(f"{arch}.{key}: missing")
        return _int(fields[f"{arch}.{key}"], f"{arch}.{key}")

    def opt(key: str, default: int = 0) -> int:
        value = fields.get(f"{arch}.{key}")
        return default if value is None else _int(value, f"{arch}.{key}")

    n_layer = need("block_count")
    n_embd = need("embedding_length")
    n_head = _per_layer(fields, f"{arch}.attention.head_count", n_layer, 0)
    n_head_kv = _per_layer(fields, f"{arch}.attention.head_count_kv", n_layer, 0)
    if f"{arch}.attention.head_count_kv" not in fields:
        n_head_kv = n_head  # llama.cpp: no key means no grouped-query attention
    head0 = max(n_head, default=0)
    default_head_dim = n_embd // head0 if head0 else 0
    key_length = opt("attention.key_length", default_head_dim)
    value_length = opt("attention.value_length", default_head_dim)

    n_vocab = opt("vocab_size")
    if not n_vocab:
        tokens = fields.get("tokenizer.ggml.tokens")
        n_vocab = len(tokens) if isinstance(tokens, Sequence) else 0

    window = opt("attention.sliding_window")
    if f"{arch}.attention.sliding_window" not in fields and arch in SWA_PATTERNS:
        window = SWA_PATTERNS[arch][2]  # an explicit 0 (llama4 without chunking) stays 0
    swa = _swa_layers(fields, arch, n_layer, window)
    if not any(swa):
        window, swa = 0, ()

    layer_bytes, token_embd, output, other, named = _tensor_bytes(tensors, n_layer)
    n_ff = _per_layer(fields, f"{arch}.feed_forward_length", n_layer, 0)
    n_expert = opt("expert_count")
    recurrent, parallel_hybrid = _recurrent_layers(fields, arch, n_layer, n_head_kv)
    return ModelProfile(
        architecture=arch,
        n_layer=n_layer,
        n_embd=n_embd,
        n_head=n_head,
        n_head_kv=n_head_kv,
        key_length=key_length,
        value_length=value_length,
        n_vocab=n_vocab,
        n_ctx_train=opt("context_length"),
        layer_bytes=layer_bytes,
        token_embd_bytes=token_embd,
        output_bytes=output,
        other_bytes=other,
        n_ff=n_ff,
        key_length_swa=opt("attention.key_length_swa"),
        value_length_swa=opt("attention.value_length_swa"),
        sliding_window=window,
        swa_layers=swa,
        n_expert=n_expert,
        n_expert_used=opt("expert_used_count"),
        # llama-architecture MoE files (Mixtral) give the expert width as feed_forward_length.
        n_ff_expert=opt("expert_feed_forward_length", max(n_ff, default=0) if n_expert else 0),
        recurrent_layers=recurrent,
        parallel_hybrid=parallel_hybrid,
        ssm_conv_kernel=opt("ssm.conv_kernel"),
        ssm_inner_size=opt("ssm.inner_size"),
        ssm_state_size=opt("ssm.state_size"),
        ssm_group_count=opt("ssm.group_count"),
        wkv_head_size=opt("wkv.head_size"),
        token_shift_count=opt("token_shift_count", 2),
        mla=f"{arch}.attention.key_length_mla" in fields,
        layer_tensors=named,
    )
