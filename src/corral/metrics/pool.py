"""The Gateway API Inference Extension's model-server protocol, spoken by ``/metrics``.

An endpoint picker (the inference extension's EPP, llm-d's inference scheduler) scrapes each
pod of an ``InferencePool`` for the metrics its engine configuration names
(``examples/inference-pool/epp-config-corral.yaml`` for newer pickers, ``epp-engine-corral.yaml``
beside it for older ones, map each to corral's name). The pod is the whole corral, every model
together:

``corral_pool_waiting_requests`` (gauge)
    Requests waiting for a slot or for their model to load (the protocol's
    TotalQueuedRequests).
``corral_pool_running_requests`` (gauge)
    Requests a child is processing (TotalRunningRequests).
``corral_pool_kv_cache_utilization`` (gauge, 0-1)
    The KV cache in use (KVCacheUtilization). llama-server gives each slot a fixed share of the
    context (``n_ctx``); a busy slot uses its prompt's tokens plus those generated so far
    (``/slots``: ``n_prompt_tokens`` + ``next_token[0].n_decoded``, at most ``n_ctx``); an idle
    slot's cache is reusable by the next request, so it counts as free. The figure is the used
    tokens over the context of every serving child's slots; 0 when no child serves.
``corral_pool_models_info`` (gauge, one series)
    The models, in the shape the picker reads for LoRA adapter affinity (vLLM's
    ``lora_requests_info``): label ``running_lora_adapters`` the serving models,
    ``waiting_lora_adapters`` those loading, both comma-separated; ``max_lora`` how many could
    be loaded now: those plus every other model that would fit without evicting anything. The
    value is the scrape's Unix time (the picker keeps the series with the latest value).
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Protocol

from prometheus_client.metrics_core import GaugeMetricFamily, Metric

from corral.placement.fitness import FitAnswer
from corral.supervisor import ManagedModel, ModelState


class QueueReading(Protocol):
    """What a scrape reads of a model's admission queue (``corral.proxy.admission``)."""

    @property
    def in_flight(self) -> int: ...

    @property
    def loading(self) -> int: ...

    @property
    def depth(self) -> int: ...


def kv_cache_utilization(slot_lists: Sequence[Sequence[Mapping[str, Any]]]) -> float:
    """Used over total KV cache tokens of every slot given (one list per serving child)."""
    used = total = 0
    for slots in slot_lists:
        for slot in slots:
            n_ctx = _count(slot.get("n_ctx"))
            total += n_ctx
            if slot.get("is_processing"):
                next_token = slot.get("next_token")
                first = next_token[0] if isinstance(next_token, list) and next_token else {}
                decoded = _count(first.get("n_decoded")) if isinstance(first, dict) else 0
                used += min(n_ctx, _count(slot.get("n_prompt_tokens")) + decoded)
    return used / total if total else 0.0


def pool_metrics(
    models: Sequence[ManagedModel], queues: Mapping[str, QueueReading],
    slot_lists: Sequence[Sequence[Mapping[str, Any]]],
    fits: Mapping[str, FitAnswer | None], now: float | None = None,
) -> Iterator[Metric]:
    """The protocol's four metrics for this corral (see the module's docstring)."""
    waiting = GaugeMetricFamily(
        "corral_pool_waiting_requests",
        "Requests waiting for a slot or for their model to load, all models together "
        "(inference extension: TotalQueuedRequests).")
    running = GaugeMetricFamily(
        "corral_pool_running_requests",
        "Requests being processed by a child, all models together "
        "(inference extension: TotalRunningRequests).")
    kv = GaugeMetricFamily(
        "corral_pool_kv_cache_utilization",
        "KV cache tokens in use by busy slots over the context of every serving child's slots, "
        "0-1 (inference extension: KVCacheUtilization).")
    info = GaugeMetricFamily(
        "corral_pool_models_info",
        "Serving (running_lora_adapters) and loading (waiting_lora_adapters) models, and how "
        "many could be loaded now (max_lora); the value is the scrape's Unix time.",
        labels=["running_lora_adapters", "waiting_lora_adapters", "max_lora"])
    depth = busy = 0
    for model in models:
        queue = queues.get(model.name)
        if queue is not None:
            depth += queue.depth
            busy += queue.in_flight - queue.loading
    waiting.add_metric([], float(depth))
    running.add_metric([], float(busy))
    kv.add_metric([], kv_cache_utilization(slot_lists))
    serving = [m.name for m in models if m.state.serving]
    loading = [m.name for m in models if m.state == ModelState.STARTING]
    could = sum(1 for m in models if (fit := fits.get(m.name)) is not None and fit.now)
    info.add_metric([",".join(serving), ",".join(loading),
                     str(len(serving) + len(loading) + could)],
                    time.time() if now is None else now)
    yield from (waiting, running, kv, info)


def _count(value: object) -> int:
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    return 0
