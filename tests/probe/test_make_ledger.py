"""The ledger's devices: NVML's GPUs count only when the llama-server binary can use them.

NVML is faked (no GPU here); the binaries are real: the CPU-only llama-server this project
builds, and a script that answers ``--list-devices`` as a CUDA build does.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from corral.config import Config, parse_config
from corral.probe.devices import binary_gpus
from corral.probe.host import make_ledger
from tests.probe.test_devices import fake_nvml

CUDA_BUILD = """#!/bin/sh
echo "Available devices:"
echo "  CUDA0: NVIDIA H100 80GB HBM3 (81079 MiB, 80000 MiB free)"
echo "  CUDA1: NVIDIA H100 80GB HBM3 (81079 MiB, 80000 MiB free)"
"""


def config(binary: str) -> Config:
    return parse_config({"models": {"m": {"path": "m.gguf"}},
                        "llama_server": {"binary": binary}})


@pytest.mark.integration
def test_gpus_a_cpu_only_llama_server_cannot_use_are_left_out(
    llama_server: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", fake_nvml())
    assert binary_gpus(llama_server) == 0  # the build `make` does here has no CUDA
    ledger = make_ledger(config(llama_server))
    assert [d.id for d in ledger.devices] == ["cpu"]


def test_gpus_a_cuda_build_lists_are_kept(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", fake_nvml())
    script = tmp_path / "llama-server"
    script.write_text(CUDA_BUILD)
    script.chmod(0o755)
    assert binary_gpus(str(script)) == 2
    ledger = make_ledger(config(str(script)))
    assert [d.id for d in ledger.devices] == ["cuda:0", "cuda:1", "cpu"]


def test_a_binary_that_cannot_say_keeps_the_gpus(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", fake_nvml())
    script = tmp_path / "llama-server"
    script.write_text("#!/bin/sh\nexit 1\n")
    script.chmod(0o755)
    assert binary_gpus(str(script)) is None
    assert [d.id for d in make_ledger(config(str(script))).devices] == [
        "cuda:0", "cuda:1", "cpu"]
