"""``corral ps`` against a running corral."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from corral.cli import local_url
from tests.conftest import CorralProcess

Start = Callable[..., CorralProcess]


def corral_ps(*args: str, key_env: str | None = None) -> subprocess.CompletedProcess[str]:
    """``corral ps ARGS`` as a user runs it; ``$CORRAL_API_KEY`` is ``key_env`` (or unset)."""
    env = {k: v for k, v in os.environ.items() if k != "CORRAL_API_KEY"}
    if key_env is not None:
        env["CORRAL_API_KEY"] = key_env
    return subprocess.run([sys.executable, "-m", "corral", "ps", *args],
                          capture_output=True, text=True, timeout=60, env=env)


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
    assert "cannot read http://127.0.0.1:9/admin/status: cannot connect" in result.stderr
    assert "is corral running" in result.stderr
    assert "Traceback" not in result.stderr


ADMIN_KEY = "ps-admin-secret-0123456789"
APP_KEY = "ps-app-secret-9876543210"


def test_ps_presents_a_key_when_corral_has_keys(corral: Start, smollm2_header: Path) -> None:
    # No model is loaded: this runs corral itself, not llama-server.
    server = corral({
        "models": {"m": {"path": str(smollm2_header), "slots": 1, "ctx_per_slot": 256}},
        "auth": {"keys": [{"name": "ops", "key": ADMIN_KEY, "scopes": ["inference", "admin"]},
                          {"name": "app", "key": APP_KEY}]},
    })
    endpoint = f"cannot read {server.url}/admin/status"

    def refused(result: subprocess.CompletedProcess[str], *words: str) -> None:
        assert result.returncode == 1, result.stdout
        assert result.stderr.startswith(f"corral: {endpoint}: "), result.stderr
        for word in words:
            assert word in result.stderr
        assert "Traceback" not in result.stderr
        assert ADMIN_KEY not in result.stderr and APP_KEY not in result.stderr

    refused(corral_ps("--url", server.url), "401", "--key", "CORRAL_API_KEY")
    refused(corral_ps("--url", server.url, "--key", "wrong"), "401", "refused the API key")
    refused(corral_ps("--url", server.url, key_env=APP_KEY), "403",
            "neither the status nor the admin scope", "key 'app' does not have the 'status' scope")

    by_flag = corral_ps("--url", server.url, "--key", ADMIN_KEY, "--json")
    assert by_flag.returncode == 0, by_flag.stderr
    assert [m["name"] for m in json.loads(by_flag.stdout)["models"]] == ["m"]
    # The variable, with the address taken from the config; --key wins over it.
    by_env = corral_ps("-c", str(server.config_path), key_env=ADMIN_KEY)
    assert by_env.returncode == 0, by_env.stderr
    assert by_env.stdout.splitlines()[1].split()[:2] == ["m", "unloaded"]
    both = corral_ps("--url", server.url, "--key", ADMIN_KEY, key_env="wrong")
    assert both.returncode == 0, both.stderr


@pytest.mark.parametrize(("host", "url"), [
    ("127.0.0.1", "http://127.0.0.1:8080"),
    ("0.0.0.0", "http://127.0.0.1:8080"),
    ("::", "http://[::1]:8080"),
    ("::1", "http://[::1]:8080"),
    ("fd00::5", "http://[fd00::5]:8080"),
    ("corral.internal", "http://corral.internal:8080"),
])
def test_ps_reaches_the_address_corral_listens_on(host: str, url: str) -> None:
    assert local_url(host, 8080) == url
