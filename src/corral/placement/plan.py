"""Launch plans: the capacity a child is started with, decided before it starts.

Pure functions only. Today a plan takes the configured values as they are; memory-aware placement
(slots and context that fit, GPU layers and devices) replaces ``plan_launch`` without changing
what the supervisor receives.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from corral.config.schema import ModelSpec


@dataclass(frozen=True)
class LaunchPlan:
    """What one child gets: ``slots`` x ``ctx_per_slot`` tokens and ``gpu_layers`` offloaded."""

    slots: int
    ctx_per_slot: int
    gpu_layers: int | Literal["auto", "all"] = "auto"

    @property
    def ctx_total(self) -> int:
        return self.slots * self.ctx_per_slot

    def server_args(self) -> list[str]:
        """llama-server flags for this plan; explicit ``-np`` keeps the KV cache per slot."""
        args = ["-np", str(self.slots), "-c", str(self.ctx_total)]
        if self.gpu_layers != "auto":
            args += ["-ngl", str(self.gpu_layers)]
        return args


def plan_launch(spec: ModelSpec) -> LaunchPlan:
    """The plan for ``spec``: its configured slots, context per slot and GPU layers."""
    return LaunchPlan(slots=spec.slots, ctx_per_slot=spec.ctx_per_slot, gpu_layers=spec.gpu_layers)
