"""Whether each model not running now would fit: the supervisor's side of ``would_fit``.

The decision is placement's (``corral.placement.fitness``); this module gathers its inputs as a
load does (the model's GGUF header, its placement request, the other models as eviction
candidates) and keeps the headers it read, so ``/admin/status`` reads each file once.

What it does not do that a load does: read the devices' memory again first (on discovered
GPUs, what other programs use is as of the last reading). Like a load, it counts the idle
models a load would stop to run a model wholly on the GPUs (``better_layout_evictions``).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Iterable
from pathlib import Path

from corral.config import Config, ModelSpec
from corral.placement.decide import EvictionCandidate
from corral.placement.fitness import NO_ROOM, FitAnswer, would_fit
from corral.placement.ledger import Ledger
from corral.placement.profile import ModelProfile
from corral.placement.requests import placement_request
from corral.probe.host import read_draft, read_model
from corral.supervisor.model import ManagedModel
from corral.supervisor.state import ModelState

# A model in these states has its memory reserved, or is getting it: no question of fitting.
_PLACED = (ModelState.STARTING, ModelState.READY, ModelState.RETIRING)
_CACHE_LIMIT = 256

_Key = tuple[tuple[str, int, int], ...]
_profiles: dict[_Key, tuple[ModelProfile, int, ModelProfile | None]] = {}


def _stamp(path: str | Path | None) -> tuple[str, int, int]:
    if path is None:
        return ("", 0, 0)
    st = os.stat(path)
    return (str(path), st.st_size, st.st_mtime_ns)


def _read(spec: ModelSpec) -> tuple[ModelProfile, int, ModelProfile | None]:
    """The model's profile, projector bytes and draft profile, read again only when a file
    changed."""
    key = (_stamp(spec.path), _stamp(spec.projector),
           _stamp(spec.draft.path if spec.draft else None))
    found = _profiles.get(key)
    if found is None:
        profile, projector = read_model(spec)
        found = (profile, projector, read_draft(spec))
        if len(_profiles) >= _CACHE_LIMIT:
            _profiles.clear()
        _profiles[key] = found
    return found


async def read_headers(models: Iterable[ManagedModel]) -> None:
    """Read, off the event loop, the headers ``model_fit`` will want and has not kept yet (a
    large model's header takes a while; ``model_fit`` itself runs on the loop)."""
    for model in models:
        if model.state not in _PLACED:
            with contextlib.suppress(OSError, ValueError):
                await asyncio.to_thread(_read, model.local_spec)


def _candidates(models: Iterable[ManagedModel], asking: ManagedModel,
                ledger: Ledger) -> list[EvictionCandidate]:
    """The other models holding memory, as ``Supervisor`` offers them to a load."""
    return [EvictionCandidate(m.name, m.last_used, busy=m.busy, pinned=m.spec.pinned)
            for m in models if m is not asking and ledger.holdings(m.name)]


def model_fit(model: ManagedModel, models: Iterable[ManagedModel], config: Config,
              ledger: Ledger) -> FitAnswer | None:
    """What a load of ``model`` would do now; None while it is loading or serving."""
    if model.state in _PLACED:
        return None
    spec = model.local_spec
    try:
        profile, projector, draft = _read(spec)
    except (OSError, ValueError):
        # Not downloaded yet, or unreadable: a load could not be planned now either.
        return NO_ROOM
    request = placement_request(spec, config, projector, draft)
    return would_fit(profile, request, ledger, _candidates(models, model, ledger))
