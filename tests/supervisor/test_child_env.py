"""What a child's environment holds: corral's, less API keys and unchecked flags, then the
configured ``env``, then the plan's GPU selection and the child's own key."""

from __future__ import annotations

from pathlib import Path

import pytest

from corral.config import Config, parse_config
from corral.llamacpp.command import child_env
from corral.supervisor import Supervisor


def test_secrets_and_llama_arg_variables_are_dropped_and_the_plan_wins() -> None:
    env = child_env({"PATH": "/bin", "LLAMA_ARG_CTX_SIZE": "9", "TEAM_KEY": "s3cret"},
                    {"OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "0"},
                    {"CUDA_VISIBLE_DEVICES": "GPU-1"}, "child-key", secret={"TEAM_KEY"})
    assert env == {"PATH": "/bin", "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "GPU-1",
                   "LLAMA_API_KEY": "child-key"}


async def test_a_key_variable_a_reload_stopped_naming_is_still_kept_from_children(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TEAM_A_KEY", "a-secret-0123456789")
    monkeypatch.setenv("TEAM_B_KEY", "b-secret-0123456789")

    def config(variable: str) -> Config:
        return parse_config({"models": {"m": {"path": "m.gguf"}},
                             "devices": [{"id": "cpu", "memory": "8GiB"}],
                             "state_file": str(tmp_path / "children.json"),
                             "auth": {"keys": [{"key_env": variable}]}})

    supervisor = Supervisor(config("TEAM_A_KEY"))
    supervisor.reconfigure(config("TEAM_B_KEY"))
    # TEAM_A_KEY still holds a key in corral's environment: children must not get it.
    assert {"TEAM_A_KEY", "TEAM_B_KEY", "CORRAL_API_KEY"} <= supervisor.secret_env
    await supervisor.shutdown()
