"""What a child's environment holds: corral's, less API keys and unchecked flags, then the
configured ``env``, then the plan's GPU selection and the child's own key."""

from __future__ import annotations

from corral.supervisor.process import child_env


def test_secrets_and_llama_arg_variables_are_dropped_and_the_plan_wins() -> None:
    env = child_env({"PATH": "/bin", "LLAMA_ARG_CTX_SIZE": "9", "TEAM_KEY": "s3cret"},
                    {"OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "0"},
                    {"CUDA_VISIBLE_DEVICES": "GPU-1"}, "child-key", secret={"TEAM_KEY"})
    assert env == {"PATH": "/bin", "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "GPU-1",
                   "LLAMA_API_KEY": "child-key"}
