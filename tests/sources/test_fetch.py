"""Fetching a model's files from the local hub: what lands where, and every fault ending in a
clear error with no unverified file left where a child could load it."""

from __future__ import annotations

import hashlib
import io
import re
import threading
from pathlib import Path
from typing import Any

import huggingface_hub.constants as hf_constants
import pytest

from corral.config import ModelSpec, parse_config
from corral.errors import DownloadError
from corral.placement.profile import ModelProfile
from corral.probe.gguf import read_profile
from corral.pull import pull
from corral.sources import hub as hub_module
from corral.sources.download import LocalFiles, Progress, fetch_now
from tests.conftest import wait_until
from tests.sources.conftest import GATED_REPO, SMOL_FILE, SMOL_REPO, TINY_REPO
from tests.sources.local_hub import TOKEN, LocalHub


def spec(**model: Any) -> ModelSpec:
    return parse_config({"models": {"m": model}}).models["m"]


def fetch(s: ModelSpec, allow_download: bool = True) -> tuple[LocalFiles, Progress]:
    progress = Progress(s.name, s.source.ref if s.source else "")
    return fetch_now(s, progress, allow_download=allow_download), progress


def cache_blobs(repo: str) -> list[Path]:
    folder = Path(hf_constants.HF_HUB_CACHE) / ("models--" + repo.replace("/", "--")) / "blobs"
    return sorted(folder.iterdir()) if folder.is_dir() else []


def test_a_split_model_comes_whole_with_its_projector(hub: LocalHub,
                                                      tiny_files: dict[str, Path]) -> None:
    files, progress = fetch(spec(hf=f"{TINY_REPO}:Q8_0"))
    snapshot = files.model.parent
    assert files.model.name == "Tiny-Q8_0-00001-of-00003.gguf"
    assert sorted(p.name for p in snapshot.iterdir()) == [
        "Tiny-Q8_0-00001-of-00003.gguf", "Tiny-Q8_0-00002-of-00003.gguf",
        "Tiny-Q8_0-00003-of-00003.gguf", "mmproj-Tiny-f16.gguf"]  # not the Q4_K_M
    assert files.projector == snapshot / "mmproj-Tiny-f16.gguf"
    # In the standard cache layout, so other tools find them.
    assert snapshot.parent.parent.name == "models--corral-test--Tiny-GGUF"
    assert progress.phase == "done"
    # Placement reads the downloaded model exactly as a local one.
    local = read_profile(tiny_files["Tiny-Q8_0-00001-of-00003.gguf"])
    assert isinstance(local, ModelProfile) and read_profile(files.model) == local


def test_without_a_quantization_q4_k_m_is_chosen(hub: LocalHub) -> None:
    files, _ = fetch(spec(hf=TINY_REPO))
    assert files.model.name == "Tiny-Q4_K_M.gguf"


def test_a_file_and_a_revision_pinned(hub: LocalHub) -> None:
    commit = hub.repos[SMOL_REPO].commit
    files, _ = fetch(spec(hf=SMOL_REPO, file=SMOL_FILE, revision=commit))
    assert files.model.parent.name == commit and files.projector is None


def test_a_download_dir_keeps_plain_files(hub: LocalHub, tmp_path: Path) -> None:
    files, _ = fetch(spec(hf=f"{TINY_REPO}:Q4_K_M", download_dir=str(tmp_path / "dl")))
    assert files.model == tmp_path / "dl" / "Tiny-Q4_K_M.gguf"
    assert files.model.is_file() and not files.model.is_symlink()


def test_a_download_cut_half_way_resumes(hub: LocalHub, smollm2: Path) -> None:
    hub.repos[SMOL_REPO].files[SMOL_FILE].cut_once = True
    files, _ = fetch(spec(hf=f"{SMOL_REPO}:Q4_1"))
    gets = hub.downloads(SMOL_FILE)
    assert len(gets) == 2 and gets[0].range is None
    # The second request asked only for what was missing.
    assert gets[1].range is not None and int(gets[1].range.split("=")[1].split("-")[0]) > 0
    assert files.model.read_bytes() == smollm2.read_bytes()


def test_a_wrong_checksum_deletes_the_file_and_says_so(hub: LocalHub) -> None:
    entry = hub.repos[TINY_REPO].files["Tiny-Q4_K_M.gguf"]
    entry.corrupt = True
    with pytest.raises(DownloadError, match=r"checksum mismatch for Tiny-Q4_K_M\.gguf: the hub "
                       r"says SHA-256 [0-9a-f]{64}, the file has [0-9a-f]{64}; deleted"):
        fetch(spec(hf=f"{TINY_REPO}:Q4_K_M"))
    # Nothing a child could load: neither the blob nor the snapshot's link to it (the
    # projector, which is right, stays).
    assert entry.sha256 not in [p.name for p in cache_blobs(TINY_REPO)]
    snapshots = Path(hf_constants.HF_HUB_CACHE) / "models--corral-test--Tiny-GGUF" / "snapshots"
    assert [p.name for p in snapshots.rglob("*.gguf")] == ["mmproj-Tiny-f16.gguf"]


