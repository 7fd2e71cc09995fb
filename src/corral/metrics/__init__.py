"""Prometheus metrics: what the proxy measures per request, what the supervisor reports about
models' lives, and what each child's ``/slots`` and ``/metrics`` say at scrape time."""

from __future__ import annotations

from corral.metrics.collector import CorralMetrics

__all__ = ["CorralMetrics"]
