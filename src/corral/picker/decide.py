"""The decision, per request: which pods, best first, for a model (pure: no I/O, no clock).

Tiers, best first (a pod that is in none of them for the model is not a candidate):

1. ``loaded_free``: the model is serving there with a slot free (most free slots first);
2. ``loaded_queue``: it is serving or loading (or restarting after a crash) there and its queue
   is under its limit (shortest queue first); a pod this picker just sent the model to counts
   as loading;
3. ``fits``: corral's own placement says a load would start there now without evicting;
4. ``fits_after_evicting``: it would start after evicting idle models.

Within tiers 3 and 4 the least loaded pod goes first. A model whose state refuses requests on a
pod (a failed load in its back-off, given up, retiring or retired) makes that pod no candidate.
The answer's ``endpoints`` are every candidate in that order (the first is the pick, the rest
are the gateway's fallbacks).

Refusals: ``no_pods`` (503) when no pod is up; ``unknown_model`` (404) when no pod, up or down,
has a model of that name (the gateway answers it, so a typo costs no pod a request);
``no_pods`` (503) when only pods that are down know it; ``full`` (429) when every pod that knows
it is full (queues at their limit, no room to load). 429 and 503 carry ``retry_after``.

A request without a model (``GET /v1/models``, a llama.cpp ``/completion`` without one) goes to
any healthy pod, least loaded first (``no_model``). Session affinity (a header's value) puts
first, among the pods serving the model (or all healthy pods, for ``no_model``), the one that
rendezvous hashing prefers for the value, unless its load exceeds ``max_load`` times the
fleet's mean (bounded-load hashing), when the next preferred one is tried (``affinity``).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from corral.picker.view import PodView

REASONS = ("loaded_free", "loaded_queue", "fits", "fits_after_evicting", "affinity",
           "no_model", "unknown_model", "full", "no_pods")


@dataclass(frozen=True)
class Decision:
    """Where a request goes: ``endpoints`` ("ip:port", best first), or a refusal."""

    endpoints: tuple[str, ...]
    reason: str
    status: int | None = None       # 429, 503 or 404 when endpoints is empty
    retry_after: float | None = None


@dataclass(frozen=True)
class Affinity:
    """A session's key (the header's value) and the load bound (>= 1, times the mean)."""

    key: str
    max_load: float = 1.25


InFlight = Mapping[tuple[str, str], int]
"""Requests sent to (endpoint, model name as that pod calls it) since its last view."""

_TIER_REASONS = ("loaded_free", "loaded_queue", "fits", "fits_after_evicting")


def _pod_in_flight(in_flight: InFlight, endpoint: str) -> int:
    return sum(n for (e, _), n in in_flight.items() if e == endpoint)


def _load(pod: PodView, in_flight: InFlight) -> int:
    return pod.load() + _pod_in_flight(in_flight, pod.endpoint)


def _rank(model: str, pod: PodView, in_flight: InFlight) -> tuple[int, int] | None:
    """(tier, order within the tier) of ``pod`` for ``model``, or None: not a candidate."""
    m = pod.find(model)
    if m is None or m.refusing:
        return None
    sent = in_flight.get((pod.endpoint, m.name), 0)
    if m.serving:
        free = m.slots_free - sent
        if free > 0:
            return 0, -free
        queued = m.queue_depth - free       # what we sent beyond the free slots queues
        return (1, queued) if queued < m.queue_limit else None
    if m.loading or sent:
        queued = m.queue_depth + sent
        return (1, queued) if m.queue_limit <= 0 or queued < m.queue_limit else None
    if m.fit is None:
        return None
    load = _load(pod, in_flight)
    if m.fit.now:
        return 2, load
    if m.fit.after_evicting_idle:
        return 3, load
    return None


def _score(key: str, endpoint: str) -> int:
    """Rendezvous (highest random weight) score: stable across processes and restarts."""
    digest = hashlib.blake2b(f"{key}\0{endpoint}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def _preferred(affinity: Affinity, pods: Sequence[PodView], in_flight: InFlight,
               fleet: Sequence[PodView]) -> str | None:
    """The pod the session sticks to, unless every pod it could go to is over the bound."""
    if not pods:
        return None
    total = sum(_load(p, in_flight) for p in fleet)
    bound = math.ceil(affinity.max_load * (total + 1) / max(1, len(fleet)))
    for pod in sorted(pods, key=lambda p: _score(affinity.key, p.endpoint), reverse=True):
        if _load(pod, in_flight) + 1 <= bound:
            return pod.endpoint
    return None


def _with_affinity(order: list[str], first: str | None, reason: str) -> tuple[list[str], str]:
    if first is None or first == order[0]:
        return order, reason if first is None else "affinity"
    return [first, *(e for e in order if e != first)], "affinity"


def decide(model: str | None, pods: Sequence[PodView], *, in_flight: InFlight | None = None,
           affinity: Affinity | None = None, retry_after: float = 1.0) -> Decision:
    """The pods to send a request for ``model`` to, best first, or why none (module doc)."""
    sent: InFlight = in_flight or {}
    healthy = [p for p in pods if p.healthy]
    if not healthy:
        return Decision((), "no_pods", 503, retry_after)
    if model is None:
        ranked = sorted(healthy, key=lambda p: (_load(p, sent), p.endpoint))
        order = [p.endpoint for p in ranked]
        first = _preferred(affinity, ranked, sent, healthy) if affinity else None
        endpoints, reason = _with_affinity(order, first, "no_model")
        return Decision(tuple(endpoints), reason)
    if not any(p.find(model) for p in pods):
        return Decision((), "unknown_model", 404)
    ranks = [(rank, pod) for pod in healthy if (rank := _rank(model, pod, sent)) is not None]
    if not ranks:
        if not any(p.find(model) for p in healthy):
            return Decision((), "no_pods", 503, retry_after)
        return Decision((), "full", 429, retry_after)
    ranks.sort(key=lambda rp: (rp[0], rp[1].endpoint))
    order = [pod.endpoint for _, pod in ranks]
    reason = _TIER_REASONS[ranks[0][0][0]]
    first = None
    if affinity:
        loaded = [pod for rank, pod in ranks if rank[0] <= 1]
        first = _preferred(affinity, loaded, sent, healthy)
    endpoints, reason = _with_affinity(order, first, reason)
    return Decision(tuple(endpoints), reason)
