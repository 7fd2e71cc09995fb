from __future__ import annotations

import struct
from pathlib import Path

import pytest
import yaml

from corral.cli import main
from corral.config import load_config, parse_config, reload_problems
from corral.errors import ConfigError
from corral.probe.host import check_model_files
from tests.probe.test_gguf import F32, gemma3, write


def problems(data: object) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_config(data)
    return info.value.problems


def test_full_example_resolves_defaults_and_overrides(tmp_path: Path) -> None:
    text = """
listen: {host: 127.0.0.1, port: 9000}
llama_server: {binary: /opt/llama-server, startup_timeout: 2m, stop_timeout: 10s,
               args: [--threads, "2"], env: {A: "1"}}
defaults: {ttl: 10m, slots: 4, ctx_per_slot: 4096, gpu_layers: auto}
default_model: smol
models:
  smollm2:
    path: models/smol.gguf
    aliases: [smol]
    ttl: 5m
    slots: 2
    ctx_per_slot: 2048
    gpu_layers: 10
    args: ["--temp", "0.7"]
    env: {B: "2"}
    preload: true
  other:
    path: /abs/other.gguf
"""
    path = tmp_path / "corral.yaml"
    path.write_text(text)
    config = load_config(path)
    smol = config.models["smollm2"]
    assert smol.path == tmp_path / "models" / "smol.gguf"
    assert (smol.ttl, smol.slots, smol.ctx_per_slot, smol.gpu_layers) == (300, 2, 2048, 10)
    assert smol.args == ("--threads", "2", "--temp", "0.7")
    assert smol.env == {"A": "1", "B": "2"}
    assert smol.preload is True
    other = config.models["other"]
    assert (other.ttl, other.slots, other.ctx_per_slot, other.gpu_layers) == (600, 4, 4096, "auto")
    assert other.path == Path("/abs/other.gguf")
    assert config.file.llama_server.startup_timeout == 120
    assert config.resolve("smol") is smol
    assert config.resolve("nope") is None
    assert config.default_model is smol
    assert config.model_names() == ["smollm2", "other", "smol"]


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        ({"models": {"smollm2": {"path": "x", "slots": 0}}},
         "models.smollm2.slots: must be >= 1, got 0"),
        ({"models": {"m": {"path": "x", "ttl": "soon"}}},
         "models.m.ttl: not a duration (use e.g. 90s, 10m, 1h), got 'soon'"),
        ({"models": {"m": {"path": "x", "ttl": -5}}}, "models.m.ttl: must not be negative, got -5"),
        ({"models": {"m": {"path": "x", "ctx_per_slot": 1000}}},
         "models.m.ctx_per_slot: must be a multiple of 256 and >= 256, got 1000"),
        ({"models": {"m": {"path": "x", "gpu_layers": "most"}}},
         "models.m.gpu_layers: must be 'auto', 'all' or a number of layers >= 0, got 'most'"),
        ({"models": {"m": {"path": "x", "gpu_layers": True}}},
         "models.m.gpu_layers: must be 'auto', 'all' or a number of layers >= 0, got True"),
        ({"models": {"m": {"path": "x", "colour": "red"}}}, "models.m.colour: unknown key"),
        ({"models": {"m": {"path": "x"}}, "listen": {"port": 70000}},
         "listen.port: must be <= 65535, got 70000"),
        ({"models": {"m": {}}}, "models.m: give exactly one of path, hf (owner/repo:QUANT), "
                                "ollama (name:tag), got {}"),
        ({"models": {"m": {"path": "a.gguf", "hf": "o/r:Q4_K_M"}}},
         "models.m: give exactly one of path, hf (owner/repo:QUANT), ollama (name:tag) (it "
         "gives path and hf), got {'path': 'a.gguf', 'hf': 'o/r:Q4_K_M'}"),
        ({"models": {"m": {"hf": "not-a-repo"}}},
         "models.m.hf: must be a Hugging Face repository, owner/name or owner/name:QUANT "
         "(e.g. bartowski/Llama-3.2-3B-Instruct-GGUF:Q4_K_M), got 'not-a-repo'"),
        ({"models": {"m": {"hf": "o/r:Q4_K_M", "file": "x.gguf"}}},
         "models.m: give either a quantization (repo:Q4_K_M) or file, not both, got "
         "{'hf': 'o/r:Q4_K_M', 'file': 'x.gguf'}"),
        ({"models": {"m": {"path": "a.gguf", "revision": "main"}}},
         "models.m: file and revision apply to hf: models only, got "
         "{'path': 'a.gguf', 'revision': 'main'}"),
        ({"models": {"m": {"path": " "}}}, "models.m.path: must not be empty, got ' '"),
        ({}, "models: required key is missing"),
        ({"models": {"m": {"path": "x"}}, "devices": [{"id": "cpu", "memory": "512MiB"}]},
         "devices.0.memory: 512.0 MiB leaves nothing once reserve.ram (1.0 GiB) is set aside"),
        ({"models": {"m": {"path": "x", "args": ["--host", "0.0.0.0"]}}},
         "models.m.args: '--host' is set by corral (corral gives each child a private socket), "
         "got ['--host', '0.0.0.0']"),
        ({"models": {"m": {"path": "x", "slots": 4, "args": ["-np", "8"]}}},
         "models.m.args: '-np 8' and models.m.slots: 4 disagree; give one of them"),
        ({"models": {"m": {"path": "x"}}, "llama_server": {"args": ["--port=1"]}},
         "llama_server.args: '--port' is set by corral (corral gives each child a private socket), "
         "got ['--port=1']"),
        ({"models": {"m": {"path": "x"}}, "llama_server": {"startup_timeout": 0}},
         "llama_server.startup_timeout: must be greater than 0, got 0"),
        ({"models": {"a": {"path": "x", "aliases": ["b"]}, "b": {"path": "y"}}},
         "models.a.aliases: 'b' is already the name or an alias of model 'b'"),
        ({"models": {"a": {"path": "x"}}, "default_model": "z"},
         "default_model: 'z' is not a configured model or alias"),
        ({"models": {"has space": {"path": "x"}}},
         "models.has space.[key]: string should match pattern '^[^\\s]+$', got 'has space'"),
        ({"models": {"a": {"path": "x"}}, "log_level": "loud"},
         "log_level: input should be 'debug', 'info', 'warning' or 'error', got 'loud'"),
    ],
)
def test_errors_name_the_key_path_and_the_bad_value(data: object, expected: str) -> None:
    assert problems(data) == [expected]


