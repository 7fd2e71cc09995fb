"""How many bytes llama-server allocates on each device for a model and a capacity.

``estimate_memory`` mirrors what llama.cpp (commit 515e855) allocates for one llama-server child
started with ``-np SLOTS -c SLOTS*CTX --fit off -ngl N [--tensor-split ...]``:

- weights: blocks go where ``-ngl`` puts them (see ``layer_devices``); the token embeddings stay
  on the CPU; the output projection, output norm and any extra tensors go with the "output
  layer". A tied output (no ``output.weight``) is duplicated onto the GPU when the output layer
  is offloaded, as llama.cpp does.
- KV cache, per layer on that layer's device: ``slots x cells x (K row + V row)``; ``cells`` is
  the per-slot context, or for a sliding-window layer ``pad256(min(ctx, window + n_ubatch))``
  (llama_kv_cache_iswa). Rows use the cache type's block size (q8_0: 34 bytes per 32 values).
  Without flash attention V is stored transposed and padded to the widest layer.
- recurrent state, per recurrent layer: ``slots x (n_embd_r + n_embd_s) x 4`` bytes (f32).
- output: the host buffer of logits, ``n_vocab x 4 x slots``.
- compute: the scheduler's worst-case graph, calibrated against llama-server's own report on the
  CPU backend (docs/benchmarks.md). With T = the micro-batch, per device that runs layers::

      4*T*5*n_embd + max(4*T*3*ffn_width, 4*n_vocab*slots) + sum over mask kinds (cells*T*2)

  ``ffn_width`` is the dense FFN width or, for mixture-of-experts, expert width x experts used.
  Without flash attention the attention scores ``cells*T*n_head*4`` (plus an f32 mask) can be
  the peak instead. A GPU that holds every layer leaves the CPU a small input buffer.
- tuning (README, configuration reference): ``overrides`` (``-ot``, ``--cpu-moe``) move the
  matching block tensors' bytes to the host or a named GPU (``corral.placement.tensors``);
  ``kv_unified`` makes one cache stream of every cell (a sliding layer keeps a window per
  slot); ``kv_offload=False`` keeps every layer's cache on the host; ``split_mode`` ``row``
  spreads each offloaded layer's weights over the GPUs; a draft model is estimated alike with
  the model's context parameters and added as ``draft`` (``with_draft``).
- overhead: what no buffer line shows: a GPU's CUDA context, cuBLAS workspace and memory pool
  (``gpu_overhead`` per GPU used), the process itself on the host (``host_overhead``), the
  prompt cache (``--cache-ram``) and context checkpoints (SWA and recurrent models only, each
  ``checkpoint_bytes``).

Everything is a pure function of its arguments; nothing here touches a file or a device.
"""

from __future__ import annotations

import struct
from bisect import bisect_right
from collections.abc import Sequence
from dataclasses import dataclass, replace

from corral.placement.devices import CPU
from corral.placement.profile import ModelProfile
from corral.placement.tensors import layer_weights

MiB = 1 << 20
CTX_PAD = 256  # llama.cpp pads the total and the per-sequence context to this
MAX_COPIES = 4  # GGML_SCHED_MAX_COPIES: pipeline parallelism keeps 4 copies of graph inputs
DEFAULT_GPU_OVERHEAD = 512 * MiB
DEFAULT_HOST_OVERHEAD = 64 * MiB

# Cache element types llama-server accepts: (bytes per block, values per block).
CACHE_TYPES: dict[str, tuple[int, int]] = {
    "f32": (4, 1),
    "f16": (2, 1),
    "bf16": (2, 1),
    "q8_0": (34, 32),
    "q4_0": (18, 32),
    "q4_1": (20, 32),
    "iq4_nl": (18, 32),
    "q5_0": (22, 32),
    "q5_1": (24, 32),
}


def row_bytes(cache_type: str, n: int) -> int:
    """Bytes of ``n`` values of a cache type (ggml_row_size); ``n`` must fill whole blocks."""
    try:
        size, block = CACHE_TYPES[cache_type]
    except KeyError:
        raise ValueError(f"unknown cache type {cache_type!r}") from None
    if n % block:
        raise ValueError(f"{cache_type} needs rows that are a multiple of {block}, got {n}")
    return n // block * size


def pad(n: int, to: int = CTX_PAD) -> int:
    """``n`` rounded up to a multiple of ``to`` (GGML_PAD)."""
    return (n + to - 1) // to * to


