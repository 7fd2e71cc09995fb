"""Device discovery: the host always, GPUs through NVML when a driver answers."""

from __future__ import annotations

import sys
import types
from dataclasses import dataclass

import pytest

from corral.placement.devices import Device, format_bytes, gpu, gpu_env, host, visible_devices
from corral.probe.devices import (
    discover_devices,
    discover_gpus,
    process_gpu_memory,
    read_usage,
)

GiB = 1 << 30


def test_no_nvml_means_no_gpus(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", None)  # import pynvml -> ImportError
    devices = discover_devices()
    assert [d.id for d in devices] == ["cpu"]
    assert devices[0].total > 0 and devices[0].free is not None
    assert process_gpu_memory(1) == {}


@dataclass
class Memory:
    total: int
    free: int
    used: int


@dataclass
class Proc:
    pid: int
    usedGpuMemory: int | None  # NVML's field name


class NVMLError(Exception):
    pass


def fake_nvml(fail_init: bool = False) -> types.ModuleType:
    module = types.ModuleType("pynvml")
    state = {"init": 0, "shutdown": 0}

    def init() -> None:
        if fail_init:
            raise NVMLError("Driver Not Loaded")
        state["init"] += 1

    def get_handle(index: int) -> int:
        if index == 2:
            raise NVMLError("GPU is lost")
        return index

    module.nvmlInit = init  # type: ignore[attr-defined]
    module.nvmlShutdown = lambda: state.__setitem__("shutdown", state["shutdown"] + 1)  # type: ignore[attr-defined]
    module.nvmlDeviceGetCount = lambda: 3  # type: ignore[attr-defined]
    module.nvmlDeviceGetHandleByIndex = get_handle  # type: ignore[attr-defined]
    module.nvmlDeviceGetMemoryInfo = lambda h: Memory(80 * GiB, (70 - h) * GiB, 0)  # type: ignore[attr-defined]
    module.nvmlDeviceGetName = lambda h: b"NVIDIA H100" if h == 0 else "NVIDIA H100"  # type: ignore[attr-defined]
    module.nvmlDeviceGetUUID = lambda h: f"GPU-{h:04d}"  # type: ignore[attr-defined]
    module.nvmlDeviceGetComputeRunningProcesses = lambda h: [  # type: ignore[attr-defined]
        Proc(42, 3 * GiB), Proc(7, GiB), Proc(42, None)]
    module.state = state  # type: ignore[attr-defined]
    return module


def test_nvml_gpus(monkeypatch: pytest.MonkeyPatch) -> None:
    nvml = fake_nvml()
    monkeypatch.setitem(sys.modules, "pynvml", nvml)
    found = discover_gpus()
    # GPU 2 fell off the bus: skipped, the others reported
    assert found == [gpu(0, 80 * GiB, 70 * GiB, "NVIDIA H100", "GPU-0000"),
                     gpu(1, 80 * GiB, 69 * GiB, "NVIDIA H100", "GPU-0001")]
    assert [d.id for d in discover_devices()] == ["cuda:0", "cuda:1", "cpu"]
    assert process_gpu_memory(42) == {"cuda:0": 3 * GiB, "cuda:1": 3 * GiB}
    assert nvml.state["init"] == nvml.state["shutdown"]  # type: ignore[attr-defined]


def test_one_reading_opens_nvml_once(monkeypatch: pytest.MonkeyPatch) -> None:
    nvml = fake_nvml()
    monkeypatch.setitem(sys.modules, "pynvml", nvml)
    devices, children = read_usage()
    assert [d.id for d in devices] == ["cuda:0", "cuda:1", "cpu"]
    assert children == {}  # this test process has no llama-server children
    assert nvml.state == {"init": 1, "shutdown": 1}  # type: ignore[attr-defined]


def test_nvml_without_driver(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", fake_nvml(fail_init=True))
    assert discover_gpus() == []
    assert process_gpu_memory(42) == {}


def test_device_values() -> None:
    assert gpu(3, GiB).index == 3 and host(GiB).index == -1
    with pytest.raises(ValueError, match="cpu device"):
        Device("host", "cpu", GiB)
    with pytest.raises(ValueError, match="cuda:0"):
        Device("gpu0", "gpu", GiB)
    with pytest.raises(ValueError, match=">= 0"):
        gpu(0, -1)
    chosen = [gpu(1, GiB, uuid="GPU-b"), gpu(0, GiB)]
    assert visible_devices(chosen) == "GPU-b,0"
    assert gpu_env([]) == {"CUDA_DEVICE_ORDER": "PCI_BUS_ID", "CUDA_VISIBLE_DEVICES": ""}
    assert format_bytes(1536 * 2**20) == "1.50 GiB" and format_bytes(12) == "12 B"
