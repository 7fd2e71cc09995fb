"""Models read in place from an Ollama store built in Ollama's real layout (manifests that name
blobs by digest)."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from corral.config import parse_config
from corral.errors import DownloadError
from corral.probe.gguf import read_profile
from corral.sources.download import LocalFiles, Progress, fetch_now
from corral.sources.ollama_store import MODEL_LAYER, PROJECTOR_LAYER


def add_blob(store: Path, source: Path) -> dict[str, Any]:
    data = source.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    (store / "blobs").mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source, store / "blobs" / f"sha256-{digest}")
    return {"digest": f"sha256:{digest}", "size": len(data)}


def add_model(store: Path, manifest: tuple[str, ...], layers: list[dict[str, Any]]) -> None:
    path = store.joinpath("manifests", *manifest)
    path.parent.mkdir(parents=True, exist_ok=True)
    config = {"mediaType": "application/vnd.docker.container.image.v1+json",
              "digest": "sha256:" + "0" * 64, "size": 2}
    path.write_text(json.dumps({"schemaVersion": 2, "config": config, "layers": layers,
                                "mediaType": "application/vnd.docker.distribution.manifest.v2"
                                             "+json"}))


@pytest.fixture
def store(tmp_path: Path, tiny_files: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> Path:
    root = tmp_path / "ollama" / "models"
    model = add_blob(root, tiny_files["Tiny-Q4_K_M.gguf"])
    projector = add_blob(root, tiny_files["mmproj-Tiny-f16.gguf"])
    template = {"mediaType": "application/vnd.ollama.image.template", "digest": "sha256:"
                + "1" * 64, "size": 10}  # not a file corral needs: its blob may be absent
    add_model(root, ("registry.ollama.ai", "library", "tiny", "latest"),
              [{"mediaType": MODEL_LAYER, **model}, template])
    add_model(root, ("registry.ollama.ai", "someone", "vision", "7b"),
              [{"mediaType": MODEL_LAYER, **model}, {"mediaType": PROJECTOR_LAYER, **projector}])
    monkeypatch.setenv("OLLAMA_MODELS", str(root))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    return root


def fetch(name: str) -> LocalFiles:
    spec = parse_config({"models": {"m": {"ollama": name}}}).models["m"]
    return fetch_now(spec, Progress("m", name), allow_download=False)


def test_a_model_is_read_in_place_from_its_blob(store: Path,
                                                tiny_files: dict[str, Path]) -> None:
    files = fetch("tiny")
    assert files.model.parent == store / "blobs" and files.model.name.startswith("sha256-")
    assert files.projector is None
    assert read_profile(files.model) == read_profile(tiny_files["Tiny-Q4_K_M.gguf"])
    assert fetch("tiny:latest") == files
    assert len(list((store / "blobs").iterdir())) == 2  # nothing copied or added


def test_a_vision_model_comes_with_its_projector(store: Path) -> None:
    files = fetch("someone/vision:7b")
    assert files.projector is not None and files.projector.parent == store / "blobs"
    assert files.projector != files.model


def test_a_model_not_in_the_store_names_the_manifest(store: Path) -> None:
    with pytest.raises(DownloadError, match=r"ollama:llama3\.2:3b: not in Ollama's store \(no "
                       r"manifest .*/manifests/registry\.ollama\.ai/library/llama3\.2/3b; "
                       r"`ollama pull llama3\.2:3b`, or set OLLAMA_MODELS\)"):
        fetch("llama3.2:3b")


def test_a_damaged_blob_is_refused_and_left_alone(store: Path) -> None:
    files = fetch("tiny")
    with files.model.open("r+b") as fh:
        fh.seek(100)
        fh.write(b"\x00\xff\x00\xff")
    with pytest.raises(DownloadError, match="checksum mismatch"):
        fetch("tiny")
    assert files.model.exists()  # Ollama's file, not corral's to delete