def seq_context(slots: int, ctx_per_slot: int) -> int:
    """The context each slot really gets for ``-np slots -c slots*ctx_per_slot``."""
    n_ctx = pad(slots * ctx_per_slot)
    return pad(n_ctx // slots)


def _f32(x: float) -> float:
    # llama.cpp computes split points in float; matching it keeps boundary layers identical.
    return float(struct.unpack("f", struct.pack("f", x))[0])


def layer_devices(
    n_layer: int, gpu_layers: int, gpu_split: Sequence[tuple[str, float]] | None
) -> tuple[str, ...]:
    """Device of each block and, last, of the output layer, as llama.cpp assigns them.

    ``-ngl N`` counts the output layer as the last layer: N = 1 offloads only the output, N =
    n_layer + 1 (or more) everything; the first ``n_layer + 1 - N`` blocks stay on the CPU. GPU
    layers are cut into contiguous runs in proportion to ``gpu_split`` weights, in order.
    """
    total = n_layer + 1
    if not gpu_split or gpu_layers <= 0:
        return (CPU,) * total
    ngl = min(gpu_layers, total)
    start = total - ngl
    weights = [max(0.0, w) for _, w in gpu_split]
    if sum(weights) <= 0:
        raise ValueError("gpu_split weights must not all be 0")
    cumulative: list[float] = []
    running = _f32(0.0)
    for w in weights:
        running = _f32(running + _f32(w))
        cumulative.append(running)
    points = [_f32(c / running) for c in cumulative]
    result: list[str] = []
    for il in range(total):
        if il < start:
            result.append(CPU)
            continue
        index = bisect_right(points, _f32((il - start) / ngl))
        result.append(gpu_split[min(index, len(gpu_split) - 1)][0])
    return tuple(result)


@dataclass(frozen=True)
class DeviceEstimate:
    """Bytes one child needs on one device, term by term."""

    device: str
    weights: int = 0
    kv_cache: int = 0
    recurrent_state: int = 0
    output: int = 0
    compute: int = 0
    overhead: int = 0
    draft: int = 0  # a draft model's weights, KV cache, logits and compute buffers together

    @property
    def total(self) -> int:
        """Every term together: what the ledger reserves on this device."""
        return (
            self.weights + self.kv_cache + self.recurrent_state + self.output + self.compute
            + self.overhead + self.draft
        )


@dataclass(frozen=True)
class MemoryEstimate:
    """The estimate for one child: per-device terms and the settings they assume."""

    devices: tuple[DeviceEstimate, ...]
    slots: int
    ctx_per_slot: int  # what each slot really gets (padded like llama.cpp)
    gpu_layers: int  # the -ngl value, 0..n_layer+1
    layer_devices: tuple[str, ...]  # per block, then the output layer
    n_ubatch: int  # effective micro-batch
    swa_cells: int  # cells per slot of sliding-window layers (0 if none)
    kv_unified: bool = False  # one cache shared by the slots: each may fill all of it

    @property
    def slot_limit(self) -> int:
        """The most tokens one slot may hold: its share, or with a unified cache the whole
        cache (as long as the other slots leave room)."""
        return self.ctx_per_slot * self.slots if self.kv_unified else self.ctx_per_slot

    def on(self, device: str) -> DeviceEstimate:
        """The estimate for ``device`` (all zeros if the child uses none of it)."""
        for d in self.devices:
            if d.device == device:
                return d
        return DeviceEstimate(device)

    @property
    def total(self) -> int:
        """Bytes over all devices."""
        return sum(d.total for d in self.devices)

    def reservation(self) -> dict[str, int]:
        """Bytes to reserve per device id (devices with nothing left out)."""
        return {d.device: d.total for d in self.devices if d.total > 0}


@dataclass
class _Acc:
    weights: int = 0
    kv: int = 0
    rs: int = 0
    output: int = 0
    compute: int = 0
    overhead: int = 0


def _kv_bytes(
    profile: ModelProfile, streams: int, n_ctx_seq: int, swa_cells: int, type_k: str,
    type_v: str, flash_attn: bool,
) -> list[int]:
    widest_v = max((profile.kv_widths(il)[1] for il in range(profile.n_layer)), default=0)
    sizes = []
    for il in range(profile.n_layer):
        k, v = profile.kv_widths(il)
        if not flash_attn and v:
            v = widest_v  # transposed V: every layer padded to the widest (TAG_V_CACHE_VARIABLE)
        cells = swa_cells if profile.is_swa(il) else n_ctx_seq
        row = (row_bytes(type_k, k) if k else 0) + (row_bytes(type_v, v) if v else 0)
        sizes.append(streams * cells * row)
    return sizes


def checkpoint_bytes(
    profile: ModelProfile, ctx_per_slot: int, cache_type_k: str = "f16",
    cache_type_v: str = "f16", flash_attn: bool = True,
) -> int:
    """Bytes of one context checkpoint of one slot: what llama-server saves of a sequence's
    partial state (``LLAMA_STATE_SEQ_FLAGS_PARTIAL_ONLY``): the sliding-window layers' cells
    still inside the window, each cell's position and sequence (12 bytes), and the recurrent
    state. Measured: ``swa`` at window 512 saves 5.006 MiB, 512 cells x 10 layers x 1 KiB."""
    cells = min(profile.sliding_window, ctx_per_slot)
    rows = _kv_bytes(profile, 1, 0, cells, cache_type_k, cache_type_v, flash_attn)
    swa = [rows[il] for il in range(profile.n_layer) if profile.is_swa(il)]
    state = (profile.recurrent_r_elements + profile.recurrent_s_elements) * 4
    return sum(swa) + (12 * cells if swa else 0) + state * sum(profile.recurrent_layers)


def estimate_memory(
    profile: ModelProfile,
    *,
    slots: int,
    ctx_per_slot: int,
    cache_type_k: str = "f16",
    cache_type_v: str = "f16",
    gpu_layers: int = 0,
    gpu_split: Sequence[tuple[str, float]] | None = None,
    n_batch: int = 2048,
    n_ubatch: int = 512,
    flash_attn: bool = True,
    swa_full: bool = False,
    kv_offload: bool = True,
    gpu_overhead: int = DEFAULT_GPU_OVERHEAD,
    host_overhead: int = DEFAULT_HOST_OVERHEAD,
    cache_ram: int = 0,
    ctx_checkpoints: int = 0,
    projector_bytes: int = 0,
    kv_unified: bool = False,
    overrides: Sequence[tuple[str, str]] = (),
    split_mode: str = "layer",
) -> MemoryEstimate:
    """Bytes per device for ``profile`` served with ``slots`` x ``ctx_per_slot``.

    ``gpu_layers`` is llama-server's ``-ngl`` (clamped to ``n_layer + 1``); ``gpu_split`` lists
    the child's GPUs in ``CUDA_VISIBLE_DEVICES`` order with their ``--tensor-split`` weights
    (required when ``gpu_layers > 0``). ``cache_ram`` (bytes) is the ``--cache-ram`` prompt
    cache and ``ctx_checkpoints`` the ``--ctx-checkpoints`` count, both charged to the host.
    ``projector_bytes`` are a multimodal projector's weights (``--mmproj``): llama-server loads
    them on its first GPU, or in host memory without one. ``kv_unified`` is ``--kv-unified``:
    one cache of ``slots x ctx_per_slot`` cells for all slots. ``overrides`` are ``(pattern,
    buffer)`` pairs of ``--override-tensor`` and ``--cpu-moe`` (``corral.config.tuning``), the
    buffer ``CPU`` or ``CUDAn`` (the n-th of ``gpu_split``). ``split_mode`` ``row`` spreads
    each offloaded layer's weights over the GPUs and keeps its cache and compute on the first;
    ``none`` uses the first GPU alone.
    """
    if slots < 1 or ctx_per_slot < 1:
        raise ValueError("slots and ctx_per_slot must be >= 1")
    if gpu_layers > 0 and not gpu_split:
        raise ValueError("gpu_layers > 0 needs gpu_split (which GPUs, with what weight)")
    if not flash_attn and CACHE_TYPES.get(cache_type_v, (0, 1))[1] > 1:
        raise ValueError("a quantized V cache needs flash attention")
    n_layer = profile.n_layer
    row_split = list(gpu_split or ()) if split_mode == "row" and gpu_split else []
    if split_mode in ("row", "none") and gpu_split:
        gpu_split = list(gpu_split)[:1]  # layers, cache and compute on the main GPU
    placement = layer_devices(n_layer, gpu_layers, gpu_split)
    ngl = min(max(gpu_layers, 0), n_layer + 1) if gpu_split else 0

    share = seq_context(slots, ctx_per_slot)
    n_ctx = share * slots
    # A unified cache is one stream of every cell; otherwise one stream per slot.
    n_ctx_seq, streams = (n_ctx, 1) if kv_unified else (share, slots)
    ubatch = min(n_ubatch, n_batch, n_ctx)  # causal models: the batch is capped by n_ctx
    any_swa = any(profile.is_swa(il) for il in range(n_layer))
    swa_cells = 0
    if any_swa:
        window = profile.sliding_window * (slots if kv_unified else 1)
        swa_cells = n_ctx_seq if swa_full else min(n_ctx_seq, pad(window + ubatch))

    acc: dict[str, _Acc] = {CPU: _Acc()}
    for dev in placement:
        acc.setdefault(dev, _Acc())

    # Weights.
    acc[CPU].weights += profile.token_embd_bytes
    host_layers = [0] * n_layer  # bytes of each block kept in host memory
    for il in range(n_layer):
        for dev, size in layer_weights(profile, il, placement[il], overrides,
                                        gpu_split if not row_split else row_split).items():
            if dev == placement[il] != CPU and row_split:  # the layer's own, not an override
                total_w = sum(max(0.0, w) for _, w in row_split)
                for g, w in row_split:
                    acc.setdefault(g, _Acc()).weights += int(size * max(0.0, w) / total_w)
                continue
            acc.setdefault(dev, _Acc()).weights += size
            if dev == CPU:
                host_layers[il] += size
    gpu_ids = [d for d in dict.fromkeys([*placement, *acc]) if d != CPU]
    out_dev = placement[n_layer]
    output = profile.output_bytes
    if profile.tied_output and out_dev != CPU:
        output = profile.token_embd_bytes  # llama.cpp duplicates the tied matrix to the GPU
    acc[out_dev].weights += output + profile.other_bytes
    acc[gpu_ids[0] if gpu_ids else CPU].weights += projector_bytes

    # KV cache and recurrent state, each on its layer's device unless KV offload is off.
    kv = _kv_bytes(profile, streams, n_ctx_seq, swa_cells, cache_type_k, cache_type_v,
                   flash_attn)
    state = slots * (profile.recurrent_r_elements + profile.recurrent_s_elements) * 4
    for il in range(n_layer):
        dev = placement[il] if kv_offload else CPU
        acc[dev].kv += kv[il]
        if profile.is_recurrent(il):
            acc[dev].rs += state

    # Logits for one output per slot, in (pinned) host memory.
    acc[CPU].output += profile.n_vocab * 4 * slots

    # Compute buffers.
    # One f16 mask per attention kind, [cells, T/slots, 1, slots] (f32 without flash attention).
    mask_tokens = ubatch // streams * streams if streams <= ubatch else ubatch
    has_global = any(
        not profile.is_swa(il) and any(profile.kv_widths(il)) for il in range(n_layer)
    )
    full_cells = n_ctx_seq if has_global else 0
    masks = (full_cells + swa_cells) * mask_tokens * 2
    # 128 bytes a token: small inputs and alignment, the residual of the calibration.
    graph = (4 * ubatch * 5 * profile.n_embd
             + max(4 * ubatch * 3 * profile.ffn_width, 4 * profile.n_vocab * slots)
             + masks + 128 * ubatch)
    if not flash_attn:
        heads = max(profile.n_head, default=0)
        width = max(profile.n_embd, heads * profile.key_length)
        attention = max(n_ctx_seq, swa_cells) * ubatch * heads * 4 + 9 * 4 * ubatch * width
        graph = max(graph, attention + masks * 2)
    runs_layers = {placement[il] for il in range(n_layer)} | {out_dev}
    # Whatever holds a layer's weights runs its part of the graph: an override's target, and
    # the host for experts kept there (an upper bound: the scheduler splits the graph).
    runs_layers |= {dev for dev in gpu_ids if acc[dev].weights}
    if any(host_layers):
        runs_layers.add(CPU)
    for dev in runs_layers:
        acc[dev].compute += graph
    if CPU not in runs_layers:
        acc[CPU].compute += 2 * 4 * ubatch * profile.n_embd + 64 * 1024
    if gpu_ids and any(host_layers):
        # op offload: big matmuls of host-held weights (CPU layers, experts kept on the host)
        # run on the first GPU, one layer's weights copied in at a time.
        acc[gpu_ids[0]].compute += max(host_layers)
    if len(gpu_ids) > 1 and ngl > n_layer:
        # pipeline parallelism: graph inputs and split boundaries kept in MAX_COPIES copies.
        for dev in gpu_ids:
            acc[dev].compute += (MAX_COPIES - 1) * (masks + 4 * ubatch * profile.n_embd)

    # What no buffer line shows.
    for dev in gpu_ids:
        acc[dev].overhead += gpu_overhead
    acc[CPU].overhead += host_overhead + cache_ram
    if ctx_checkpoints and (any_swa or profile.recurrent_layers):
        per_seq = checkpoint_bytes(profile, share, cache_type_k, cache_type_v, flash_attn)
        acc[CPU].overhead += ctx_checkpoints * slots * per_seq

    devices = tuple(
        DeviceEstimate(dev, a.weights, a.kv, a.rs, a.output, a.compute, a.overhead)
        for dev, a in sorted(acc.items(), key=lambda item: (item[0] != CPU, item[0]))
    )
    return MemoryEstimate(devices, slots, share, ngl, placement, ubatch, swa_cells, kv_unified)


def with_draft(target: MemoryEstimate, draft: MemoryEstimate) -> MemoryEstimate:
    """``target`` with a draft model's estimate added, device by device, as its ``draft``."""
    extra = {d.device: d.total for d in draft.devices if d.total}
    known = {d.device for d in target.devices}
    devices = [replace(d, draft=d.draft + extra.get(d.device, 0)) for d in target.devices]
    devices += [DeviceEstimate(dev, draft=n) for dev, n in extra.items() if dev not in known]
    return replace(target, devices=tuple(devices))

