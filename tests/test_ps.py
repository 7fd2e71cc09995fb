"""``corral ps`` against a running corral."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import CorralProcess

Start = Callable[..., CorralProcess]


def corral_ps(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "corral", "ps", *args],
                          capture_output=True, text=True, timeout=30)


@pytest.mark.integration
def test_ps_shows_models_slots_and_queues(corral: Start, smollm2: Path) -> None:
    server = corral({"models": {
        "smollm2": {"path": str(smollm2), "slots": 2, "ctx_per_slot": 512},
        "spare": {"path": str(smollm2), "slots": 1, "ctx_per_slot": 256, "queue": {"max": 3}},
    }})
    assert server.http.post("/admin/models/smollm2/load").status_code == 200
    result = corral_ps("-c", str(server.config_path))
    assert result.returncode == 0, result.stderr
    header, ready, spare, _, totals, cpu = result.stdout.splitlines()
    assert header.split() == ["MODEL", "STATE", "SLOTS", "QUEUE", "CTX/SLOT", "IN", "FLIGHT",
                              "PID", "UPTIME", "MEMORY"]
    pid = server.model("smollm2")["pid"]
    assert ready.split()[:7] == ["smollm2", "ready", "0/2", "0/8", "512", "0", str(pid)]
    assert ready.endswith("MiB")
    assert spare.split() == ["spare", "unloaded", "0/1", "0/3", "256", "0", "-", "-", "-"]
    assert totals == "1/2 models ready, 0/2 slots busy, 0 queued"
    assert cpu.startswith("cpu: ") and "MiB reserved of" in cpu

    as_json = corral_ps("--url", server.url, "--json")
    status = json.loads(as_json.stdout)
    assert status["totals"]["slots"] == 2
    assert {m["name"] for m in status["models"]} == {"smollm2", "spare"}


def test_ps_says_when_corral_is_not_there() -> None:
    result = corral_ps("--url", "http://127.0.0.1:9")
    assert result.returncode == 1
    assert "cannot read http://127.0.0.1:9/admin/status" in result.stderr
