"""Discover GPUs (NVML) and system memory (psutil), and what processes hold on each GPU.

NVML comes from ``nvidia-ml-py`` and is imported only inside these functions: on a machine
without an NVIDIA driver the import or ``nvmlInit`` fails, and that simply means no GPUs.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import subprocess
from collections.abc import Iterable, Iterator
from typing import Any

import psutil

from corral.placement.devices import CPU, Device, gpu, host
from corral.probe.cgroup import CgroupMemory, cgroup_memory

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
    with _nvml() as nvml:
        return _gpus(nvml)


def _gpus(nvml: Any | None) -> list[Device]:
    if nvml is None:
        return []
    try:
        count = int(nvml.nvmlDeviceGetCount())
    except Exception as exc:
        log.warning("NVML could not count GPUs: %s", exc)
        return []
    found: list[Device] = []
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


_cgroup_last: CgroupMemory | None = None


def _host() -> Device:
    """The host's RAM, or the part of it corral's cgroup (a container) may use."""
    memory = psutil.virtual_memory()
    total, available = int(memory.total), int(memory.available)
    global _cgroup_last
    limited = cgroup_memory()
    if limited is None:
        # A reading that failed keeps the last limit rather than fall back to the host's RAM
        # (a limit lifted since would not change the ledger's total, set at start, anyway).
        limited = _cgroup_last
    _cgroup_last = limited
    if limited is None or limited.limit >= total:
        return host(total, available)
    return Device(CPU, "cpu", limited.limit, min(available, limited.free),
                  f"system memory (cgroup v{limited.version} limit)")


_CUDA_DEVICE = re.compile(r"^\s+CUDA\d+:", re.MULTILINE)


def binary_gpus(binary: str) -> int | None:
    """How many NVIDIA GPUs the llama-server ``binary`` can use (``--list-devices``).

    None when it cannot tell (the binary fails or hangs). A build without CUDA lists none, and
    then any ``-ngl`` corral passes is ignored: the whole model lands in host memory.
    """
    try:
        done = subprocess.run([binary, "--list-devices"], capture_output=True, text=True,
                              timeout=30, stdin=subprocess.DEVNULL)
    except (OSError, subprocess.SubprocessError):
        return None
    if done.returncode != 0:
        return None
    return len(_CUDA_DEVICE.findall(done.stdout))


def discover_devices() -> list[Device]:
    """The GPUs NVML sees followed by the host's RAM (total, and available as free), or the
    memory limit of corral's cgroup where that is lower (a container's)."""
    return [*discover_gpus(), _host()]


def read_usage(parent_pid: int | None = None) -> tuple[list[Device], dict[str, dict[str, int]]]:
    """``discover_devices()`` and ``children_memory(parent_pid)`` from one NVML session.

    Placement reads both before each decision; opening NVML once per reading, not twice,
    keeps that cheap.
    """
    with _nvml() as nvml:
        return [*_gpus(nvml), _host()], _children_memory(nvml, parent_pid)


def process_gpu_memory(pid: int) -> dict[str, int]:
    """Bytes process ``pid`` holds on each GPU, by device id; {} without NVML.

    NVML cannot attribute memory inside some containers (it reports no value); such GPUs are
    left out rather than reported as 0.
    """
    with _nvml() as nvml:
        return _gpu_memory_by_pid(nvml).get(pid, {})


def _gpu_memory_by_pid(nvml: Any | None) -> dict[int, dict[str, int]]:
    """Bytes NVML attributes to each process on each GPU; {} without NVML.

    Processes NVML lists without a value (inside some containers) are left out.
    """
    used: dict[int, dict[str, int]] = {}
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
            if isinstance(amount, int):
                mine = used.setdefault(int(proc.pid), {})
                mine[f"cuda:{index}"] = mine.get(f"cuda:{index}", 0) + amount
    return used


def _alias(argv: Iterable[str]) -> str | None:
    """The model name a llama-server child serves: the value of corral's ``--alias``."""
    args = list(argv)
    for i, arg in enumerate(args[:-1]):
        if arg == "--alias":
            return args[i + 1]  # corral puts its own first; a model's extra args come after
    return None


def children_memory(parent_pid: int | None = None) -> dict[str, dict[str, int]]:
    """What each llama-server child of ``parent_pid`` (default: this process) uses now.

    Keyed by the model the child serves (its ``--alias``, which corral always passes), then
    device id; a child's own children count with it (a wrapper script around llama-server).

    - ``cpu``: resident memory that is not shared with a file (RSS minus "shared"), the part
      the kernel does not count as available. Weights llama-server maps from the model file
      are page cache the kernel can drop, which ``discover_devices`` reports as free already.
    - ``cuda:N``: what NVML attributes to the child's processes. GPUs it has no value for
      (inside some containers) are left out: unknown, not 0.
    """
    with _nvml() as nvml:
        return _children_memory(nvml, parent_pid)


def _children_memory(nvml: Any | None, parent_pid: int | None) -> dict[str, dict[str, int]]:
    try:
        children = psutil.Process(parent_pid or os.getpid()).children()
    except psutil.Error:
        return {}
    owners: dict[int, str] = {}
    used: dict[str, dict[str, int]] = {}
    for child in children:
        try:
            name = _alias(child.cmdline())
            if name is None:
                continue
            procs = [child, *child.children(recursive=True)]
        except psutil.Error:  # exited meanwhile, or not ours to read
            continue
        mine = used.setdefault(name, {})
        for proc in procs:
            owners[proc.pid] = name
            try:
                memory = proc.memory_info()
            except psutil.Error:
                continue
            # "shared" is Linux's file-backed and shmem resident pages; elsewhere it is absent
            # and the whole RSS counts (more than is used, never less).
            anon = max(0, memory.rss - getattr(memory, "shared", 0))
            mine["cpu"] = mine.get("cpu", 0) + anon
    if not owners:
        return {}
    for pid, amounts in _gpu_memory_by_pid(nvml).items():
        if pid in owners:
            mine = used[owners[pid]]
            for device, n in amounts.items():
                mine[device] = mine.get(device, 0) + n
    return used
