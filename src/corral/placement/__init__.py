"""Placement: what each child gets (slots, context, GPU layers), as pure functions."""

from __future__ import annotations

from corral.placement.plan import LaunchPlan, plan_launch

__all__ = ["LaunchPlan", "plan_launch"]