@pytest.mark.parametrize(("model", "message"), [
    ({"hf": "corral-test/Nothing-GGUF:Q4_K_M"},
     r"repository corral-test/Nothing-GGUF not found on http://127\.0\.0\.1:\d+ "
     r"\(set HF_TOKEN if it is private\)"),
    ({"hf": f"{TINY_REPO}:Q2_K"},
     r"the repository has no quantization 'Q2_K' \(GGUF files: Tiny-Q4_K_M\.gguf, "
     r"Tiny-Q8_0-00001-of-00003\.gguf"),
    ({"hf": TINY_REPO, "file": "missing.gguf"}, r"the repository has no file 'missing\.gguf'"),
    ({"hf": f"{TINY_REPO}:Q8_0", "revision": "v9"}, r"corral-test/Tiny-GGUF has no revision 'v9'"),
])
def test_a_missing_repository_file_or_revision_is_named(hub: LocalHub, model: dict[str, str],
                                                        message: str) -> None:
    with pytest.raises(DownloadError, match=message):
        fetch(spec(**model))
    assert hub.downloads(".gguf") == []


def test_a_gated_repository_needs_the_token(hub: LocalHub, monkeypatch: pytest.MonkeyPatch,
                                            caplog: pytest.LogCaptureFixture) -> None:
    with pytest.raises(DownloadError, match=r"corral-test/Gated-GGUF is a gated repository: "
                       "set HF_TOKEN"):
        fetch(spec(hf=f"{GATED_REPO}:Q4_1"))
    monkeypatch.setenv("HF_TOKEN", "hf_wrong")
    with pytest.raises(DownloadError, match="the token in HF_TOKEN has no access"):
        fetch(spec(hf=f"{GATED_REPO}:Q4_1"))
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    files, _ = fetch(spec(hf=f"{GATED_REPO}:Q4_1"))
    assert files.model.is_file()
    assert all(s.authorized for s in hub.downloads(SMOL_FILE))


def test_too_little_disk_space_is_refused_before_downloading(
        hub: LocalHub, monkeypatch: pytest.MonkeyPatch, smollm2: Path) -> None:
    monkeypatch.setattr(hub_module, "free_space", lambda directory: 10 * 2**20)
    size = hub_module.human(smollm2.stat().st_size)
    with pytest.raises(DownloadError, match=rf"needs {size} more on .* but only 10\.0 MiB is "
                       "free"):
        fetch(spec(hf=f"{SMOL_REPO}:Q4_1"))
    assert hub.downloads(SMOL_FILE) == []


def test_offline_uses_the_cache_and_fails_clearly_without_it(
        hub: LocalHub, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(DownloadError, match=r"not in the cache"):
        fetch(spec(hf=f"{TINY_REPO}:Q8_0"))
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", False)
    online, _ = fetch(spec(hf=f"{TINY_REPO}:Q8_0"))
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    asked = len(hub.seen)
    offline, _ = fetch(spec(hf=f"{TINY_REPO}:Q8_0"))
    assert offline == online and len(hub.seen) == asked  # nothing asked of the hub


def test_a_cached_file_changed_since_is_caught_and_deleted(hub: LocalHub,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    files, _ = fetch(spec(hf=f"{TINY_REPO}:Q4_K_M"))
    blob = files.model.resolve()
    with blob.open("r+b") as fh:
        fh.write(b"GGUF\xff")
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(DownloadError, match="checksum mismatch"):
        fetch(spec(hf=f"{TINY_REPO}:Q4_K_M"))
    assert not blob.exists()


def test_manual_downloads_only_use_the_cache(hub: LocalHub) -> None:
    with pytest.raises(DownloadError, match=r"not in the cache \(download: manual; run corral "
                       "pull\\)"):
        fetch(spec(hf=f"{TINY_REPO}:Q4_K_M", download="manual"), allow_download=False)
    assert hub.seen == []


def test_progress_counts_the_bytes_while_a_download_is_held(hub: LocalHub,
                                                            smollm2: Path) -> None:
    hold = hub.repos[SMOL_REPO].files[SMOL_FILE].hold = threading.Event()
    s = spec(hf=f"{SMOL_REPO}:Q4_1")
    progress = Progress(s.name, "x")
    done: list[LocalFiles] = []
    thread = threading.Thread(target=lambda: done.append(
        fetch_now(s, progress, allow_download=True)))
    thread.start()
    try:
        size = smollm2.stat().st_size
        # The hub holds the download half-way (huggingface_hub writes in chunks of 10 MB, so
        # some of the first half may still be on its way).
        wait_until(lambda: progress.describe()["bytes_done"] > 0)
        assert progress.phase == "downloading" and progress.total == size
        assert 0 < progress.done <= size // 2 and progress.remaining == size - progress.done
        assert re.fullmatch(r"downloading \d{1,2}% \(\d+\.\d MiB of 93\.8 MiB\)",
                            progress.text())
    finally:
        hold.set()
        thread.join(120)
    assert done and hashlib.sha256(done[0].model.read_bytes()).hexdigest() == \
        hub.repos[SMOL_REPO].files[SMOL_FILE].sha256


def test_the_hub_token_is_one_of_the_secrets_children_never_inherit() -> None:
    config = parse_config({"models": {"m": {"hf": f"{SMOL_REPO}:Q4_1"}}})
    assert {"HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"} <= config.secret_env


def test_pull_draws_a_bar_on_a_terminal(hub: LocalHub) -> None:
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    out = Terminal()
    assert pull([spec(hf=f"{TINY_REPO}:Q8_0")], out) == 0
    text = out.getvalue()
    assert re.search(r"\rm done +\[#{30}\] 100% 45\.8 KiB of 45\.8 KiB", text), text
    assert re.search(r"m: ready, verified: .*Tiny-Q8_0-00001-of-00003\.gguf \(projector .*"
                     r"mmproj-Tiny-f16\.gguf\)", text)
    out = Terminal()
    assert pull([spec(hf="corral-test/Nothing-GGUF")], out) == 1
    assert "m: failed: corral-test/Nothing-GGUF: repository" in out.getvalue()
