"""Who may unload a model through Ollama's ``keep_alive: 0``.

Stopping a model that others are using (their next requests waiting for a reload) changes it
for everyone: the admin's act, as ``POST /admin/models/{name}/unload`` is. A key with the
admin scope unloads now; an inference key's unload is Ollama's own (the model stops at its
first idle moment), so it never stops a model under another client.

The model is the fake llama-server (tests/fake_llama_server.py) with ``FAKE_GATE``: a real
llama-server cannot hold an answer open until the test says, and "while another request is
in flight" must not depend on how fast a model writes.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import FAKE_LLAMA_SERVER, CorralProcess, launch
from tests.proxy.ollama.clients import ADMIN, USER, serving

pytestmark = pytest.mark.integration

HI = [{"role": "user", "content": "Hi"}]


@pytest.fixture
def gate(tmp_path: Path) -> Path:
    return tmp_path / "gate"


@pytest.fixture
def server(tmp_path: Path, llama_server: str, smollm2: Path,
           gate: Path) -> Iterator[CorralProcess]:
    (tmp_path / "corral").mkdir()
    corral = launch(tmp_path / "corral", llama_server, {
        "auth": {"keys": [
            {"key": "admin-key", "scopes": ["inference", "admin"]},
            {"key": "user-key"},  # inference, every model
        ]},
        "models": {"gated": {"path": str(smollm2), "slots": 1, "ctx_per_slot": 512,
                             "binary": FAKE_LLAMA_SERVER, "env": {"FAKE_GATE": str(gate)}}},
    })
    with serving(corral) as ready:
        yield ready


class HeldStream:
    """A streamed /api/chat that the gate holds open: its first line read, the rest on
    ``finish``."""

    def __init__(self, server: CorralProcess) -> None:
        self.http = httpx.Client(base_url=server.url, headers=ADMIN, timeout=120)
        self.context = self.http.stream("POST", "/api/chat", json={
            "model": "gated", "messages": HI, "options": {"num_predict": 3}})
        self.response = self.context.__enter__()
        self.lines = self.response.iter_lines()
        assert json.loads(next(self.lines))["message"]["content"]

    def finish(self) -> dict[str, object]:
        rest = [json.loads(line) for line in self.lines if line]
        self.context.__exit__(None, None, None)
        self.http.close()
        last: dict[str, object] = rest[-1]
        return last


def unload(server: CorralProcess, key: dict[str, str]) -> httpx.Response:
    return httpx.post(f"{server.url}/api/generate", json={"model": "gated", "keep_alive": 0},
                      headers=key, timeout=120)


def test_an_inference_key_never_stops_a_model_under_others(
    server: CorralProcess, gate: Path,
) -> None:
    held = HeldStream(server)
    running = server.model("gated")["pid"]
    answer = unload(server, USER)
    assert answer.status_code == 200 and answer.json()["done_reason"] == "unload"
    # The other client's answer is still being written: the model is serving, same child.
    assert server.model("gated")["state"] == "ready"
    assert server.model("gated")["pid"] == running
    gate.touch()
    last = held.finish()
    assert last["done"] is True and "error" not in last  # whole, not cut
    # ... and it stops at its first idle moment, as Ollama's keep_alive 0 does.
    server.wait_for(lambda: server.model("gated")["state"] == "unloaded")


def test_an_inference_key_unloads_an_idle_model_now(server: CorralProcess, gate: Path) -> None:
    gate.touch()
    load = httpx.post(f"{server.url}/api/generate", json={"model": "gated"}, headers=USER,
                      timeout=120)
    assert load.json()["done_reason"] == "load"
    answer = unload(server, USER)
    assert answer.json()["done_reason"] == "unload"
    assert server.model("gated")["state"] == "unloaded"  # at once: no one else used it


def test_an_admin_key_unloads_now_even_under_others(server: CorralProcess, gate: Path) -> None:
    held = HeldStream(server)
    answers: list[httpx.Response] = []
    unloading = threading.Thread(target=lambda: answers.append(unload(server, ADMIN)))
    unloading.start()
    try:
        # Stopping at once: the in-flight answer may finish, nothing new starts on it.
        server.wait_for(lambda: server.model("gated")["state"] == "stopping")
    finally:
        gate.touch()
        last = held.finish()
        unloading.join(120)
    assert last["done"] is True
    assert answers and answers[0].json()["done_reason"] == "unload"
    assert server.model("gated")["state"] == "unloaded"
