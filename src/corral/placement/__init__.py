"""Placement: what each child gets (slots, context, GPU layers, devices) and what it reserves.

Pure functions and value objects; the I/O they need (GGUF headers, NVML) is in ``corral.probe``.
"""

from __future__ import annotations

from corral.placement.decide import (
    EvictionCandidate,
    NoFit,
    PlacementPlan,
    PlacementRequest,
    choose_evictions,
    plan_placement,
)
from corral.placement.ledger import CapacityError, Ledger

__all__ = [
    "CapacityError",
    "EvictionCandidate",
    "Ledger",
    "NoFit",
    "PlacementPlan",
    "PlacementRequest",
    "choose_evictions",
    "plan_placement",
]
