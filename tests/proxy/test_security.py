"""API keys, scopes and model allow-lists; children that only corral can talk to."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
import yaml

from corral.cli import main
from corral.config import parse_config
from corral.errors import ConfigError
from tests.conftest import CorralProcess

Start = Callable[..., CorralProcess]
TEAM_A = "team-a-secret-0123456789"
ADMIN = "admin-secret-9876543210"
FROM_FILE = "file-secret-5555555555"
WATCH = "status-secret-7777777777"


def secured(smollm2: Path, tmp_path: Path, **auth: Any) -> dict[str, Any]:
    key_file = tmp_path / "key.txt"
    key_file.write_text(FROM_FILE + "\n")
    key_file.chmod(0o600)
    model = {"path": str(smollm2), "slots": 1, "ctx_per_slot": 256}
    return {
        "models": {"open": model, "closed": {**model}},
        "auth": {"keys": [
            {"name": "team-a", "key_env": "CORRAL_TEST_KEY_A", "scopes": ["inference"],
             "models": ["open"]},
            {"name": "ops", "key": ADMIN, "scopes": ["inference", "admin"]},
            {"name": "watch", "key": WATCH, "scopes": ["status"]},
            {"name": "filed", "key_file": str(key_file)},
        ], **auth},
    }


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def ask(model: str) -> dict[str, Any]:
    return {"model": model, "prompt": "Hi", "max_tokens": 2}


@pytest.mark.integration
def test_keys_scopes_and_model_allow_lists(
    corral: Start, smollm2: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CORRAL_TEST_KEY_A", TEAM_A)
    server = corral(secured(smollm2, tmp_path))
    post = server.http.post

    def code(response: httpx.Response) -> tuple[int, str]:
        return response.status_code, response.json()["error"]["code"]

    assert code(post("/v1/completions", json=ask("open"))) == (401, "invalid_api_key")
    assert code(post("/v1/completions", json=ask("open"), headers=bearer("wrong"))) == (
        401, "invalid_api_key")
    no_key = post("/v1/completions", json=ask("open"))
    assert no_key.headers["www-authenticate"] == "Bearer"
    assert post("/v1/completions", json=ask("open"), headers=bearer(TEAM_A)).status_code == 200
    assert post("/v1/completions", json=ask("open"),
                headers={"X-Api-Key": TEAM_A}).status_code == 200
    # A model the key may not use is answered as one that does not exist.
    denied = post("/v1/completions", json=ask("closed"), headers=bearer(TEAM_A))
    assert code(denied) == (404, "model_not_found")
    assert denied.json()["error"]["message"].endswith("available models: open")
    assert post("/v1/completions", json=ask("closed"), headers=bearer(FROM_FILE)
                ).status_code == 200
    # The admin API and /metrics need the admin scope; /health stays open.
    assert code(server.http.get("/admin/status", headers=bearer(TEAM_A))) == (403, "forbidden")
    assert code(server.http.get("/admin/status")) == (401, "invalid_api_key")
    assert server.http.get("/admin/status", headers=bearer(ADMIN)).status_code == 200
    assert code(post("/admin/models/open/unload", headers=bearer(FROM_FILE))) == (
        403, "forbidden")
    assert code(server.http.get("/metrics")) == (401, "invalid_api_key")
    assert server.http.get("/metrics", headers=bearer(ADMIN)).status_code == 200
    assert server.http.get("/health").status_code == 200
    assert code(server.http.get("/v1/models")) == (401, "invalid_api_key")
    # A status key (a picker's, Prometheus's) reads, and changes nothing, not even a model.
    status = server.http.get("/admin/status", headers=bearer(WATCH))
    assert status.status_code == 200
    assert sorted(m["name"] for m in status.json()["models"]) == ["closed", "open"]
    assert server.http.get("/admin/models", headers=bearer(WATCH)).status_code == 200
    assert server.http.get("/metrics", headers=bearer(WATCH)).status_code == 200
    for path in ("/admin/models/open/load", "/admin/models/open/unload", "/admin/reload"):
        refused = post(path, headers=bearer(WATCH))
        assert code(refused) == (403, "forbidden")
        assert "key 'watch' does not have the 'admin' scope" in refused.text
    assert code(server.http.get("/admin/models/open/logs", headers=bearer(WATCH))) == (
        403, "forbidden")
    assert code(post("/v1/completions", json=ask("open"), headers=bearer(WATCH))) == (
        403, "forbidden")
    # A key limited to some models sees only those: in the list and in a 404's suggestions.
    listed = server.http.get("/v1/models", headers=bearer(TEAM_A))
    assert [m["id"] for m in listed.json()["data"]] == ["open"]
    everything = server.http.get("/v1/models", headers=bearer(FROM_FILE)).json()["data"]
    assert sorted(m["id"] for m in everything) == ["closed", "open"]
    assert code(server.http.get("/v1/models/closed", headers=bearer(TEAM_A))) == (
        404, "model_not_found")
    unknown = post("/v1/completions", json=ask("nope"), headers=bearer(TEAM_A))
    assert unknown.status_code == 404
    assert unknown.json()["error"]["message"].endswith("available models: open")
    assert code(server.http.get("/slots?model=closed", headers=bearer(TEAM_A))) == (
        404, "model_not_found")

    # Keys never reach the logs, valid or not.
    log = server.log()
    for secret in (TEAM_A, ADMIN, FROM_FILE, WATCH, "wrong"):
        assert secret not in log


@pytest.mark.integration
def test_public_metrics_switch(
    corral: Start, smollm2: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CORRAL_TEST_KEY_A", TEAM_A)
    server = corral(secured(smollm2, tmp_path, public_metrics=True, public_health=False))
    assert server.http.get("/metrics").status_code == 200
    assert server.http.get("/health").status_code == 401
    assert server.http.get("/health", headers=bearer(TEAM_A)).status_code == 200


@pytest.mark.integration
def test_a_child_answers_only_corral(corral: Start, smollm2: Path) -> None:
    server = corral({"models": {"m": {"path": str(smollm2), "slots": 1, "ctx_per_slot": 256}}})
    assert server.http.post("/admin/models/m/load").status_code == 200
    info = server.model("m")
    # Even a process of corral's own user, who may enter the socket's directory, needs the key.
    child = httpx.Client(transport=httpx.HTTPTransport(uds=info["socket"]),
                         base_url="http://llama-server", timeout=60)
    with child:
        assert child.get("/health").status_code == 200  # llama-server keeps it open
        for path in ("/v1/models", "/slots", "/metrics", "/props"):
            assert child.get(path).status_code == 401, path
        bypass = child.post("/v1/completions", json=ask("m"))
        assert bypass.status_code == 401
        # The key is in the child's environment (readable by its owner only), never in argv.
        proc = psutil.Process(info["pid"])
        key = proc.environ()["LLAMA_API_KEY"]
        assert len(key) >= 24
        assert not any(key in arg for arg in proc.cmdline())
        assert key not in server.log()
        assert child.get("/slots", headers=bearer(key)).status_code == 200


@pytest.mark.integration
def test_a_child_inherits_no_client_keys_and_no_unchecked_flags(
    corral: Start, smollm2: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CORRAL_TEST_KEY_A", TEAM_A)
    monkeypatch.setenv("CORRAL_API_KEY", ADMIN)  # for `corral ps` in the same shell
    monkeypatch.setenv("LLAMA_ARG_N_CPU_MOE", "3")  # would move experts past the estimate
    monkeypatch.setenv("CORRAL_HARMLESS", "kept")
    config = secured(smollm2, tmp_path)
    config["models"]["open"]["env"] = {"OMP_NUM_THREADS": "1"}
    server = corral(config)
    assert server.http.post("/admin/models/open/load", headers=bearer(ADMIN)).status_code == 200
    (child,) = server.children()
    env = child.environ()
    assert "CORRAL_TEST_KEY_A" not in env and "CORRAL_API_KEY" not in env
    assert not any(name.startswith("LLAMA_ARG_") for name in env)
    assert env["CORRAL_HARMLESS"] == "kept" and env["OMP_NUM_THREADS"] == "1"
    assert env["CUDA_VISIBLE_DEVICES"] == ""  # the plan: no GPU for this CPU-only host
    assert TEAM_A not in env.values() and ADMIN not in env.values()


def test_refuses_to_listen_beyond_loopback_without_keys(
    tmp_path: Path, smollm2_header: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    base = {"models": {"m": {"path": str(smollm2_header)}}}
    for host in ("0.0.0.0", "192.168.1.5", "::"):
        with pytest.raises(ConfigError, match="no auth.keys are configured"):
            parse_config({**base, "listen": {"host": host}})
    for host in ("127.0.0.1", "localhost", "::1", "127.0.0.2"):
        parse_config({**base, "listen": {"host": host}})
    parse_config({**base, "listen": {"host": "0.0.0.0"}, "allow_unauthenticated": True})
    parse_config({**base, "listen": {"host": "0.0.0.0"}, "auth": {"keys": [{"key": "k"}]}})
    path = tmp_path / "open.yaml"
    path.write_text(yaml.safe_dump({**base, "listen": {"host": "0.0.0.0"}}))
    assert main(["serve", "-c", str(path)]) == 2
    assert "listen.host: '0.0.0.0' is reachable from other machines" in capsys.readouterr().err


def test_key_config_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CORRAL_NO_SUCH_KEY", raising=False)
    base: dict[str, Any] = {"models": {"m": {"path": "m.gguf"}}}

    def problems(*keys: dict[str, Any]) -> list[str]:
        with pytest.raises(ConfigError) as info:
            parse_config({**base, "auth": {"keys": list(keys)}}, base_dir=tmp_path)
        return info.value.problems

    assert problems({"key_env": "CORRAL_NO_SUCH_KEY"}) == [
        "auth.keys.0.key_env: environment variable 'CORRAL_NO_SUCH_KEY' is not set or empty"]
    assert problems({"key_file": "missing.txt"})[0].startswith(
        "auth.keys.0.key_file: cannot read")
    # The key itself never appears: these lines reach stderr, the log and a 400 body.
    assert problems({"key": "SuperSecret123", "key_env": "B"}) == [
        "auth.keys.0: give exactly one of key, key_env, key_file, got {'key': '***', "
        "'key_env': 'B'}"]
    assert problems({"key": 123456789}) == [
        "auth.keys.0.key: input should be a valid string, got '***'"]
    assert problems({"key": "a", "models": ["nope"]}) == [
        "auth.keys.0.models: 'nope' is not a configured model or alias"]
    assert problems({"key": "a", "scopes": ["root"]}) == [
        "auth.keys.0.scopes.0: input should be 'inference', 'status' or 'admin', got 'root'"]
    # A status or admin key reads /admin/status and /metrics, which name every model.
    (wide,) = problems({"key": "a", "scopes": ["inference", "status"], "models": ["m"]})
    assert wide.startswith("auth.keys.0: a key with the 'status' scope sees every model, so it "
                           "cannot have a models list")
    assert "'a'" not in wide  # the key itself stays out


@pytest.mark.integration
def test_slot_actions_and_lora_changes_need_admin_and_a_loaded_model(
    corral: Start, smollm2: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CORRAL_TEST_KEY_A", TEAM_A)
    config = secured(smollm2, tmp_path)
    # llama-server allows slot actions only with a save path.
    config["models"]["open"]["args"] = ["--slot-save-path", str(tmp_path)]
    server = corral(config)
    erase = "/slots/0?model=open&action=erase"
    # They change the child for everyone: an inference key may not, and nothing is loaded.
    refused = server.http.post(erase, headers=bearer(TEAM_A))
    assert refused.status_code == 403, refused.text
    not_loaded = server.http.post(erase, headers=bearer(ADMIN))
    assert not_loaded.status_code == 503
    assert "does not load models" in not_loaded.json()["error"]["message"]
    assert server.http.get("/admin/status", headers=bearer(ADMIN)).json()["totals"][
        "models_ready"] == 0
    # GET /lora-adapters is a reading a single-server client makes: it loads, like /props.
    adapters = server.http.get("/lora-adapters?model=open", headers=bearer(TEAM_A))
    assert adapters.status_code == 200 and adapters.json() == []
    erased = server.http.post(erase, headers=bearer(ADMIN))
    assert erased.status_code == 200, erased.text
    assert erased.json()["id_slot"] == 0
    lora = server.http.post("/lora-adapters?model=open", json=[], headers=bearer(ADMIN))
    assert lora.status_code == 200, lora.text
    assert server.http.post("/lora-adapters?model=open", json=[],
                            headers=bearer(TEAM_A)).status_code == 403
