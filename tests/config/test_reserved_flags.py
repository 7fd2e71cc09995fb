"""Flags corral owns are refused in ``args`` under every spelling llama-server accepts."""

from __future__ import annotations

import re
import subprocess

import pytest

from corral.config import parse_config
from corral.errors import ConfigError
from corral.llamacpp.flags import RESERVED_FLAGS


@pytest.mark.parametrize("flag", sorted(RESERVED_FLAGS))
def test_each_reserved_flag_is_refused_with_its_reason(flag: str) -> None:
    for args in ([flag, "1"], [f"{flag}=1"]):
        with pytest.raises(ConfigError) as caught:
            parse_config({"models": {"m": {"path": "m.gguf", "args": args}}})
        (problem,) = caught.value.problems
        assert problem.startswith(f"models.m.args: {flag!r} is set by corral ("), problem
        assert RESERVED_FLAGS[flag] in problem


def test_flags_corral_does_not_own_pass() -> None:
    # YAML numbers (`[--threads, 2]`) are command-line text like any other argument.
    config = parse_config({"models": {"m": {"path": "m.gguf", "args": [
        "--temp", 0.7, "--threads", 2, "--jinja", "--embeddings"]}}})
    assert config.models["m"].args == ("--temp", "0.7", "--threads", "2", "--jinja",
                                       "--embeddings")


@pytest.mark.integration
def test_every_spelling_of_a_reserved_flag_is_reserved(llama_server: str) -> None:
    # llama-server's own --help lists each option's spellings on one line: "-c,    --ctx-size N".
    # A new alias in a later llama.cpp would otherwise get around the refusal.
    usage = subprocess.run([llama_server, "--help"], capture_output=True, text=True,
                           timeout=60).stdout
    groups = []
    for line in usage.splitlines():
        if not line.startswith("-") or line.startswith("---"):
            continue
        names = re.match(r"-[\w-]+(?:,\s*-[\w-]+)*", line)
        assert names is not None, line
        groups.append(set(re.findall(r"-[\w-]+", names.group())))
    assert len(groups) > 100 and {"-c", "--ctx-size"} in groups
    missing = {
        flag for group in groups if group & RESERVED_FLAGS.keys()
        for flag in group - RESERVED_FLAGS.keys()
    }
    assert not missing, f"spellings of reserved flags that are not reserved: {sorted(missing)}"


@pytest.mark.parametrize(("name", "reason"), [
    ("CUDA_VISIBLE_DEVICES", "'CUDA_VISIBLE_DEVICES' is set by corral (use the model's `devices`)"),
    ("LLAMA_API_KEY", "'LLAMA_API_KEY' is set by corral (corral gives each child a private key)"),
    ("LLAMA_ARG_N_CPU_MOE", "'LLAMA_ARG_N_CPU_MOE': give llama-server flags in `args`, where "
                            "corral checks them"),
])
def test_env_that_would_override_the_plan_or_a_flag_is_refused(name: str, reason: str) -> None:
    for where in ({"models": {"m": {"path": "m.gguf", "env": {name: "1"}}}},
                  {"models": {"m": {"path": "m.gguf"}}, "llama_server": {"env": {name: "1"}}}):
        with pytest.raises(ConfigError) as caught:
            parse_config(where)
        (problem,) = caught.value.problems
        assert reason in problem and problem.split(":")[0].endswith(".env"), problem

