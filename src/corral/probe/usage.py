"""What a llama-server child reports it allocated, parsed from its log.

At ``--log-verbosity 4`` (info) llama.cpp prints one line per buffer it allocates::

    load_tensors:   CPU_Mapped model buffer size =    92.10 MiB
    llama_context:        CPU  output buffer size =     0.75 MiB
    llama_kv_cache:        CPU KV buffer size =   180.00 MiB
    llama_memory_recurrent:  CUDA0 RS buffer size =   1.50 MiB
    sched_reserve:      CUDA0 compute buffer size =   120.02 MiB

``parse_buffer_sizes`` turns such lines into bytes per corral device id, to compare with
``corral.placement.estimate`` or to learn what a model really takes. Sizes are printed with two
decimals of MiB, so each is known to within 5 KiB.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Literal

Component = Literal["weights", "kv_cache", "recurrent_state", "output", "compute"]

_LINE = re.compile(
    r"(?P<where>\w+):\s+(?P<buffer>\S+)\s+(?P<what>model|output|KV|RS|compute) buffer size =\s+"
    r"(?P<mib>[\d.]+) MiB"
)
_COMPONENT: dict[str, Component] = {
    "model": "weights",
    "KV": "kv_cache",
    "RS": "recurrent_state",
    "output": "output",
    "compute": "compute",
}
# Host-side buffer types: plain, memory-mapped, repacked for the CPU's SIMD, or pinned for a GPU.
_HOST = re.compile(r"^(CPU.*|CUDA_Host|.*_Host)$")
_GPU = re.compile(r"^CUDA(\d+)")
# llama_context prints its parameters once per context it creates (the model's, a draft's).
_NEW_CONTEXT = re.compile(r"llama_context: n_ctx_seq\s+=")


def _empty() -> Mapping[str, Mapping[Component, int]]:
    return MappingProxyType({})


@dataclass(frozen=True)
class ReportedMemory:
    """Bytes a child reported, by device id then component (``weights``, ``kv_cache``, ...)."""

    by_device: Mapping[str, Mapping[Component, int]] = field(default_factory=_empty)

    def get(self, device: str, component: Component) -> int:
        """Bytes of ``component`` on ``device`` (0 if none reported)."""
        return self.by_device.get(device, {}).get(component, 0)

    def total(self, device: str | None = None) -> int:
        """Everything reported on ``device``, or on every device when None."""
        devices = [device] if device is not None else list(self.by_device)
        return sum(sum(self.by_device.get(d, {}).values()) for d in devices)

    def component(self, component: Component) -> int:
        """One component summed over devices."""
        return sum(parts.get(component, 0) for parts in self.by_device.values())


def buffer_device(buffer: str, gpu_ids: Sequence[str] = ()) -> str:
    """corral's device id for a llama.cpp buffer name.

    ``CUDA0`` is the child's first visible GPU, which is ``gpu_ids[0]`` when corral passed
    ``gpu_ids`` in ``CUDA_VISIBLE_DEVICES`` order (else ``cuda:0``). Host buffers are ``cpu``.
    """
    if _HOST.match(buffer):
        return "cpu"
    match = _GPU.match(buffer)
    if match:
        index = int(match.group(1))
        return gpu_ids[index] if index < len(gpu_ids) else f"cuda:{index}"
    return buffer.lower()


def parse_buffer_sizes(lines: Iterable[str], gpu_ids: Sequence[str] = ()) -> ReportedMemory:
    """Sum the buffer-size lines of one llama-server start-up.

    A compute buffer that is reserved more than once keeps its last size (llama.cpp reserves
    again when the graph changes, and only the latest allocation is alive). Each context has
    its own: a draft model's context starts at its ``n_ctx_seq`` line, and its compute buffers
    add to the model's.
    """
    sums: dict[str, dict[Component, int]] = {}
    compute: dict[tuple[int, str], int] = {}
    context = 0
    for line in lines:
        if _NEW_CONTEXT.search(line):
            context += 1
            continue
        match = _LINE.search(line)
        if not match:
            continue
        device = buffer_device(match.group("buffer"), gpu_ids)
        size = round(float(match.group("mib")) * (1 << 20))
        what = _COMPONENT[match.group("what")]
        if what == "compute":
            compute[(context, match.group("buffer"))] = size
            continue
        parts = sums.setdefault(device, {})
        parts[what] = parts.get(what, 0) + size
    for (_, buffer), size in compute.items():
        parts = sums.setdefault(buffer_device(buffer, gpu_ids), {})
        parts["compute"] = parts.get("compute", 0) + size
    return ReportedMemory(
        MappingProxyType({d: MappingProxyType(dict(p)) for d, p in sums.items()})
    )
