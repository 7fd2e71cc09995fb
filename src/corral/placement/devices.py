"""Memory devices as placement sees them: GPUs and the host's RAM, with capacities in bytes.

``Device`` is a plain value; ``corral.probe.devices.discover_devices`` fills it from NVML and
psutil, tests and configurations can declare devices directly. Ids are ``"cpu"`` and
``"cuda:N"`` (N = NVML index, which is PCI bus order). A child is handed its GPUs by UUID in
``CUDA_VISIBLE_DEVICES`` when they have one, so the order inside the child is the order of the
list corral passes, whatever CUDA's own device order would be.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

CPU = "cpu"
DeviceKind = Literal["gpu", "cpu"]


@dataclass(frozen=True)
class Device:
    """One pool of memory: a GPU's VRAM or the host's RAM.

    ``total`` is the capacity in bytes; ``free`` what the driver or OS reported free when probed
    (None when unknown, e.g. a declared device). Placement budgets against ``total`` minus what
    corral itself holds (see ``Ledger``), because memory held by corral's own children is not
    "free" to the driver either.
    """

    id: str
    kind: DeviceKind
    total: int
    free: int | None = None
    name: str = ""
    uuid: str = ""

    def __post_init__(self) -> None:
        if self.kind == "cpu" and self.id != CPU:
            raise ValueError(f"a cpu device must have id {CPU!r}, got {self.id!r}")
        if self.kind == "gpu" and not self.id.startswith("cuda:"):
            raise ValueError(f"a gpu device id looks like 'cuda:0', got {self.id!r}")
        if self.total < 0 or (self.free is not None and self.free < 0):
            raise ValueError(f"{self.id}: memory sizes must be >= 0")

    @property
    def index(self) -> int:
        """The GPU's NVML index (``cuda:3`` -> 3); -1 for the CPU."""
        return int(self.id.split(":", 1)[1]) if self.kind == "gpu" else -1


def gpu(index: int, total: int, free: int | None = None, name: str = "", uuid: str = "") -> Device:
    """Shorthand for a declared GPU ``cuda:index``."""
    return Device(f"cuda:{index}", "gpu", total, free, name, uuid)


def host(total: int, free: int | None = None) -> Device:
    """Shorthand for the host's RAM."""
    return Device(CPU, "cpu", total, free, "system memory")


def gpus(devices: Iterable[Device]) -> list[Device]:
    """The GPUs among ``devices``, in index order."""
    return sorted((d for d in devices if d.kind == "gpu"), key=lambda d: d.index)


def by_id(devices: Iterable[Device]) -> dict[str, Device]:
    """``devices`` keyed by id; raises ``ValueError`` on a duplicate id."""
    result: dict[str, Device] = {}
    for device in devices:
        if device.id in result:
            raise ValueError(f"device {device.id} listed twice")
        result[device.id] = device
    return result


def visible_devices(chosen: Sequence[Device]) -> str:
    """``CUDA_VISIBLE_DEVICES`` for a child that may use ``chosen`` GPUs, in that order.

    UUIDs when known (immune to CUDA's fastest-first ordering), else NVML indices, which match
    CUDA's numbering only with ``CUDA_DEVICE_ORDER=PCI_BUS_ID`` (see ``gpu_env``). An empty list
    hides every GPU: the child runs on the CPU.
    """
    return ",".join(d.uuid or str(d.index) for d in chosen if d.kind == "gpu")


def gpu_env(chosen: Sequence[Device]) -> dict[str, str]:
    """Environment that restricts a child to ``chosen`` GPUs in that order."""
    return {"CUDA_DEVICE_ORDER": "PCI_BUS_ID", "CUDA_VISIBLE_DEVICES": visible_devices(chosen)}


def format_bytes(n: int | float) -> str:
    """Bytes for people: ``1.50 GiB``, ``512.0 MiB``, ``12 B``."""
    value = float(n)
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if abs(value) >= size:
            digits = 2 if unit == "GiB" else 1
            return f"{value / size:.{digits}f} {unit}"
    return f"{int(value)} B"
