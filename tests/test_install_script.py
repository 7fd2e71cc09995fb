"""scripts/install-llama-server keeps builds with different CMake options apart in its cache.

Nothing is built here: the script names its build directory before it downloads anything, and
a pip that fails at once stops it there.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

SCRIPT = Path(__file__).parent.parent / "scripts" / "install-llama-server"


def build_dir(tmp_path: Path, cmake_args: str) -> str:
    env = {**os.environ, "CORRAL_CACHE": str(tmp_path / "cache"), "PIP": "false",
           "CORRAL_CMAKE_ARGS": cmake_args}
    done = subprocess.run(["bash", str(SCRIPT), str(tmp_path / "bin")], env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode != 0  # the failing pip stopped it before any build
    (line,) = [x for x in done.stderr.splitlines() if "building llama.cpp" in x]
    return line.split(" into ")[1].split(" ")[0]


def test_a_build_with_other_cmake_options_has_its_own_cache_directory(tmp_path: Path) -> None:
    plain = build_dir(tmp_path, "")
    cuda = build_dir(tmp_path, "-DGGML_CUDA=ON")
    other = build_dir(tmp_path, "-DGGML_CUDA=ON -DGGML_CUDA_F16=ON")
    assert Path(plain).parent == tmp_path / "cache"
    assert Path(plain).name.startswith("llama.cpp-")
    assert cuda.startswith(plain + "-") and other.startswith(plain + "-")
    assert len({plain, cuda, other}) == 3
    assert build_dir(tmp_path, "-DGGML_CUDA=ON") == cuda  # the same options find it again
    assert not (tmp_path / "bin" / "llama-server").exists()
