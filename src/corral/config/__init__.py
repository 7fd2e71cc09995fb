"""YAML -> typed, validated configuration. Everything else receives a ``Config``."""

from __future__ import annotations

from corral.config.loader import (
    Config,
    config_path,
    load_config,
    parse_config,
    reload_problems,
)
from corral.config.schema import ConfigFile, ModelSpec

__all__ = [
    "Config",
    "ConfigFile",
    "ModelSpec",
    "config_path",
    "load_config",
    "parse_config",
    "reload_problems",
]
