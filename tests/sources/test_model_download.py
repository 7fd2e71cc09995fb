"""``ManagedModel.download()``: the one way to start or join a model's fetch (``download:
startup``, and an API's pull), with its progress and its verified files."""

from __future__ import annotations

from pathlib import Path

from corral.config import parse_config
from corral.supervisor import Supervisor
from corral.supervisor.state import ModelState
from tests.sources.conftest import TINY_REPO
from tests.sources.local_hub import LocalHub


async def test_download_starts_once_and_everyone_joins(hub: LocalHub, tmp_path: Path) -> None:
    config = parse_config({
        "devices": [{"id": "cpu", "memory": "16GiB"}], "state_file": str(tmp_path / "s.json"),
        "models": {"tiny": {"hf": f"{TINY_REPO}:Q8_0"}, "local": {"path": "x.gguf"}}})
    supervisor = Supervisor(config)
    model = supervisor.models["tiny"]
    fetch = model.download()
    assert fetch is not None and model.download() is fetch  # joined, not started again
    assert model.state == ModelState.DOWNLOADING
    files = await fetch.result()
    assert model.transition is not None
    await model.transition  # the model's own end of the download
    assert fetch.progress.phase == "done" and fetch.progress.total > 0
    assert model.state == ModelState.UNLOADED and model.local_spec.path == files.model
    assert model.local_spec.args[-2:] == ("--mmproj", str(files.projector))
    assert model.download() is None  # it has its files
    assert supervisor.models["local"].download() is None  # no source
    assert len(hub.downloads("Tiny-Q8_0-00001-of-00003.gguf")) == 1
    await supervisor.shutdown()
