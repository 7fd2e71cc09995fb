"""Children that will not stop or never get ready: the stop and startup timeouts.

Both use the fake llama-server (tests/fake_llama_server.py) because the real one can do neither
on demand: it exits promptly on SIGTERM and starts no processes of its own, and its load cannot
be made to last forever.
"""

from __future__ import annotations

import contextlib
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from tests.conftest import FAKE_LLAMA_SERVER, CorralProcess, wait_until

pytestmark = pytest.mark.integration

Start = Callable[..., CorralProcess]
# Long enough for a busy machine to run the fake's SIGTERM handler (it records the signal)
# before the kill; far below the default (10 s), so an ignored setting shows.
STOP_TIMEOUT = 2.0
DEFAULT_STOP_TIMEOUT = 10.0


def fake(smollm2: Path, mode: str, record: Record) -> dict[str, Any]:
    # The fake ignores the model, but corral places it first: give it a real GGUF header.
    return {"path": str(smollm2), "binary": FAKE_LLAMA_SERVER, "slots": 1, "ctx_per_slot": 256,
            "env": {"FAKE_MODE": mode, "FAKE_RECORD": str(record.path)}}


class Record:
    """What the fake wrote to its ``FAKE_RECORD`` file: ``pid N``, ``grandchild N``, ``SIGTERM``."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.started: list[psutil.Process] = []  # killed after the test, passed or not

    def lines(self) -> list[str]:
        return self.path.read_text().splitlines() if self.path.exists() else []

    def pids(self, what: str) -> list[int]:
        return [int(line.split()[1]) for line in self.lines() if line.split()[0] == what]


def gone(proc: psutil.Process | int) -> bool:
    try:
        proc = proc if isinstance(proc, psutil.Process) else psutil.Process(proc)
        # is_running() compares start times, so a reused pid does not count; a killed orphan is
        # reparented to PID 1, which need not reap it: a zombie is gone too.
        return not proc.is_running() or proc.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


@pytest.fixture
def record(tmp_path: Path) -> Iterator[Record]:
    found = Record(tmp_path / "fake-record.txt")
    yield found
    for proc in found.started:
        with contextlib.suppress(psutil.Error):
            proc.kill()  # psutil refuses if the pid now belongs to another process


def started(server: CorralProcess, record: Record,
            name: str = "stubborn") -> tuple[psutil.Process, psutil.Process]:
    """Load the model with a request; the fake and its grandchild."""
    reply = server.http.post("/v1/chat/completions", json={
        "model": name, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2})
    assert reply.status_code == 200, reply.text
    pid = server.model(name)["pid"]
    assert record.pids("pid") == [pid]
    (grandchild_pid,) = record.pids("grandchild")
    child, grandchild = psutil.Process(pid), psutil.Process(grandchild_pid)
    record.started += [child, grandchild]
    assert grandchild.ppid() == pid and grandchild.name() == "sleep"
    assert not gone(child) and not gone(grandchild)
    return child, grandchild


def stubborn(corral: Start, smollm2: Path,
             record: Record) -> tuple[CorralProcess, psutil.Process, psutil.Process]:
    """A corral whose loaded child ignores SIGTERM, as does the grandchild it started."""
    server = corral({"models": {"stubborn": fake(smollm2, "ignore_term", record)},
                     "llama_server": {"stop_timeout": f"{STOP_TIMEOUT}s"}})
    return (server, *started(server, record))


def test_a_child_that_ignores_sigterm_is_killed_with_its_group_after_stop_timeout(
    corral: Start, smollm2: Path, record: Record
) -> None:
    server, child, grandchild = stubborn(corral, smollm2, record)

    began = time.monotonic()
    unloaded = server.http.post("/admin/models/stubborn/unload")
    took = time.monotonic() - began
    assert unloaded.status_code == 200
    assert unloaded.json()["state"] == "unloaded"
    # SIGTERM came first, and corral gave the child its stop_timeout to act on it ...
    assert record.lines().count("SIGTERM") == 1
    assert took >= STOP_TIMEOUT
    # ... then SIGKILLed the whole group: the grandchild ignored SIGTERM as well.
    assert took < DEFAULT_STOP_TIMEOUT
    assert gone(child)
    # A SIGKILLed process dies when it is next scheduled: on a busy machine, a moment later.
    wait_until(lambda: gone(grandchild), timeout=30)
    assert server.children(None) == []


def test_a_helper_left_in_the_group_goes_with_a_child_that_stopped_at_once(
    corral: Start, smollm2: Path, record: Record
) -> None:
    # A wrapper script as `binary` that started a helper: the child itself obeys SIGTERM, so no
    # stop_timeout passes, and the helper would outlive it without a kill of the whole group.
    server = corral({"models": {"wrapped": fake(smollm2, "leave_helper", record)},
                     "llama_server": {"stop_timeout": "30s"}})
    child, helper = started(server, record, "wrapped")
    began = time.monotonic()
    assert server.http.post("/admin/models/wrapped/unload").status_code == 200
    assert time.monotonic() - began < 25.0  # well below the stop_timeout of 30 s
    assert gone(child)
    wait_until(lambda: gone(helper))


def test_corrals_shutdown_kills_a_child_that_ignores_sigterm_and_its_group(
    corral: Start, smollm2: Path, record: Record
) -> None:
    server, child, grandchild = stubborn(corral, smollm2, record)

    began = time.monotonic()
    assert server.stop(signal.SIGTERM) == 0
    took = time.monotonic() - began
    assert record.lines().count("SIGTERM") == 1
    assert STOP_TIMEOUT <= took < DEFAULT_STOP_TIMEOUT
    assert gone(child)
    # No parent-death signal reaches a grandchild: only corral's group kill ends it (when it is
    # next scheduled: on a busy machine, a moment later).
    wait_until(lambda: gone(grandchild), timeout=30)


def test_a_child_not_ready_within_startup_timeout_is_killed_and_reported(
    corral: Start, smollm2: Path, record: Record
) -> None:
    server = corral({"models": {"loading": fake(smollm2, "never_ready", record)},
                     "llama_server": {"startup_timeout": "2s"}})
    began = time.monotonic()
    reply = server.http.post("/v1/chat/completions", json={
        "model": "loading", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2})
    took = time.monotonic() - began
    assert reply.status_code == 503
    assert int(reply.headers["retry-after"]) >= 1
    error = reply.json()["error"]
    assert set(error) == {"message", "type", "code"}
    assert error["code"] == "model_load_failed"
    assert "llama-server was not ready within 2s" in error["message"]
    # The child's own output is quoted, so the user sees how far it got.
    assert "fake llama-server listening, mode never_ready" in error["message"]
    assert 2.0 <= took < 60.0  # the default startup_timeout is 120 s

    (child,) = record.pids("pid")
    assert gone(child)  # killed before the answer went out
    assert server.children(None) == []
    info = server.model("loading")
    assert info["state"] == "failed"
    assert info["pid"] is None
    assert info["last_error"] == "llama-server was not ready within 2s"
