"""The Starlette proxy: routing, streaming, admin API."""

from __future__ import annotations

from corral.proxy.app import create_app

__all__ = ["create_app"]
