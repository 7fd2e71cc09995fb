"""Discover GPUs (NVML) and system memory (psutil), and what a process holds on each GPU.

NVML comes from ``nvidia-ml-py`` and is imported only inside these functions: on a machine
without an NVIDIA driver the import or ``nvmlInit`` fails, and that simply means no GPUs.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import Any

import psutil

from corral.placement.devices import Device, gpu, host

log = logging.getLogger("corral.probe.devices")


@contextlib.contextmanager
def _nvml() -> Iterator[Any | None]:
    """The ``pynvml`` module, initialised; None when there is no driver or no library."""
    try:
        import pynvml
    except ImportError:
        yield None
        return
    try:
        pynvml.nvmlInit()
    except Exception as exc:  # NVMLError and its many subclasses; a missing .so is OSError
        log.debug("NVML unavailable: %s", exc)
        yield None
        return
    try:
        yield pynvml
    finally:
        with contextlib.suppress(Exception):
            pynvml.nvmlShutdown()


def _text(value: object) -> str:
    # Older nvidia-ml-py versions return bytes for names and UUIDs.
    return value.decode() if isinstance(value, bytes) else str(value)


def discover_gpus() -> list[Device]:
    """Every NVIDIA GPU NVML sees, as ``cuda:N`` (N = NVML index); [] without a driver."""
    found: list[Device] = []
    with _nvml() as nvml:
        if nvml is None:
            return []
        try:
            count = int(nvml.nvmlDeviceGetCount())
        except Exception as exc:
            log.warning("NVML could not count GPUs: %s", exc)
            return []
        for index in range(count):
            try:
                handle = nvml.nvmlDeviceGetHandleByIndex(index)
                memory = nvml.nvmlDeviceGetMemoryInfo(handle)
                name = _text(nvml.nvmlDeviceGetName(handle))
                uuid = _text(nvml.nvmlDeviceGetUUID(handle))
            except Exception as exc:  # a GPU that fell off the bus, MIG quirks: skip it
                log.warning("NVML could not read GPU %d: %s", index, exc)
                continue
            found.append(gpu(index, int(memory.total), int(memory.free), name, uuid))
    return found


def discover_devices() -> list[Device]:
    """The GPUs NVML sees followed by the host's RAM (total, and available as free)."""
    memory = psutil.virtual_memory()
    return [*discover_gpus(), host(int(memory.total), int(memory.available))]


def process_gpu_memory(pid: int) -> dict[str, int]:
    """Bytes process ``pid`` holds on each GPU, by device id; {} without NVML.

    NVML cannot attribute memory inside some containers (it reports no value); such GPUs are
    left out rather than reported as 0.
    """
    used: dict[str, int] = {}
    with _nvml() as nvml:
        if nvml is None:
            return used
        try:
            count = int(nvml.nvmlDeviceGetCount())
        except Exception:
            return used
        for index in range(count):
            try:
                handle = nvml.nvmlDeviceGetHandleByIndex(index)
                procs = nvml.nvmlDeviceGetComputeRunningProcesses(handle)
            except Exception:
                continue
            for proc in procs:
                amount = getattr(proc, "usedGpuMemory", None)
                if int(proc.pid) == pid and isinstance(amount, int):
                    used[f"cuda:{index}"] = used.get(f"cuda:{index}", 0) + amount
    return used
