"""The local hub and a Hugging Face environment pointing at it, for the sources tests."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import gguf
import huggingface_hub.constants as hf_constants
import pytest

from tests.probe.test_gguf_split import FIELDS, add_tensors, finish, single, tensors
from tests.sources.local_hub import LocalHub

SMOL_REPO = "corral-test/SmolLM2-135M-Instruct-GGUF"
SMOL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
TINY_REPO = "corral-test/Tiny-GGUF"
GATED_REPO = "corral-test/Gated-GGUF"


@pytest.fixture(scope="session")
def tiny_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A small llama split in three shards (Q8_0), a single-file Q4_K_M beside it, and a
    vision projector: a repository's worth of GGUF files."""
    out = tmp_path_factory.mktemp("tiny")
    writer = gguf.GGUFWriter(str(out / "Tiny-Q8_0.gguf"), "llama", split_max_tensors=4)
    for key, value in FIELDS.items():
        writer.add_uint32(key, value)
    add_tensors(writer, tensors())
    finish(writer)
    files = {p.name: p for p in sorted(out.glob("Tiny-Q8_0-*.gguf"))}
    assert len(files) == 3
    files["Tiny-Q4_K_M.gguf"] = single(out / "Tiny-Q4_K_M.gguf", tensors())
    files["mmproj-Tiny-f16.gguf"] = single(out / "mmproj-Tiny-f16.gguf", tensors()[:3])
    return files


@pytest.fixture
def hub(smollm2: Path, tiny_files: dict[str, Path], tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> Iterator[LocalHub]:
    """The local hub, with huggingface_hub (here and in corral processes started from the
    test) pointed at it and at a cache of the test's own."""
    local = LocalHub()
    local.add(SMOL_REPO, {SMOL_FILE: smollm2})
    local.add(TINY_REPO, tiny_files)
    local.add(GATED_REPO, {SMOL_FILE: smollm2}, gated=True)
    local.start()
    cache = tmp_path / "hf" / "hub"
    for name, value in (("HF_ENDPOINT", local.url), ("HF_HOME", str(tmp_path / "hf")),
                        ("HF_HUB_CACHE", str(cache)), ("XDG_CACHE_HOME", str(tmp_path / "xdg")),
                        ("HF_HUB_DISABLE_TELEMETRY", "1"), ("HF_HUB_DISABLE_PROGRESS_BARS", "1")):
        monkeypatch.setenv(name, value)
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_HUB_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    # huggingface_hub reads its environment once, on import: this process needs the values set.
    monkeypatch.setattr(hf_constants, "ENDPOINT", local.url)
    monkeypatch.setattr(hf_constants, "HUGGINGFACE_CO_URL_TEMPLATE",
                        local.url + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", False)
    yield local
    local.stop()
