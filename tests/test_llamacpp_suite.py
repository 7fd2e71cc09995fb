"""bench/llamacpp_suite's stand-in: llama-server's command line becomes a corral config that
corral accepts, so the comparison with llama-server cannot rot when the config changes.

Only the translation (no server is started): the full comparison is
``bench/llamacpp_suite/run.py``, documented in docs/llama-server-compat.md.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest

from corral.config import parse_config
from tests.conftest import ROOT

SUITE = ROOT / "bench" / "llamacpp_suite"
sys.path.insert(0, str(SUITE))
import as_corral  # noqa: E402
import run as run_suite  # noqa: E402
import tiny_model  # noqa: E402
from cmdline import Unsupported  # noqa: E402


@pytest.fixture
def model_map(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    model = tmp_path / "stories.gguf"
    model.write_bytes(b"")
    table = tmp_path / "models.json"
    table.write_text(json.dumps({"ggml-org/test-model-stories260K": str(model)}))
    monkeypatch.setattr("cmdline.MODEL_MAP", table)
    return model


def translate(line: str, tmp_path: Path) -> dict[str, Any]:
    config = as_corral.config_for(line.split(), tmp_path)
    parse_config(config)  # corral takes it as it is
    return config


def test_the_tests_command_line_becomes_one_default_model(
    model_map: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # What llama.cpp's tests/utils.py starts for its tinyllama2 preset, with an API key.
    config = translate(
        "--port 8123 --temp 0.8 --seed 42 --host 127.0.0.1,::1 --offline --hf-repo "
        "ggml-org/test-model-stories260K --batch-size 32 --alias tinyllama-2,fim --ctx-size 700 "
        "--parallel 2 --n-predict 64 -fa on --api-key sk-secret-0123 --cors-origins localhost",
        tmp_path)
    assert config["listen"] == {"host": ["127.0.0.1", "::1"], "port": 8123}
    # llama-server's id is the first alias in sorted order.
    assert config["default_model"] == "fim" and config["unknown_model_to_default"] is True
    model = config["models"]["fim"]
    assert model["path"] == str(model_map) and model["aliases"] == ["tinyllama-2"]
    # 700 over 2 slots, up to corral's multiple of 256.
    assert model["slots"] == 2 and model["ctx_per_slot"] == 512
    # Tuning flags stay in args: corral reads them into its settings (batch_size, flash_attn).
    assert model["args"] == ["--temp", "0.8", "--seed", "42", "--offline", "--batch-size", "32",
                             "--n-predict", "64", "-fa", "on"]
    assert config["auth"]["keys"] == [{"key": "sk-secret-0123",
                                       "scopes": ["inference", "admin"]}]
    assert config["cors"] == {"allow_origins": ["localhost"]}
    assert "dropped:" not in capsys.readouterr().err  # nothing the tests set is lost now


def test_router_mode_is_corral_without_models(tmp_path: Path) -> None:
    config = translate("--port 8123 --host 127.0.0.1 --ctx-size 1024", tmp_path)
    assert config["models"] == {} and "default_model" not in config
    with pytest.raises(Unsupported, match="router"):
        as_corral.config_for(["--models-dir", "/m"], tmp_path)


def test_a_model_not_in_the_map_is_refused(model_map: Path, tmp_path: Path) -> None:
    with pytest.raises(Unsupported, match="no local file for ggml-org/other"):
        as_corral.config_for(["--hf-repo", "ggml-org/other"], tmp_path)


def test_stories_is_the_tiny_model_run_py_writes(tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    # The committed map sends the tests' stories260K to "@tiny": the file run.py writes.
    monkeypatch.setenv("CORRAL_SUITE_TINY", str(tmp_path / "tiny.gguf"))
    config = translate("--port 8123 --hf-repo ggml-org/test-model-stories260K", tmp_path)
    assert config["models"][config["default_model"]]["path"] == str(tmp_path / "tiny.gguf")
    monkeypatch.delenv("CORRAL_SUITE_TINY")
    with pytest.raises(Unsupported, match="CORRAL_SUITE_TINY"):
        as_corral.config_for(["--hf-repo", "ggml-org/test-model-stories260K"], tmp_path)


@pytest.mark.skipif(not tiny_model.SOURCE.exists(), reason="SmolLM2's GGUF not in models/")
def test_the_tiny_model_has_smollm2s_tokenizer_and_never_stops_by_itself(
        tmp_path: Path) -> None:
    path = tiny_model.ensure(tmp_path)
    assert tiny_model.ensure(tmp_path) == path  # written once
    reader = gguf.GGUFReader(str(path))
    source = gguf.GGUFReader(str(tiny_model.SOURCE))
    for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.chat_template"):
        assert reader.get_field(key).contents() == source.get_field(key).contents()  # type: ignore[union-attr]
    assert reader.get_field("llama.block_count").contents() == 2  # type: ignore[union-attr]
    types = np.asarray(reader.get_field("tokenizer.ggml.token_type").contents())  # type: ignore[union-attr]
    tensors = {t.name: t for t in reader.tensors}
    embd = np.asarray(tensors["token_embd.weight"].data, dtype=np.float32)
    output = np.asarray(tensors["output.weight"].data, dtype=np.float32)
    # What the final norm keeps of every token's embedding (its constant first component)
    # weighs against each control token (<|im_end|>, ...) and for none of the others.
    assert (embd[:, 0] > 0).all()
    control = types == int(gguf.TokenType.CONTROL)
    assert control.sum() > 2 and (output[control, 0] < -10).all()
    assert (output[~control, 0] == 0).all()


@pytest.mark.integration
@pytest.mark.timeout(900)
def test_llamacpps_context_shift_tests_see_corral_as_llama_server(
        tmp_path: Path, llama_server: str, smollm2: Path) -> None:
    # One file of llama.cpp's own server tests, run by the harness against the real
    # llama-server and against corral in its place, both with the tiny stories260K stand-in:
    # every test has the same outcome. test_ctx_shift.py generates to a full slot with and
    # without context shift, and asks for more than the context holds.
    tests = run_suite.default_tests()
    if tests is None:
        pytest.fail("llama.cpp's server tests not found in corral's cache: run "
                    "scripts/install-llama-server (it leaves the checkout there)")
    subprocess.run(
        [sys.executable, str(SUITE / "run.py"), "--out", str(tmp_path),
         "--tokenizer-from", str(smollm2), "test_ctx_shift.py"],
        env={**os.environ, "CORRAL_SUITE_LLAMA_SERVER": llama_server}, check=True,
        timeout=840, capture_output=True)
    compared = json.loads((tmp_path / "compare.json").read_text())
    results = compared["results"]
    assert results["corral"] == results["llama-server"], compared["differ"]
    # Not an empty comparison: the file ran, and some of it passes against both. (The tests
    # that count a story tokenizer's tokens fail against both.)
    assert len(results["corral"]) == 5
    assert "test_ctx_shift.py::test_ctx_shift_disabled_stream" in {
        name for name, outcome in results["corral"].items() if outcome == "passed"}
