"""The metrics corral records as things happen (the rest are read at scrape time).

Names and labels are a contract for dashboards and alerts: add, never rename.
"""

from __future__ import annotations

from collections.abc import Sequence

from prometheus_client import CollectorRegistry, Counter, Histogram

# Latency buckets from 5 ms to 10 minutes: local models answer fast, long generations take long.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
LOAD_BUCKETS = (0.25, 0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300)
STOP_REASONS = ("idle", "memory", "manual")
REJECT_REASONS = ("full", "timeout")
DECLARED_CODES = (200, 429, 502, 503)


class Instruments:
    """Counters and histograms, with the labelled children cached for the hot path."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.requests = Counter(
            "corral_requests", "Requests answered, by model, endpoint and HTTP status.",
            ["model", "endpoint", "code"], registry=registry)
        self.duration = Histogram(
            "corral_request_duration_seconds",
            "Time from receiving a request to the end of its response, measured by corral.",
            ["model", "endpoint"], buckets=LATENCY_BUCKETS, registry=registry)
        self.ttft = Histogram(
            "corral_time_to_first_token_seconds",
            "Time from receiving a streamed request to sending its first chunk.",
            ["model"], buckets=LATENCY_BUCKETS, registry=registry)
        self.queue_wait = Histogram(
            "corral_queue_wait_seconds", "Time requests waited for a free slot.",
            ["model"], buckets=LATENCY_BUCKETS, registry=registry)
        self.rejected = Counter(
            "corral_queue_rejected", "Requests refused by admission: full (429), timeout (503).",
            ["model", "reason"], registry=registry)
        self.loads = Counter(
            "corral_model_loads", "Model loads, by result (ok, failed).",
            ["model", "result"], registry=registry)
        self.load_seconds = Histogram(
            "corral_model_load_seconds", "Time from spawning a child to its first healthy answer.",
            ["model"], buckets=LOAD_BUCKETS, registry=registry)
        self.evictions = Counter(
            "corral_model_evictions", "Models stopped by corral: idle (ttl), memory, manual.",
            ["model", "reason"], registry=registry)
        self.restarts = Counter(
            "corral_model_restarts", "Loads of a model whose child had crashed.",
            ["model"], registry=registry)
        self._request_children: dict[tuple[str, str, int], tuple[Counter, Histogram]] = {}

    def declare(self, model: str, endpoints: Sequence[str] = ()) -> None:
        """Create a model's series at zero, so dashboards and alerts see them before traffic
        (``rate()`` misses the first increase of a series that did not exist before)."""
        for endpoint in endpoints:
            for code in DECLARED_CODES:
                self.requests.labels(model, endpoint, str(code))
            # Without it, a burst answered between two scrapes creates the series already
            # counted, and latency quantiles read NaN until the next request.
            self.duration.labels(model, endpoint)
        for reason in REJECT_REASONS:
            self.rejected.labels(model, reason)
        for result in ("ok", "failed"):
            self.loads.labels(model, result)
        for reason in STOP_REASONS:
            self.evictions.labels(model, reason)
        self.restarts.labels(model)
        self.queue_wait.labels(model)
        self.ttft.labels(model)
        self.load_seconds.labels(model)

    def request_done(
        self, model: str, endpoint: str, code: int, seconds: float, ttft: float | None
    ) -> None:
        key = (model, endpoint, code)
        children = self._request_children.get(key)
        if children is None:
            children = (self.requests.labels(model, endpoint, str(code)),
                        self.duration.labels(model, endpoint))
            self._request_children[key] = children
        children[0].inc()
        children[1].observe(seconds)
        if ttft is not None:
            self.ttft.labels(model).observe(ttft)
