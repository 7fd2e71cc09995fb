"""Where each block tensor goes when ``--override-tensor`` / ``--cpu-moe`` patterns move it.

llama.cpp's model loader (``llama_model_loader``, 515e855) tries each ``(pattern, buffer)`` in
order with ``std::regex_search`` on the tensor's name; the first match decides, any other
tensor stays with its layer. ``CPU`` is host memory, ``CUDAn`` the child's n-th GPU (the order
corral gives in ``CUDA_VISIBLE_DEVICES``). Pure functions of their arguments.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from corral.placement.devices import CPU
from corral.placement.profile import ModelProfile


def _target(buffer: str, gpu_split: Sequence[tuple[str, float]] | None) -> str:
    """The device an override's buffer names: ``CPU``, or ``CUDAn``, the child's n-th GPU."""
    if buffer == "CPU":
        return CPU
    index = int(buffer.removeprefix("CUDA"))
    gpus = [g for g, _ in gpu_split or ()]
    if index >= len(gpus):
        raise ValueError(f"an override names {buffer}, but the child has {len(gpus)} GPU(s)")
    return gpus[index]


def gpus_named(overrides: Sequence[tuple[str, str]]) -> int:
    """How many GPUs the child needs for ``overrides`` to name only GPUs it has."""
    return max((int(b.removeprefix("CUDA")) + 1 for _, b in overrides if b != "CPU"), default=0)


def layer_weights(
    profile: ModelProfile, il: int, device: str, overrides: Sequence[tuple[str, str]],
    gpu_split: Sequence[tuple[str, float]] | None,
) -> dict[str, int]:
    """Bytes of block ``il`` per device: its layer's device, less the tensors an override
    moves (llama_model_loader: the first pattern found in the name wins)."""
    if not overrides or not profile.layer_tensors:
        return {device: profile.layer_bytes[il]}
    result: dict[str, int] = {}
    for name, size in profile.layer_tensors[il]:
        where = device
        for pattern, buffer in overrides:
            if re.search(pattern, name):
                where = _target(buffer, gpu_split)
                break
        result[where] = result.get(where, 0) + size
    return result
