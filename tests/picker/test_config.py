"""The picker's YAML file: defaults, both kinds of pods, and errors naming the key path."""

from __future__ import annotations

from pathlib import Path

import pytest

from corral.errors import ConfigError
from corral.picker.config import KubernetesSource, load_picker_config, parse_config


def problems(data: object) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        parse_config(data, "picker.yaml")
    return caught.value.problems


def test_a_static_list_with_defaults(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "picker.yaml"
    path.write_text("pods: ['127.0.0.2:8080', '[::1]:8081']\nrefresh: 0.5\n"
                    "affinity: {header: X-Session-Id}\n")
    monkeypatch.setenv("CORRAL_API_KEY", "from-env")
    config = load_picker_config(path)
    assert config.pods == ["127.0.0.2:8080", "[::1]:8081"]
    assert config.refresh == 0.5 and config.status_timeout == 2.0 and config.fail_open
    assert (config.listen.grpc.port, config.listen.http.port) == (9002, 9003)
    assert config.affinity is not None
    assert (config.affinity.header, config.affinity.max_load) == ("x-session-id", 1.25)
    assert config.key() == "from-env"


def test_kubernetes_pods() -> None:
    config = parse_config({"pods": {"kubernetes": {"namespace": "llm", "service": "corral",
                                                   "port": 8080}},
                           "api_key": "k", "fail_open": False,
                           "listen": {"grpc": {"host": "0.0.0.0", "port": 9002}}})
    assert isinstance(config.pods, KubernetesSource)
    assert config.pods.kubernetes.service == "corral"
    assert config.key() == "k" and config.fail_open is False
    assert config.listen.grpc.host == "0.0.0.0" and config.listen.http.port == 9003


@pytest.mark.parametrize(("data", "expected"), [
    ({}, "pods: Field required"),
    ({"pods": []}, "pods: the static list of pods is empty, got []"),
    ({"pods": ["10.0.0.1"]}, "pods: '10.0.0.1' is not host:port, got ['10.0.0.1']"),
    ({"pods": ["::1:80"]}, "write an IPv6 address in brackets"),
    ({"pods": ["a:1"], "refresh": "soon"}, "refresh: "),
    ({"pods": ["a:1"], "refresh": 0}, "refresh: "),
    ({"pods": ["a:1"], "affinity": {"header": "x", "max_load": 0.5}},
     "affinity.max_load: Input should be greater than or equal to 1, got 0.5"),
    ({"pods": ["a:1"], "listen": {"http": {"port": 70000}}}, "listen.http.port: "),
    ({"pods": ["a:1"], "fail_open": "maybe"}, "fail_open: "),
    ({"pods": ["a:1"], "surprise": 1}, "surprise: Extra inputs are not permitted, got 1"),
    ({"pods": {"kubernetes": {"namespace": "llm", "service": "corral"}}},
     "pods.kubernetes.port: Field required"),
])
def test_errors_name_the_key_path_and_value(data: object, expected: str) -> None:
    found = problems(data)
    assert any(expected in p for p in found), found


def test_a_bad_api_key_is_never_echoed() -> None:
    found = problems({"pods": ["a:1"], "api_key": ["s3cret"]})
    assert found and all("s3cret" not in p for p in found)
    assert found[0].startswith("api_key: ")


def test_unreadable_and_invalid_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_picker_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("pods: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_picker_config(bad)
    bad.write_text("- a list\n")
    with pytest.raises(ConfigError, match="must be a mapping"):
        load_picker_config(bad)
