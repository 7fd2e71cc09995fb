"""``children_memory``: what each of corral's children uses, summed per model it serves.

The children are real processes (Python sleeping, with corral's ``--alias`` on their command
line), so their host memory is the kernel's figure; NVML is faked, listing those pids with the
GPU memory a test gives them.
"""

from __future__ import annotations

import subprocess
import sys
import types
from collections.abc import Iterator

import psutil
import pytest

from corral.probe.devices import children_memory
from tests.probe.test_devices import Memory, Proc

GiB = 1 << 30
# Each says "ready" once started, so their memory is measured after start-up, when it no
# longer moves.
SLEEP = "import time; print('ready', flush=True); time.sleep(60)"
# A wrapper that starts the real server as its own child, as a shell script around it would.
WRAPPER = ("import subprocess, sys; "
           "subprocess.run([sys.executable, '-c', "
           "'import time; print(\\'ready\\', flush=True); time.sleep(60)'])")


@pytest.fixture
def spawn() -> Iterator[list[subprocess.Popen[bytes]]]:
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for proc in started:
        for child in psutil.Process(proc.pid).children(recursive=True):
            child.kill()
        proc.kill()
        proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()


def child(spawn: list[subprocess.Popen[bytes]], code: str, *args: str) -> int:
    proc = subprocess.Popen([sys.executable, "-c", code, *args], stdout=subprocess.PIPE)
    spawn.append(proc)
    assert proc.stdout is not None and proc.stdout.readline() == b"ready\n"
    return proc.pid


def nvml(on_gpu: dict[int, list[Proc]]) -> types.ModuleType:
    module = types.ModuleType("pynvml")
    module.nvmlInit = lambda: None  # type: ignore[attr-defined]
    module.nvmlShutdown = lambda: None  # type: ignore[attr-defined]
    module.nvmlDeviceGetCount = lambda: len(on_gpu)  # type: ignore[attr-defined]
    module.nvmlDeviceGetHandleByIndex = lambda i: i  # type: ignore[attr-defined]
    module.nvmlDeviceGetMemoryInfo = lambda h: Memory(80 * GiB, 40 * GiB, 40 * GiB)  # type: ignore[attr-defined]
    module.nvmlDeviceGetComputeRunningProcesses = lambda h: on_gpu[h]  # type: ignore[attr-defined]
    return module


def test_each_childs_gpu_memory_by_the_model_it_serves(
    monkeypatch: pytest.MonkeyPatch, spawn: list[subprocess.Popen[bytes]]
) -> None:
    a = child(spawn, SLEEP, "-m", "a.gguf", "--alias", "a", "-ngl", "99")
    wrapped = child(spawn, WRAPPER, "--alias", "b", "--alias", "user-extra")
    no_alias = child(spawn, SLEEP, "--port", "1234")
    (server,) = psutil.Process(wrapped).children()  # it said "ready": it has started
    monkeypatch.setitem(sys.modules, "pynvml", nvml({
        0: [Proc(a, 3 * GiB), Proc(server.pid, 2 * GiB), Proc(no_alias, 1 * GiB),
            Proc(999_999_999, 5 * GiB)],  # another user's process
        1: [Proc(a, 1 * GiB), Proc(server.pid, None)],  # no value: unknown, left out
    }))
    found = children_memory()
    assert set(found) == {"a", "b"}
    assert {d: n for d, n in found["a"].items() if d != "cpu"} == {"cuda:0": 3 * GiB,
                                                                   "cuda:1": 1 * GiB}
    assert {d: n for d, n in found["b"].items() if d != "cpu"} == {"cuda:0": 2 * GiB}
    # Host memory: resident and not file-backed, the wrapper's and the server's together.
    # (Sleeping processes: their figures do not move between the two readings.)
    def anon(*pids: int) -> int:
        infos = [psutil.Process(pid).memory_info() for pid in pids]
        return sum(m.rss - m.shared for m in infos)

    assert abs(found["a"]["cpu"] - anon(a)) < 1 << 20
    assert abs(found["b"]["cpu"] - anon(wrapped, server.pid)) < 1 << 20
    assert found["b"]["cpu"] > found["a"]["cpu"] > 0


def test_without_nvml_only_the_host_is_measured(
    monkeypatch: pytest.MonkeyPatch, spawn: list[subprocess.Popen[bytes]]
) -> None:
    assert children_memory(parent_pid=child(spawn, SLEEP)) == {}  # it has no children
    child(spawn, SLEEP, "--alias", "a")
    monkeypatch.setitem(sys.modules, "pynvml", None)  # import pynvml -> ImportError
    found = children_memory()
    assert list(found) == ["a"] and list(found["a"]) == ["cpu"]  # no GPU figure without NVML
