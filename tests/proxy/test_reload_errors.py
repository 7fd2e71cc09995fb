"""A reload that fails for a reason other than a bad file is logged and answered, never lost.

Run in-process: the failure is injected into ``Supervisor.reconfigure``, as no valid file
makes the real code fail (the failures this guards against are bugs).
"""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
import uvicorn
import yaml
from structlog.testing import capture_logs

from corral.config import load_config
from corral.root import Corral, create_app
from corral.server import CorralServer


@pytest.fixture
def broken_reload(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Corral:
    path = tmp_path / "corral.yaml"
    path.write_text(yaml.safe_dump({
        "models": {"m": {"path": str(tmp_path / "m.gguf"), "slots": 1, "ctx_per_slot": 256}},
        "devices": [{"id": "cpu", "memory": "8GiB"}],
        "state_file": str(tmp_path / "children.json"),
    }))
    running = Corral(load_config(path))

    def broken(config: object) -> dict[str, list[str]]:
        raise RuntimeError("reconfigure broke")

    monkeypatch.setattr(running.supervisor, "reconfigure", broken)
    return running


async def test_admin_reload_answers_a_failure_with_a_500_that_says_what_broke(
    broken_reload: Corral,
) -> None:
    app = create_app(broken_reload.config, broken_reload)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                 base_url="http://127.0.0.1:8080") as http:
        with capture_logs() as logs:
            reply = await http.post("/admin/reload")
    assert reply.status_code == 500
    error = reply.json()["error"]
    assert error["code"] == "reload_failed"
    assert error["type"] == "server_error"
    assert "RuntimeError: reconfigure broke" in error["message"]
    failed = [e for e in logs if e["event"] == "config_reload_failed"]
    assert failed and failed[0]["log_level"] == "error" and failed[0]["exc_info"]


async def test_a_sighup_reload_that_fails_is_logged(broken_reload: Corral) -> None:
    app = create_app(broken_reload.config, broken_reload)
    server = CorralServer(uvicorn.Config(app), broken_reload)
    with capture_logs() as logs:
        await server._reload()  # what SIGHUP runs, as a task nobody awaits
    failed = [e for e in logs if e["event"] == "config_reload_failed"]
    assert failed and failed[0]["log_level"] == "error" and failed[0]["exc_info"]
