"""What the picker knows of each pod: its ``/admin/status``, parsed, and how fresh it is.

``PodView``/``ModelView`` are plain data, built by ``parse_status`` (pure) from the JSON a
corral pod answers; ``StatusReader`` fetches it with bounded timeouts, presenting the API key.
A pod that does not answer, refuses the key or answers something that is not corral's status is
a ``PodView`` with ``up=False`` and the reason in ``error``.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import httpx

# Model states (corral.supervisor.state): serving new requests, or on its way to (a crashed
# model's requests wait for its restart); refusing them (a failed load in its back-off, given up,
# removed by a reload): never a candidate, whatever its fit.
SERVING = frozenset({"ready"})
LOADING = frozenset({"starting", "downloading", "crashed"})
REFUSING = frozenset({"failed", "given_up", "retiring", "retired"})


@dataclass(frozen=True)
class Fit:
    """Whether a load of the model would start on the pod now (corral's own placement)."""

    now: bool
    after_evicting_idle: bool
    evict: tuple[str, ...] = ()


@dataclass(frozen=True)
class ModelView:
    """One model of one pod as its ``/admin/status`` shows it."""

    name: str
    aliases: tuple[str, ...] = ()
    state: str = "stopped"
    slots: int = 0
    slots_free: int = 0
    queue_depth: int = 0
    queue_limit: int = 0
    fit: Fit | None = None   # None while loading or serving, or from a corral without "fit"

    def answers_to(self, name: str) -> bool:
        """Whether a request naming ``name`` is for this model: its name, an alias, or either
        with Ollama's ``:latest`` tag (which corral strips, as Ollama does)."""
        names = (self.name, *self.aliases)
        return name in names or (name.endswith(":latest") and name[:-7] in names)

    @property
    def serving(self) -> bool:
        return self.state in SERVING

    @property
    def loading(self) -> bool:
        return self.state in LOADING

    @property
    def refusing(self) -> bool:
        return self.state in REFUSING


@dataclass(frozen=True)
class PodView:
    """One pod: reachable or not, its models, and when the picker last heard from it."""

    endpoint: str                       # "ip:port", as the gateway is told
    up: bool
    models: tuple[ModelView, ...] = ()
    draining: bool = False
    fetched_at: float = 0.0             # time.monotonic() of the answer (or the failure)
    error: str | None = None
    node: dict[str, Any] = field(default_factory=dict)

    def find(self, name: str) -> ModelView | None:
        """The model a request naming ``name`` is for, or None when this pod has none."""
        return next((m for m in self.models if m.answers_to(name)), None)

    @property
    def healthy(self) -> bool:
        """Answering and not draining: the picker may send it new requests."""
        return self.up and not self.draining

    def load(self) -> int:
        """Requests busy or queued on the pod, over all its models."""
        return sum(m.slots - m.slots_free + m.queue_depth for m in self.models if m.serving) \
            + sum(m.queue_depth for m in self.models if not m.serving)


class StatusShapeError(ValueError):
    """The answer is JSON but not corral's status."""


def _int(value: Any, key: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise StatusShapeError(f"{key} is not an integer: {value!r}")
    return value


def _model(raw: Any) -> ModelView:
    if not isinstance(raw, dict) or not isinstance(raw.get("name"), str):
        raise StatusShapeError("a model without a name")
    state = str(raw.get("state", "stopped"))
    slots = _int(raw.get("slots") or 0, "slots")
    busy = _int(raw.get("slots_busy") or 0, "slots_busy")
    serving = state in SERVING
    # "slots_free" is the contract (pool-metrics); a corral from before it: slots - busy.
    free = raw.get("slots_free")
    slots_free = _int(free, "slots_free") if free is not None else max(0, slots - busy)
    fit_raw = raw.get("fit")
    fit = None
    if "fit" not in raw and not serving and state not in LOADING:
        # A corral from before "fit" (issue 14): whether it fits is unknown, so it ranks with
        # "after evicting", last, and that corral's own placement decides when it arrives.
        fit = Fit(now=False, after_evicting_idle=True)
    elif isinstance(fit_raw, dict):
        fit = Fit(now=bool(fit_raw.get("now")),
                  after_evicting_idle=bool(fit_raw.get("after_evicting_idle")),
                  evict=tuple(str(e) for e in fit_raw.get("evict") or ()))
    return ModelView(
        name=raw["name"], aliases=tuple(str(a) for a in raw.get("aliases") or ()),
        state=state, slots=slots if serving else 0, slots_free=slots_free if serving else 0,
        queue_depth=_int(raw.get("queue_depth") or 0, "queue_depth"),
        queue_limit=_int(raw.get("queue_limit") or 0, "queue_limit"), fit=fit)


def parse_status(endpoint: str, body: Any, fetched_at: float) -> PodView:
    """A pod's view from its ``/admin/status`` JSON; ``StatusShapeError`` if it is not one."""
    if not isinstance(body, dict) or not isinstance(body.get("models"), list):
        raise StatusShapeError("the answer is not corral's status (no \"models\" list)")
    node = body.get("node")
    return PodView(endpoint=endpoint, up=True,
                   models=tuple(_model(m) for m in body["models"]),
                   draining=bool(body.get("draining")), fetched_at=fetched_at,
                   node=node if isinstance(node, dict) else {})


def down(endpoint: str, error: str, fetched_at: float | None = None) -> PodView:
    """A pod that did not answer (or not usefully)."""
    return PodView(endpoint=endpoint, up=False, error=error,
                   fetched_at=time.monotonic() if fetched_at is None else fetched_at)


class StatusReader:
    """Reads pods' ``/admin/status`` over one pooled HTTP client, each within ``timeout``."""

    def __init__(self, api_key: str | None, timeout: float = 2.0) -> None:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        # Connect, read and pool waits all bounded: a hung pod costs one refresh, no more.
        self._client = httpx.AsyncClient(headers=headers, timeout=httpx.Timeout(timeout),
                                         trust_env=False)
        self.timeout = timeout

    async def read(self, endpoint: str) -> PodView:
        """The pod at ``endpoint`` ("ip:port") now; never raises for the pod's failures."""
        url = f"http://{endpoint}/admin/status"
        try:
            async with asyncio.timeout(self.timeout * 2):   # a slow trickle of bytes too
                response = await self._client.get(url)
        except (httpx.HTTPError, TimeoutError) as exc:
            return down(endpoint, f"{type(exc).__name__}: {exc}".rstrip(": "))
        now = time.monotonic()
        if response.status_code != 200:
            return down(endpoint, f"/admin/status answered {response.status_code}", now)
        try:
            return parse_status(endpoint, response.json(), now)
        except (ValueError, StatusShapeError) as exc:
            return down(endpoint, f"not corral's status: {exc}", now)

    async def read_all(self, endpoints: Iterable[str]) -> dict[str, PodView]:
        """Every pod at once (a slow one delays none of the others beyond the timeout)."""
        targets = list(endpoints)
        views = await asyncio.gather(*(self.read(e) for e in targets))
        return dict(zip(targets, views, strict=True))

    async def aclose(self) -> None:
        await self._client.aclose()
