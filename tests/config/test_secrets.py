"""API keys never appear in configuration errors: those reach stderr, the log and the 400 body
of ``POST /admin/reload``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from corral.cli import main
from corral.config import load_config, parse_config
from corral.errors import ConfigError

SECRET = "SuperSecret123"
MODELS = {"m": {"path": "m.gguf"}}


def problems(auth: Any, tmp_path: Path) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_config({"models": MODELS, "auth": auth}, base_dir=tmp_path)
    assert SECRET not in str(info.value)
    return info.value.problems


@pytest.mark.parametrize(
    ("auth", "expected"),
    [
        ({"keys": [{"key": SECRET, "key_file": "k.txt"}]},
         "auth.keys.0: give exactly one of key, key_env, key_file, got {'key': '***', "
         "'key_file': 'k.txt'}"),
        ({"keys": [{"key": [SECRET]}]},
         "auth.keys.0.key: input should be a valid string, got '***'"),
        ({"keys": [{"key": {"nested": SECRET}}]},
         "auth.keys.0.key: input should be a valid string, got '***'"),
        # A key written where an entry belongs: the bare value is hidden, its place is named.
        ({"keys": [SECRET]},
         "auth.keys.0: input should be a valid dictionary or instance of ApiKey, got '***'"),
        ({"keys": SECRET}, "auth.keys: input should be a valid list, got '***'"),
        ({"keys": {"key": SECRET, "name": "ops"}},
         "auth.keys: input should be a valid list, got {'key': '***', 'name': 'ops'}"),
        ([{"key": SECRET}],
         "auth: input should be a valid dictionary or instance of AuthSettings, "
         "got [{'key': '***'}]"),
        # A key used as a name: neither the path nor the value may echo it.
        ({"keys": {SECRET: {"scopes": ["admin"]}}},
         "auth.keys: input should be a valid list, got {'***': {'scopes': ['admin']}}"),
        ({"keys": [{SECRET: "x", "key_env": "K"}]}, "auth.keys.0.***: unknown key"),
        ({SECRET: {"scopes": ["admin"]}}, "auth.***: unknown key"),
        ({"keys": [{"key_env": "K", "scopes": {SECRET: 1}}]},
         "auth.keys.0.scopes: input should be a valid list, got {'***': '***'}"),
    ],
)
def test_keys_are_redacted_in_schema_errors(auth: Any, expected: str, tmp_path: Path) -> None:
    assert problems(auth, tmp_path) == [expected]


def test_names_outside_auth_are_still_shown(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config({"models": {"m": {"path": "m.gguf", "slotz": 2}}}, base_dir=tmp_path)
    assert info.value.problems == ["models.m.slotz: unknown key"]


def test_values_that_are_not_keys_are_still_shown(tmp_path: Path) -> None:
    assert problems({"keys": [{"key": SECRET, "name": 5}], "public_metrics": "maybe"},
                    tmp_path) == [
        "auth.keys.0.name: input should be a valid string, got 5",
        "auth.public_metrics: input should be a valid boolean, unable to interpret input, "
        "got 'maybe'",
    ]


def test_keys_read_from_files_and_the_environment_stay_out_of_errors(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "binary.key").write_bytes(b"\xff\xfe" + SECRET.encode())
    (tmp_path / "blank.key").write_text("  \n")
    monkeypatch.setenv("CORRAL_TEST_KEY", SECRET)
    found = problems({"keys": [{"key_file": "binary.key"}, {"key_file": "blank.key"},
                               {"key_env": "CORRAL_TEST_KEY", "scopes": ["root"]}]}, tmp_path)
    assert found == [
        "auth.keys.2.scopes.0: input should be 'inference', 'status' or 'admin', got 'root'"]
    found = problems({"keys": [{"key_file": "binary.key"}, {"key_file": "blank.key"},
                               {"key_env": "CORRAL_TEST_KEY"}]}, tmp_path)
    assert found == [
        f"auth.keys.0.key_file: '{tmp_path}/binary.key' is not UTF-8 text",
        "auth.keys.1: the key is empty",
    ]


def test_yaml_errors_do_not_quote_the_line(tmp_path: Path) -> None:
    path = tmp_path / "corral.yaml"
    path.write_text(f'models: {{m: {{path: m.gguf}}}}\nauth:\n  keys:\n    - {{key: "{SECRET}\n')
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert SECRET not in str(info.value)
    assert info.value.problems == [
        "not valid YAML: while scanning a quoted scalar (line 4, column 13); "
        "found unexpected end of stream (line 5, column 1)"]


def test_corral_check_does_not_print_the_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "corral.yaml"
    path.write_text(f"models: {{m: {{path: m.gguf}}}}\nauth: {{keys: [{{key: {SECRET}, "
                    "key_env: B}]}\n")
    assert main(["check", "-c", str(path)]) == 2
    captured = capsys.readouterr()
    assert SECRET not in captured.out + captured.err
    assert "auth.keys.0: give exactly one of key, key_env, key_file" in captured.err