def test_every_problem_is_reported_at_once() -> None:
    found = problems({"models": {"m": {"path": "x", "slots": 0, "ttl": "x"}}, "bogus": 1})
    assert len(found) == 3


def test_top_level_must_be_a_mapping(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("")
    with pytest.raises(ConfigError, match="got an empty file"):
        load_config(path)
    path.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="got list"):
        load_config(path)
    path.write_text("models: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(path)
    with pytest.raises(ConfigError, match="cannot read the file"):
        load_config(tmp_path / "missing.yaml")


def test_check_model_files(tmp_path: Path, smollm2_header: Path) -> None:
    (tmp_path / "junk.gguf").write_bytes(b"not a model at all")
    config = parse_config(
        {"models": {"good": {"path": str(smollm2_header)}, "junk": {"path": "junk.gguf"},
                    "gone": {"path": "gone.gguf"},
                    "drafted": {"path": str(smollm2_header), "args": ["-md", "nodraft.gguf"]}}},
        base_dir=tmp_path,
    )
    assert check_model_files(config) == [
        f"models.junk.path: not a GGUF file (bad magic b'not '), got '{tmp_path}/junk.gguf'",
        f"models.gone.path: file does not exist, got '{tmp_path}/gone.gguf'",
        f"models.drafted.draft.path: file does not exist, got '{tmp_path}/nodraft.gguf'",
    ]


@pytest.mark.parametrize(
    ("header", "reason"),
    [
        (bytes(range(256)) * 4, "GGUF version 50462976 is not supported"),
        # version 3, no tensors, one key whose name claims 1000 bytes
        (struct.pack("<IQQQ", 3, 0, 1, 1000) + b"abc", "the GGUF header is truncated"),
        (struct.pack("<IQQQ", 3, 0, 1, 1) + b"a" + struct.pack("<I", 99),
         "unknown GGUF value type 99"),
        # an array of 3 strings whose first claims 100 bytes, past the end of the file
        (struct.pack("<IQQQ", 3, 0, 1, 1) + b"a" + struct.pack("<IIQQ", 9, 8, 3, 100),
         "the GGUF header is truncated"),
    ],
    ids=["junk", "truncated-key", "unknown-type", "string-past-the-end"],
)
def test_check_model_files_reads_the_header_after_the_magic(
    tmp_path: Path, smollm2_header: Path, capsys: pytest.CaptureFixture[str], header: bytes,
    reason: str,
) -> None:
    garbage = tmp_path / "garbage.gguf"
    garbage.write_bytes(b"GGUF" + header)
    config = {"models": {"real": {"path": str(smollm2_header)},
                         "tiny": {"path": str(gemma3(tmp_path / "tiny.gguf"))},
                         "garbage": {"path": str(garbage)}}}
    expected = f"models.garbage.path: not a readable GGUF file ({reason}), got '{garbage}'"
    assert check_model_files(parse_config(config)) == [expected]
    path = tmp_path / "corral.yaml"
    path.write_text(yaml.safe_dump(config))
    assert main(["check", "-c", str(path)]) == 2
    assert expected in capsys.readouterr().err
    del config["models"]["garbage"]
    path.write_text(yaml.safe_dump(config))
    assert main(["check", "-c", str(path)]) == 0  # SmolLM2's header and the synthetic file pass


def test_check_model_files_builds_the_profile_a_load_needs(tmp_path: Path) -> None:
    # Headers that read fine but describe no model corral can place: every load would fail.
    incomplete = write(tmp_path / "incomplete.gguf", "llama", {"llama.block_count": 1},
                       [("output_norm.weight", (8,), F32)])
    hybrid = write(tmp_path / "hybrid.gguf", "lfm2", {
        "lfm2.block_count": 2, "lfm2.embedding_length": 64, "lfm2.attention.head_count": 4,
        "lfm2.attention.head_count_kv": 2, "lfm2.context_length": 4096,
        "lfm2.ssm.state_size": 16, "lfm2.full_attention_interval": 0,
    }, [("output_norm.weight", (64,), F32)])
    config = parse_config({"models": {"incomplete": {"path": str(incomplete)},
                                      "hybrid": {"path": str(hybrid)}}})
    assert check_model_files(config) == [
        f"models.incomplete.path: not a readable GGUF file (llama.embedding_length: missing), "
        f"got '{incomplete}'",
        f"models.hybrid.path: not a readable GGUF file (lfm2.full_attention_interval: must be "
        f">= 1, got 0), got '{hybrid}'",
    ]


def test_corral_check_exit_codes(
    tmp_path: Path, smollm2_header: Path, capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    good = tmp_path / "good.yaml"
    good.write_text(yaml.safe_dump({"models": {"smollm2": {"path": str(smollm2_header)}}}))
    assert main(["check", "-c", str(good)]) == 0
    assert "ok, 1 model(s): smollm2" in capsys.readouterr().out

    bad = tmp_path / "bad.yaml"
    model = {"path": str(smollm2_header), "slots": 0}
    bad.write_text(yaml.safe_dump({"models": {"smollm2": model}}))
    assert main(["check", "-c", str(bad)]) == 2
    assert "models.smollm2.slots: must be >= 1, got 0" in capsys.readouterr().err

    missing = tmp_path / "missing.yaml"
    missing.write_text(yaml.safe_dump({"models": {"m": {"path": "nowhere.gguf"}}}))
    assert main(["check", "-c", str(missing)]) == 2
    assert "models.m.path: file does not exist" in capsys.readouterr().err

    # No -c: $CORRAL_CONFIG, then ./corral.yaml.
    monkeypatch.setenv("CORRAL_CONFIG", str(good))
    assert main(["check"]) == 0
    monkeypatch.delenv("CORRAL_CONFIG")
    monkeypatch.chdir(tmp_path)
    assert main(["check"]) == 2
    assert "invalid configuration corral.yaml:\n  cannot read the file" in capsys.readouterr().err


def test_a_reload_names_every_setting_that_needs_a_restart() -> None:
    base = {"models": {"m": {"path": "/m.gguf"}}}
    running = parse_config(base)
    changed = parse_config({
        **base, "listen": {"host": "127.0.0.2", "port": 9000}, "state_file": "/run/c.json",
        "devices": [{"id": "cpu", "memory": "4GiB"}], "reserve": {"ram": "2GiB"},
        "log_level": "debug", "shutdown_timeout": "1s", "health": {"failures": 9},
    })
    found = reload_problems(running, changed, "127.0.0.1")
    assert [p.split(":")[0] for p in found] == [
        "devices", "listen.host", "listen.port", "log_level", "reserve.ram", "state_file"]
    assert all("needs a restart" in p for p in found)
    assert reload_problems(running, parse_config(base), "127.0.0.1") == []


def test_a_reload_is_judged_by_the_address_corral_listens_on() -> None:
    keyed = parse_config({"listen": {"host": "0.0.0.0"}, "auth": {"keys": [{"key": "k"}]},
                          "models": {"m": {"path": "/m.gguf"}}})
    open_on_loopback = parse_config({"models": {"m": {"path": "/m.gguf"}}})
    assert "auth.keys: corral listens on '0.0.0.0'" in reload_problems(
        keyed, open_on_loopback, "0.0.0.0")[-1]
