"""corral serve with models from the local hub: downloads as a phase of a model's life, with
their progress visible everywhere, and no child ever started on an unverified file."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
import yaml

from corral.sources.ollama_store import MODEL_LAYER
from tests.conftest import CorralProcess, wait_until
from tests.sources.conftest import GATED_REPO, SMOL_FILE, SMOL_REPO, TINY_REPO
from tests.sources.local_hub import TOKEN, LocalHub
from tests.sources.test_ollama_store import add_blob, add_model

Start = Callable[..., CorralProcess]


def chat(server: CorralProcess, model: str) -> httpx.Response:
    # ignore_eos: an answer the model ends at once would be empty.
    return server.http.post("/v1/chat/completions", json={
        "model": model, "max_tokens": 4, "ignore_eos": True,
        "messages": [{"role": "user", "content": "Hi"}]})


def metric(text: str, name: str, model: str) -> float | None:
    found = re.search(rf'^{name}{{model="{model}"}} (\S+)$', text, re.M)
    return float(found.group(1)) if found else None


def ps(server: CorralProcess) -> str:
    return subprocess.run([sys.executable, "-m", "corral", "ps", "--url", server.url],
                          capture_output=True, text=True, timeout=60, check=True).stdout


def test_a_download_in_progress_is_a_503_with_its_progress_everywhere(
        hub: LocalHub, corral: Start) -> None:
    hold = hub.repos[SMOL_REPO].files[SMOL_FILE].hold = threading.Event()
    server = corral({"models": {"smol": {"hf": f"{SMOL_REPO}:Q4_1"}}})
    try:
        answers = [chat(server, "smol") for _ in range(3)]
        for answer in answers:
            assert answer.status_code == 503, answer.text
            assert answer.headers["Retry-After"] == "5"
            error = answer.json()["error"]
            assert error["code"] == "model_downloading"
            assert re.search(r"its files are downloading \((checking|downloading \d+% \(.* of "
                             r"93\.8 MiB\))\)", error["message"]), error["message"]
        server.wait_for(lambda: server.model_status("smol")["download"]["bytes_done"] > 0)
        status = server.model_status("smol")
        assert status["state"] == "downloading"
        download = status["download"]
        assert download["phase"] == "downloading" and download["bytes_total"] == 98362432
        assert re.search(r"^smol\s+downloading \d+%", ps(server), re.M)
        metrics = server.http.get("/metrics").text
        remaining = metric(metrics, "corral_download_remaining_bytes", "smol")
        fetched = metric(metrics, "corral_download_bytes_total", "smol")
        assert remaining is not None and 0 < remaining < 98362432
        assert fetched is not None and fetched > 0
        assert server.children() == []
    finally:
        hold.set()
    server.wait_for(lambda: server.model_status("smol")["state"] == "unloaded")
    assert server.model_status("smol")["download"]["phase"] == "done"
    # Three requests, one download.
    assert len([s for s in hub.downloads(SMOL_FILE) if s.range is None]) == 1
    assert metric(server.http.get("/metrics").text, "corral_download_remaining_bytes",
                  "smol") == 0
    started = next(line for line in server.log().splitlines() if "download_started" in line)
    assert "98362432" in started  # the log says how much is to come
    assert "download_finished" in server.log()


def test_startup_downloads_run_in_the_background(hub: LocalHub, corral: Start) -> None:
    server = corral({"models": {"tiny": {"hf": f"{TINY_REPO}:Q8_0", "download": "startup"},
                                "later": {"hf": f"{SMOL_REPO}:Q4_1"}}})
    server.wait_for(lambda: (server.model_status("tiny")["download"] or {}).get("phase")
                    == "done")
    assert server.model_status("tiny")["state"] == "unloaded"
    assert server.model_status("tiny")["path"].endswith("Tiny-Q8_0-00001-of-00003.gguf")
    assert server.model_status("later")["download"] is None  # on its first request
    assert hub.downloads(SMOL_FILE) == []


def test_a_wrong_checksum_fails_the_model_and_starts_no_child(hub: LocalHub,
                                                              corral: Start) -> None:
    hub.repos[SMOL_REPO].files[SMOL_FILE].corrupt = True
    server = corral({"models": {"smol": {"hf": f"{SMOL_REPO}:Q4_1", "download_wait": True}}})
    answer = chat(server, "smol")
    assert answer.status_code == 503
    assert answer.json()["error"]["code"] == "model_load_failed"
    assert "checksum mismatch for SmolLM2-135M-Instruct.Q4_1.gguf" in answer.text
    assert "deleted" in answer.text
    model = server.model("smol")
    assert model["state"] == "failed" and "checksum mismatch" in model["last_error"]
    assert model["loads"] == 0 and server.children() == []


def test_a_manual_model_is_not_downloaded_by_a_request(hub: LocalHub, corral: Start) -> None:
    server = corral({"models": {"smol": {"hf": f"{SMOL_REPO}:Q4_1", "download": "manual"}}})
    answer = chat(server, "smol")
    assert answer.status_code == 503
    assert "not in the cache (download: manual; run corral pull)" in answer.text
    assert hub.downloads(SMOL_FILE) == []


def run_pull(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "corral", "pull", *args],
                          capture_output=True, text=True, timeout=300)


def test_pull_shows_progress_and_resumes_an_interrupted_download(hub: LocalHub) -> None:
    entry = hub.repos[SMOL_REPO].files[SMOL_FILE]
    entry.hold = threading.Event()
    partial = (os.environ["HF_HUB_CACHE"] + "/models--corral-test--SmolLM2-135M-Instruct-GGUF/"
               f"blobs/{entry.sha256}.incomplete")
    first = subprocess.Popen([sys.executable, "-m", "corral", "pull", f"{SMOL_REPO}:Q4_1"],
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    printed: list[str] = []

    def read() -> None:
        assert first.stdout is not None
        for line in first.stdout:
            printed.append(line)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    progress = re.compile(r"downloading \d+% \(.* of 93\.8 MiB\)")
    try:
        # Held half-way by the hub, however fast the machine: its progress shows meanwhile.
        wait_until(lambda: os.path.exists(partial) and os.path.getsize(partial) > 0
                   and any(progress.search(line) for line in printed))
        first.kill()  # interrupted as hard as can be: no chance to clean up
        first.wait(30)
    finally:
        if first.poll() is None:
            first.kill()
        reader.join(30)
        assert first.stdout is not None
        first.stdout.close()
    had = os.path.getsize(partial)
    entry.hold.set()
    done = run_pull(f"{SMOL_REPO}:Q4_1")
    assert done.returncode == 0, done.stdout + done.stderr
    gets = hub.downloads(SMOL_FILE)
    assert gets[-1].range == f"bytes={had}-"  # resumed, not started again
    assert re.search(rf"{re.escape(SMOL_REPO)}:Q4_1: ready, verified: .*{SMOL_FILE}",
                     done.stdout)


def test_pull_fails_with_the_reason(hub: LocalHub, tmp_path: Any) -> None:
    done = run_pull("corral-test/Nothing-GGUF:Q4_K_M")
    assert done.returncode == 1
    assert "failed: corral-test/Nothing-GGUF:Q4_K_M: repository corral-test/Nothing-GGUF not " \
           "found" in done.stdout


@pytest.mark.integration
def test_a_gated_model_end_to_end_download_verify_load_answer(
        hub: LocalHub, corral: Start, monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
        smollm2: Path) -> None:
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    store = tmp_path / "ollama"
    layer = add_blob(store, smollm2)
    add_model(store, ("registry.ollama.ai", "library", "smollm2", "135m"),
              [{"mediaType": MODEL_LAYER, **layer}])
    monkeypatch.setenv("OLLAMA_MODELS", str(store))
    server = corral({"models": {
        "smol": {"hf": f"{GATED_REPO}:Q4_1", "download_wait": True, "slots": 1,
                 "ctx_per_slot": 512},
        "from-ollama": {"ollama": "smollm2:135m", "slots": 1, "ctx_per_slot": 512}}})
    answer = chat(server, "from-ollama")  # read in place from Ollama's store
    assert answer.status_code == 200, answer.text
    assert server.model("from-ollama")["path"] == str(store / "blobs" / layer["digest"].replace(
        ":", "-"))
    assert server.http.post("/admin/models/from-ollama/unload").status_code == 200
    answer = chat(server, "smol")
    assert answer.status_code == 200, answer.text
    assert answer.json()["choices"][0]["message"]["content"]
    model = server.model("smol")
    assert model["path"].startswith(os.environ["HF_HUB_CACHE"])
    assert model["source"] == f"{GATED_REPO}:Q4_1"
    [child] = server.children()
    assert child.cmdline()[child.cmdline().index("-m") + 1] == model["path"]
    try:
        environment = child.environ()
    except psutil.AccessDenied:  # pragma: no cover - same user: readable
        pytest.skip("cannot read the child's environment")
    assert "HF_TOKEN" not in environment
    assert TOKEN not in server.log()


def test_two_processes_sharing_a_cache_download_once(hub: LocalHub) -> None:
    entry = hub.repos[SMOL_REPO].files[SMOL_FILE]
    entry.hold = threading.Event()
    command = [sys.executable, "-m", "corral", "pull", f"{SMOL_REPO}:Q4_1"]
    first = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    wait_until(lambda: len(hub.downloads(SMOL_FILE)) == 1)
    second = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True)
    # The second waits on the partial file's lock (it asked the hub for the file's metadata).
    wait_until(lambda: len([s for s in hub.seen if s.method == "HEAD"]) == 2)
    entry.hold.set()
    outputs = [p.communicate(timeout=300)[0] for p in (first, second)]
    assert [p.returncode for p in (first, second)] == [0, 0], outputs
    assert len(hub.downloads(SMOL_FILE)) == 1  # one download, both verified it
    for output in outputs:
        assert "ready, verified" in output


def test_a_reload_that_names_other_files_fetches_them(hub: LocalHub, corral: Start) -> None:
    config: dict[str, Any] = {"models": {"tiny": {"hf": f"{TINY_REPO}:Q4_K_M",
                                                  "download": "startup"}}}
    server = corral(config)
    server.wait_for(lambda: (server.model_status("tiny")["path"] or "").endswith(
        "Tiny-Q4_K_M.gguf"))
    written = yaml.safe_load(server.config_path.read_text())
    written["models"]["tiny"]["hf"] = f"{TINY_REPO}:Q8_0"
    written["models"]["added"] = {"hf": f"{TINY_REPO}:Q4_K_M", "download": "startup"}
    server.config_path.write_text(yaml.safe_dump(written))
    assert server.http.post("/admin/reload").status_code == 200
    server.wait_for(lambda: (server.model_status("tiny")["path"] or "").endswith(
        "Tiny-Q8_0-00001-of-00003.gguf"))
    server.wait_for(lambda: (server.model_status("added")["download"] or {}).get("phase")
                    == "done")
    assert server.model_status("tiny")["state"] == "unloaded"


def test_shutdown_does_not_wait_for_a_download(hub: LocalHub, corral: Start) -> None:
    entry = hub.repos[SMOL_REPO].files[SMOL_FILE]
    entry.hold = threading.Event()  # never released while corral runs
    server = corral({"models": {"smol": {"hf": f"{SMOL_REPO}:Q4_1", "download": "startup"}}})
    server.wait_for(lambda: server.model_status("smol")["download"]["bytes_done"] > 0)
    assert server.stop(timeout=30) == 0
    assert "download_interrupted" in server.log()
