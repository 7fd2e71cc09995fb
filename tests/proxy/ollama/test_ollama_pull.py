"""``POST /api/pull`` and ``/api/tags`` for models whose files come from a hub, driven by the
official ``ollama`` client against corral and the tests' local hub (tests/sources/local_hub).

One corral and one hub for the module: ``smol`` (SmolLM2 from the hub, then chatted with),
``joined`` (a small GGUF whose download the hub holds half-way), ``bad`` (a body that does not
match its checksum), ``manual`` (``download: manual``) and ``local`` (SmolLM2 by ``path:``).
Keys: ``admin`` and ``user`` (inference on ``smol`` only).
"""

from __future__ import annotations

import json
import re
import signal
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import huggingface_hub.constants as hf_constants
import ollama
import pytest

from tests.conftest import CorralProcess, launch
from tests.probe.test_gguf_split import single, tensors
from tests.proxy.ollama.clients import USER, client, serving
from tests.sources.local_hub import LocalHub

pytestmark = pytest.mark.integration

SMOL_REPO = "corral-test/SmolLM2-135M-Instruct-GGUF"
SMOL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
TINY_FILE = "Tiny-Q4_K_M.gguf"
JOINED_REPO = "corral-test/Joined-GGUF"
BAD_REPO = "corral-test/Bad-GGUF"
MANUAL_REPO = "corral-test/Manual-GGUF"
HELD_REPO = "corral-test/Held-GGUF"


@pytest.fixture(scope="module")
def hub(tmp_path_factory: pytest.TempPathFactory, smollm2: Path) -> Iterator[LocalHub]:
    """The local hub, with corral processes started from here pointed at it and at a cache
    of the module's own."""
    root = tmp_path_factory.mktemp("pullhub")
    tiny = single(root / TINY_FILE, tensors())
    local = LocalHub()
    local.add(SMOL_REPO, {SMOL_FILE: smollm2})
    local.add(JOINED_REPO, {TINY_FILE: tiny})
    local.add(BAD_REPO, {TINY_FILE: tiny}).files[TINY_FILE].corrupt = True
    local.add(MANUAL_REPO, {TINY_FILE: tiny})
    local.add(HELD_REPO, {TINY_FILE: tiny})
    local.start()
    with pytest.MonkeyPatch.context() as patch:
        for name, value in (("HF_ENDPOINT", local.url), ("HF_HOME", str(root / "hf")),
                            ("HF_HUB_CACHE", str(root / "hf" / "hub")),
                            ("HF_HUB_DISABLE_TELEMETRY", "1"),
                            ("HF_HUB_DISABLE_PROGRESS_BARS", "1")):
            patch.setenv(name, value)
        for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_HUB_OFFLINE"):
            patch.delenv(name, raising=False)
        patch.setattr(hf_constants, "HF_HUB_OFFLINE", False)
        yield local
    local.stop()


@pytest.fixture(scope="module")
def server(hub: LocalHub, tmp_path_factory: pytest.TempPathFactory, llama_server: str,
           smollm2: Path) -> Iterator[CorralProcess]:
    small = {"slots": 1, "ctx_per_slot": 512}
    corral = launch(tmp_path_factory.mktemp("pull"), llama_server, {
        "auth": {"keys": [
            {"key": "admin-key", "scopes": ["inference", "admin"]},
            {"key": "user-key", "models": ["smol"]},
        ]},
        "models": {
            "smol": {"hf": f"{SMOL_REPO}:Q4_1", "aliases": ["tiny"], **small},
            "joined": {"hf": f"{JOINED_REPO}:Q4_K_M", **small},
            "bad": {"hf": f"{BAD_REPO}:Q4_K_M", **small},
            "manual": {"hf": f"{MANUAL_REPO}:Q4_K_M", "download": "manual", **small},
            "local": {"path": str(smollm2), **small},
        },
    })
    with serving(corral) as ready:
        yield ready


def tags(server: CorralProcess) -> dict[str, Any]:
    return {m.model: m for m in client(server).list().models}


def raw_pull(server: CorralProcess, body: dict[str, Any]) -> tuple[int, list[dict[str, Any]]]:
    with server.http.stream("POST", "/api/pull", json=body) as answer:
        assert answer.headers["content-type"].startswith(
            "application/x-ndjson" if answer.status_code == 200 else "application/json")
        return answer.status_code, [json.loads(line) for line in answer.iter_lines() if line]


def test_pull_streams_progress_then_the_model_is_listed_and_answers(
        server: CorralProcess, hub: LocalHub) -> None:
    before = tags(server)
    assert "local:latest" in before  # on disk: listed
    assert "smol:latest" not in before and "tiny:latest" not in before  # not yet
    shown = server.http.post("/api/show", json={"model": "smol"})  # as Ollama: not pulled
    assert shown.status_code == 404 and "not downloaded yet" in shown.json()["error"]
    lines = list(client(server).pull("smol:latest", stream=True))
    statuses = [line.status for line in lines]
    assert statuses[0] == "pulling manifest"
    assert statuses[-3:] == ["verifying sha256 digest", "writing manifest", "success"]
    entry = hub.repos[SMOL_REPO].files[SMOL_FILE]
    pulling = [line for line in lines if line.digest]
    assert pulling and all(line.status == f"pulling {entry.sha256[:12]}"
                           and line.digest == f"sha256:{entry.sha256}"
                           and line.total == entry.size for line in pulling)
    completed = [line.completed or 0 for line in pulling]
    assert completed == sorted(completed) and completed[-1] == entry.size
    after = tags(server)
    assert after["smol:latest"].size == entry.size and after["tiny:latest"].size == entry.size
    assert len(after["smol:latest"].digest or "") == 64
    answer = client(server).chat(model="tiny", messages=[{"role": "user", "content": "Hi"}],
                                 options={"num_predict": 2})
    assert answer.done and answer.message.role == "assistant"
    # Pulled again: nothing to fetch, success at once, without asking the hub for the file.
    gets = len(hub.downloads(SMOL_FILE))
    assert raw_pull(server, {"model": "smol"}) == (
        200, [{"status": "pulling manifest"}, {"status": "success"}])
    assert len(hub.downloads(SMOL_FILE)) == gets
    assert re.search(r"action.{0,12}pull.*outcome.{0,12}success", server.log())


