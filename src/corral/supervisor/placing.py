"""Placing a model before its child starts: profile, plan, reserve, evict if needed.

The decisions are placement's pure functions; this module does their I/O (reading the GGUF
header off the event loop, reading what the devices have free, stopping models that must make
room, waiting for memory).

On discovered devices, memory other programs use is read again before every decision
(``refresh_external``): a device's budget is its total minus ``reserve`` minus that. Declared
devices are a budget the configuration sets, so nothing is read for them.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass

import structlog

from corral.config import Config, ModelSpec
from corral.errors import ModelLoadError
from corral.placement.decide import (
    EvictionCandidate,
    NoFit,
    PlacementPlan,
    PlacementRequest,
    choose_evictions,
    plan_placement,
)
from corral.placement.fitness import better_layout_evictions
from corral.placement.ledger import CapacityError, Ledger
from corral.placement.profile import ModelProfile
from corral.placement.requests import declared_devices, placement_request
from corral.probe.host import read_draft, read_model, refresh_external

log = structlog.get_logger("corral.supervisor")

_CAPACITY_POLL = 0.25
# While a load waits for capacity, the devices are read at most this often: a reading opens
# NVML and walks corral's children, and other programs rarely free memory faster than this.
_REREAD_INTERVAL = 1.0


@dataclass(frozen=True)
class Candidate:
    """Another model, as eviction sees it."""

    name: str
    last_used: float
    busy: bool
    pinned: bool


def _evictions_for_a_better_layout(
    profile: ModelProfile, request: PlacementRequest, plan: PlacementPlan, ledger: Ledger,
    candidates: list[Candidate],
) -> list[str] | None:
    """Idle models to stop so that the load runs wholly on the GPUs (``better_layout_evictions``
    decides, as ``/admin/status``'s ``fit`` does)."""
    return better_layout_evictions(profile, request, plan, ledger, _pool(candidates))


def _pool(candidates: Iterable[Candidate]) -> list[EvictionCandidate]:
    return [EvictionCandidate(c.name, c.last_used, busy=c.busy, pinned=c.pinned)
            for c in candidates]


async def _evict_all(
    loading: str, victims: list[str], candidates: Callable[[], Iterable[Candidate]],
    evict: Callable[[str], Awaitable[None]],
) -> None:
    for i, victim in enumerate(victims):
        # Stopping one takes time: a request may have come for the next one since they were
        # chosen. Then it is no longer idle; plan again instead.
        if i and not _still_idle(victim, candidates()):
            return
        log.info("model_evicting", model=victim, reason="memory", for_model=loading)
        await evict(victim)


def _still_idle(name: str, candidates: Iterable[Candidate]) -> bool:
    """Whether ``name`` may still be evicted: it holds memory, is not busy and not pinned."""
    return any(c.name == name and not c.busy and not c.pinned for c in candidates)


async def place(
    spec: ModelSpec,
    config: Config,
    ledger: Ledger,
    candidates: Callable[[], Iterable[Candidate]],
    evict: Callable[[str], Awaitable[None]],
    wait: float,
    changed: Callable[[float], Awaitable[None]] = asyncio.sleep,
) -> PlacementPlan:
    """Plan ``spec`` and reserve its memory, evicting idle models or waiting up to ``wait``.

    While busy models hold the memory it waits in ``changed(seconds)``, which returns early
    when one of them may have become evictable (the supervisor's signal; a plain sleep here).

    Raises ``ModelLoadError`` (503) saying what was needed, where, what is free and who holds
    it, when it cannot fit.
    """
    try:
        profile, projector = await asyncio.to_thread(read_model, spec)
        draft = await asyncio.to_thread(read_draft, spec)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(spec.name, f"cannot read the model file: {exc}",
                             retry_after=30.0) from None
    request = placement_request(spec, config, projector, draft)
    discovered = declared_devices(config) is None
    deadline = time.monotonic() + wait
    read_at: float | None = None  # when the devices were last read; None: read before deciding
    while True:
        if discovered and (read_at is None or time.monotonic() - read_at >= _REREAD_INTERVAL):
            # Before each decision (after evictions, and while waiting once a second): other
            # programs come and go.
            read_at = time.monotonic()
            await refresh_external(ledger)
        try:
            plan = plan_placement(profile, request, ledger.devices, ledger)
            victims = _evictions_for_a_better_layout(profile, request, plan, ledger,
                                                     list(candidates()))
            if victims:
                await _evict_all(spec.name, victims, candidates, evict)
                read_at = None
                continue
            # No await between planning and reserving: no other load can take the same bytes.
            ledger.reserve(spec.name, plan.reservation)
            return plan
        except NoFit as exc:
            if exc.permanent:
                raise ModelLoadError(spec.name, str(exc), retry_after=60.0) from None
            victims = choose_evictions(exc.needed, _pool(candidates()), ledger)
            if victims:
                await _evict_all(spec.name, victims, candidates, evict)
                read_at = None  # the evicted children's memory is back: see how much
                continue
            if time.monotonic() >= deadline:
                # Not permanent: what other programs use (impossible), or busy or pinned
                # models, stand in the way, and either may go.
                who = "" if exc.impossible else " (busy or pinned models hold it)"
                raise ModelLoadError(spec.name, f"not enough memory{who}: {exc}",
                                     retry_after=5.0) from None
            await changed(_CAPACITY_POLL)
        except CapacityError as exc:
            # Only if the ledger changed between plan and reserve: plan again, bounded.
            if time.monotonic() >= deadline:
                raise ModelLoadError(spec.name, str(exc), retry_after=5.0) from None
            await asyncio.sleep(_CAPACITY_POLL)
        except ValueError as exc:
            raise ModelLoadError(spec.name, str(exc), retry_after=60.0) from None
