from __future__ import annotations

from pathlib import Path

from corral.config import ModelSpec
from corral.placement import plan_launch


def test_plan_passes_explicit_capacity() -> None:
    plan = plan_launch(ModelSpec(name="m", path=Path("/m.gguf"), slots=3, ctx_per_slot=1024))
    assert plan.ctx_total == 3072
    # Explicit -np and -c: never llama-server's unified "auto" slots.
    assert plan.server_args() == ["-np", "3", "-c", "3072"]


def test_plan_passes_gpu_layers_unless_auto() -> None:
    spec = ModelSpec(name="m", path=Path("/m.gguf"), slots=1, ctx_per_slot=256, gpu_layers=12)
    assert plan_launch(spec).server_args()[-2:] == ["-ngl", "12"]
    spec = ModelSpec(name="m", path=Path("/m.gguf"), slots=1, ctx_per_slot=256, gpu_layers="all")
    assert plan_launch(spec).server_args()[-2:] == ["-ngl", "all"]
