"""The Starlette app: routing, admission queue, streaming, admin API."""

from __future__ import annotations

from corral.proxy.app import build_app

__all__ = ["build_app"]