def test_a_pull_joins_the_download_a_request_started(server: CorralProcess,
                                                     hub: LocalHub) -> None:
    hold = hub.repos[JOINED_REPO].files[TINY_FILE].hold = threading.Event()
    try:
        started = server.http.post("/api/chat", json={
            "model": "joined", "messages": [{"role": "user", "content": "Hi"}]})
        assert started.status_code == 503, started.text
        assert server.model_status("joined")["state"] == "downloading"
        # A client that leaves after the first line: its stream ends, not the download.
        with server.http.stream("POST", "/api/pull", json={"model": "joined"}) as left:
            first = json.loads(next(left.iter_lines()))
        assert first == {"status": "pulling manifest"}
        server.wait_for(lambda: re.search(r"model.{0,12}joined.*outcome.{0,12}left", server.log()))
        assert server.model_status("joined")["state"] == "downloading"
        seen: list[str] = []

        def follow() -> None:
            seen.extend(line.status or "" for line in client(server).pull("joined", stream=True))

        puller = threading.Thread(target=follow)
        puller.start()
        server.wait_for(lambda: seen)
    finally:
        hold.set()
    puller.join(120)
    assert seen[0] == "pulling manifest" and seen[-1] == "success"
    files = [s for s in hub.downloads(TINY_FILE) if JOINED_REPO in s.path]
    assert len(files) == 1  # the request, the pull that left and this one: one download
    assert "joined:latest" in tags(server)


def test_a_failed_download_ends_the_stream_with_an_error_line(server: CorralProcess,
                                                              hub: LocalHub) -> None:
    with pytest.raises(ollama.ResponseError) as failed:
        for _ in client(server).pull("bad", stream=True):
            pass
    assert "checksum mismatch" in failed.value.error
    status, lines = raw_pull(server, {"model": "bad"})
    assert status == 200  # the stream had begun
    assert lines[0] == {"status": "pulling manifest"}
    assert set(lines[-1]) == {"error"} and "checksum mismatch" in lines[-1]["error"]
    assert all("error" not in line for line in lines[:-1])
    # Not streamed: the error with a status, and no object before it.
    whole = server.http.post("/api/pull", json={"model": "bad", "stream": False})
    assert whole.status_code == 503 and "checksum mismatch" in whole.json()["error"]
    assert set(whole.json()) == {"error"}
    assert "bad:latest" not in tags(server)
    assert server.model("bad")["state"] == "failed"
    # download: manual: a pull through the API does not download it either.
    status, lines = raw_pull(server, {"model": "manual"})
    assert status == 200 and "download: manual; run corral pull" in lines[-1]["error"]
    assert not [s for s in hub.seen if MANUAL_REPO in s.path and s.method == "GET"
                and "/resolve/" in s.path]


def test_unknown_hidden_and_unauthenticated_names(server: CorralProcess) -> None:
    with pytest.raises(ollama.ResponseError) as unknown:
        client(server).pull("llama3.2:3b")
    assert unknown.value.status_code == 404
    assert "add it under models: with hf:" in unknown.value.error
    # A model the key may not use is answered like one that does not exist.
    with pytest.raises(ollama.ResponseError) as hidden:
        client(server, USER).pull("joined")
    assert hidden.value.status_code == 404
    assert "joined" not in hidden.value.error.split("available models:")[1]
    with pytest.raises(ollama.ResponseError) as nokey:
        client(server, {}).pull("smol")
    assert nokey.value.status_code == 401
    bad = server.http.post("/api/pull", json={"model": "smol", "stream": "yes"})
    assert bad.status_code == 400 and "stream" in bad.json()["error"]
    # The rest of Ollama's model management stays refused.
    with pytest.raises(ollama.ResponseError) as delete:
        client(server).delete("local")
    assert delete.value.status_code == 501


def test_a_local_model_is_pulled_at_once(server: CorralProcess) -> None:
    assert client(server).pull("local", stream=False).status == "success"
    assert raw_pull(server, {"name": "local:latest"}) == (
        200, [{"status": "pulling manifest"}, {"status": "success"}])


def test_a_drain_ends_a_pull_stream_at_once(hub: LocalHub, tmp_path: Path,
                                            llama_server: str) -> None:
    """Its own corral, stopped by the test (the download is held until the end)."""
    hold = hub.repos[HELD_REPO].files[TINY_FILE].hold = threading.Event()
    corral = launch(tmp_path, llama_server, {"models": {"held": {"hf": f"{HELD_REPO}:Q4_K_M"}}})
    try:
        corral.wait_healthy()
        with corral.http.stream("POST", "/api/pull", json={"model": "held"}) as stream:
            lines = stream.iter_lines()
            assert json.loads(next(lines)) == {"status": "pulling manifest"}
            corral.wait_for(lambda: (corral.model_status("held")["download"] or {}).get(
                "phase") == "downloading")
            corral.proc.send_signal(signal.SIGTERM)
            rest = [json.loads(line) for line in lines if line]
        assert "corral is shutting down" in rest[-1]["error"]
        assert corral.proc.wait(60) == 0
        assert "drain_timeout" not in corral.log()  # the pull did not hold the drain up
    finally:
        hold.set()
        corral.close()
