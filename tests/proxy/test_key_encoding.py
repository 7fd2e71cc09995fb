"""API keys are printable ASCII, compared as the bytes a client sends.

A header carries bytes; clients encode text beyond ASCII differently (UTF-8, latin-1), so a
non-ASCII key would work for some clients only. The configuration refuses it, naming where.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from corral.config import parse_config
from corral.errors import ConfigError
from tests.conftest import CorralProcess

Start = Callable[..., CorralProcess]
KEY = "clé-secrète-0123456789"
ASCII_KEY = "plain-secret-0123456789"
RULE = "the key must be printable ASCII without spaces at either end"


def problems(key: dict[str, Any], tmp_path: Path) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_config({"models": {"m": {"path": "m.gguf"}}, "auth": {"keys": [key]}},
                     base_dir=tmp_path)
    assert KEY not in str(info.value) and "é" not in str(info.value)
    return info.value.problems


def test_keys_beyond_printable_ascii_are_refused_naming_where(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CORRAL_TEST_KEY", KEY)
    (tmp_path / "k.txt").write_text(KEY + "\n", encoding="utf-8")
    assert problems({"key": KEY}, tmp_path) == [f"auth.keys.0.key: {RULE} (HTTP headers "
                                                "carry no other text reliably)"]
    assert problems({"key_env": "CORRAL_TEST_KEY"}, tmp_path)[0].startswith(
        f"auth.keys.0.key_env: {RULE}")
    assert problems({"key_file": "k.txt"}, tmp_path)[0].startswith(
        f"auth.keys.0.key_file: {RULE}")
    for bad in ("tab\there", "line\nbreak", " leading", "trailing "):
        assert problems({"key": bad}, tmp_path)[0].startswith(f"auth.keys.0.key: {RULE}")
    parse_config({"models": {"m": {"path": "m.gguf"}}, "auth": {"keys": [
        {"key": "with inner space"}, {"key": ASCII_KEY}]}})


def test_corral_serve_refuses_a_non_ascii_key(tmp_path: Path) -> None:
    path = tmp_path / "corral.yaml"
    path.write_text(yaml.safe_dump({
        "models": {"m": {"path": "m.gguf"}}, "state_file": str(tmp_path / "children.json"),
        "auth": {"keys": [{"key": KEY}]}}, allow_unicode=True), encoding="utf-8")
    done = subprocess.run([sys.executable, "-m", "corral", "serve", "-c", str(path)],
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 2, done.stderr
    assert f"auth.keys.0.key: {RULE}" in done.stderr
    assert KEY not in done.stderr + done.stdout


@pytest.mark.integration
def test_a_key_matches_only_its_own_bytes(corral: Start, smollm2: Path) -> None:
    server = corral({"models": {"m": {"path": str(smollm2), "slots": 1, "ctx_per_slot": 256}},
                     "auth": {"keys": [{"key": ASCII_KEY, "scopes": ["admin"]}]}})
    assert server.http.get("/admin/status", headers={"X-Api-Key": ASCII_KEY}).status_code == 200
    # Bytes beyond ASCII, however encoded, are simply a wrong key: 401, never a 5xx.
    for sent in ((ASCII_KEY + "é").encode("utf-8"), (ASCII_KEY + "é").encode("latin-1"),
                 b"\xff\xfe"):
        answer = server.http.get("/admin/status", headers=[(b"X-Api-Key", sent)])
        assert answer.status_code == 401, answer.text
        assert answer.json()["error"]["code"] == "invalid_api_key"
        answer = server.http.get("/admin/status",
                                 headers=httpx.Headers([(b"Authorization", b"Bearer " + sent)]))
        assert answer.status_code == 401, answer.text
