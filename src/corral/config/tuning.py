"""The types of llama-server's tuning settings: batch sizes, flash attention, expert and tensor
offload, a draft model, the KV cache's layout, checkpoints, the prompt cache, the GPU split.

Each is a per-model setting (``corral.config.schema.ModelSettings``); a user may also give it
in ``args`` with llama-server's own spelling, which ``corral.llamacpp.tuning`` reads into the
setting. Plain types and validators only: the memory each costs is ``corral.placement``'s.
"""

from __future__ import annotations

import re
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, PlainValidator

FlashAttn = Literal["auto", "on", "off"]
SplitMode = Literal["layer", "row", "none"]
DraftCacheType = Literal["f16", "q8_0", "q4_0"]

# llama.cpp's patterns for the expert tensors --cpu-moe keeps on the host, and the dense FFN
# tensors of --n-cpu-ffn (common/common.h).
EXPERTS_PATTERN = r"\.ffn_(up|down|gate|gate_up)_(ch|)exps"
DENSE_FFN_PATTERN = r"\.ffn_(up|down|gate)\."
_BUFFER = re.compile(r"^(CPU|CUDA\d+)$")


def _all_or_layers(value: object) -> int | Literal["all"]:
    if value == "all":
        return "all"
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    raise ValueError("must be 'all' or a number of layers >= 0")


def _tensor_override(value: object) -> str:
    if not isinstance(value, str) or "=" not in value:
        raise ValueError("must be PATTERN=BUFFER, e.g. 'ffn_.*_exps=CPU'")
    pattern, buffer = value.rsplit("=", 1)
    if not pattern:
        raise ValueError(f"{value!r}: the pattern is empty")
    try:
        re.compile(pattern)
    except re.error as exc:
        raise ValueError(f"{value!r}: not a regular expression ({exc})") from None
    if not _BUFFER.match(buffer):
        raise ValueError(f"{value!r}: the buffer must be CPU or CUDA<n> (the child's n-th GPU, "
                         f"counted from 0), got {buffer!r}")
    return value


def _tensor_split(value: object) -> tuple[float, ...] | None:
    if value is None:
        return None
    if isinstance(value, list | tuple) and value and all(
            isinstance(v, int | float) and not isinstance(v, bool) and v >= 0 for v in value):
        if not any(value):
            raise ValueError("must not be all 0")
        return tuple(float(v) for v in value)
    raise ValueError("must be a list of proportions >= 0, one per GPU, e.g. [3, 1]")


AllOrLayers = Annotated[int | Literal["all"], PlainValidator(_all_or_layers)]
CpuMoe = AllOrLayers
TensorOverride = Annotated[str, PlainValidator(_tensor_override)]
TensorSplit = Annotated[tuple[float, ...] | None, PlainValidator(_tensor_split)]


class DraftSettings(BaseModel):
    """A draft model for speculative decoding (``--model-draft``). llama-server gives it a
    context like the model's own (same slots, context, batch sizes, flash attention), its own
    weights, KV cache and compute buffers, on the model's GPUs split alike."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    path: str = Field(min_length=1)
    gpu_layers: AllOrLayers = "all"
    cache_type_k: DraftCacheType = "f16"
    cache_type_v: DraftCacheType = "f16"
    cpu_moe: CpuMoe = 0
    tensor_overrides: tuple[TensorOverride, ...] = ()


# The settings this module types, as ``corral plan`` and ``/admin/models`` show them.
TUNING_SETTINGS = (
    "batch_size", "ubatch_size", "flash_attn", "cpu_moe", "cpu_ffn", "tensor_overrides", "draft",
    "kv_unified", "kv_offload", "swa_full", "ctx_checkpoints", "prompt_cache", "tensor_split",
    "split_mode",
)


def tuning_of(settings: BaseModel) -> dict[str, object]:
    """A model's tuning settings as JSON values (``draft`` as its own mapping, or None)."""
    return settings.model_dump(mode="json", include=set(TUNING_SETTINGS))


def changed_tuning(settings: BaseModel) -> dict[str, object]:
    """The tuning settings that differ from their defaults: one line of ``corral plan``."""
    defaults = tuning_of(type(settings).model_construct())
    return {name: value for name, value in tuning_of(settings).items()
            if value != defaults[name]}


def overrides(tensor_overrides: tuple[str, ...], cpu_moe: int | Literal["all"],
              cpu_ffn: int = 0) -> tuple[tuple[str, str], ...]:
    """``(pattern, buffer)`` in the order llama-server tries them: ``-ot`` first, then the
    expert patterns ``--cpu-moe`` / ``--n-cpu-moe N`` add, then ``--n-cpu-ffn N``'s (corral
    passes them in that order; the first match wins)."""
    pairs = [tuple(o.rsplit("=", 1)) for o in tensor_overrides]
    if cpu_moe == "all":
        pairs.append((EXPERTS_PATTERN, "CPU"))
    else:
        pairs += [(rf"blk\.{il}{EXPERTS_PATTERN}", "CPU") for il in range(cpu_moe)]
    pairs += [(rf"blk\.{il}{DENSE_FFN_PATTERN}", "CPU") for il in range(cpu_ffn)]
    return tuple((p, b) for p, b in pairs)
