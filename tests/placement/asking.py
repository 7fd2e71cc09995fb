"""Placement requests written flat in tests: ``ask(slots=4, placement="spread")``."""

from __future__ import annotations

from typing import Any

from corral.config.schema import ModelSettings
from corral.placement.decide import PlacementRequest


def ask(**values: Any) -> PlacementRequest:
    """A request with the model settings among ``values`` validated as the config file would
    validate them, and the rest given to the request itself."""
    settings = {k: v for k, v in values.items() if k in ModelSettings.model_fields}
    rest = {k: v for k, v in values.items() if k not in settings}
    return PlacementRequest(ModelSettings.model_validate(settings), **rest)
