"""The ledger: which child holds how many bytes on which device, and what is left.

Every child corral starts holds a reservation (its ``MemoryEstimate``'s bytes per device) from
before it starts until it has stopped. A device's budget is its total minus a safety reserve
(``reserve_gpu`` / ``reserve_ram``) minus memory used by processes corral does not own
(``set_external``); ``free`` is that budget minus every reservation.

``reserve`` is atomic: it checks every device first and records all of them or none, under a
lock, so two loads deciding at the same time can never both count the same free bytes. The
second one gets a ``CapacityError`` naming the device, what it needed, what was free and who
holds the rest.

Usage::

    ledger = Ledger(devices, reserve_gpu=512 * MiB, reserve_ram=2 * GiB)
    ledger.reserve("llama-8b", plan.reservation)   # raises CapacityError if it does not fit
    ...
    ledger.release("llama-8b")                     # after the child has exited

``choose_evictions`` answers "whom to stop so this fits" from the same bookkeeping.
"""

from __future__ import annotations

import itertools
import math
import threading
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType

from corral.errors import CapacityError as CapacityError  # defined with every error
from corral.placement.devices import Device, by_id, format_bytes

_MAX_COMBINATIONS = 20_000  # beyond this many eviction sets, fall back to the greedy rule


@dataclass(frozen=True)
class Shortfall:
    """One device that cannot take a reservation: needed vs free, and who holds the rest."""

    device: str
    needed: int
    free: int
    capacity: int  # the device's budget: total - reserve - external
    holders: Mapping[str, int]  # owner -> bytes held on this device
    external: int = 0  # bytes other programs use there (already taken out of ``capacity``)

    @property
    def missing(self) -> int:
        """Bytes that would have to be freed."""
        return max(0, self.needed - self.free)

    def describe(self) -> str:
        """One line for people, e.g. for an HTTP 503 body."""
        held = ", ".join(
            f"{owner} {format_bytes(n)}"
            for owner, n in sorted(self.holders.items(), key=lambda kv: -kv[1])
        )
        notes = [f"held by {held}"] if held else []
        if self.external:
            notes.append(f"other programs use {format_bytes(self.external)}")
        return (
            f"{self.device}: needs {format_bytes(self.needed)}, {format_bytes(self.free)} free "
            f"of {format_bytes(self.capacity)}" + (f" ({'; '.join(notes)})" if notes else "")
        )


@dataclass(frozen=True)
class DeviceUsage:
    """A device's budget and holders at one moment (for display and the admin API)."""

    device: Device
    reserve: int
    external: int
    holders: Mapping[str, int]

    @property
    def capacity(self) -> int:
        """Total minus reserve minus external use."""
        return max(0, self.device.total - self.reserve - self.external)

    @property
    def held(self) -> int:
        """Bytes reserved by corral's children."""
        return sum(self.holders.values())

    @property
    def free(self) -> int:
        """Bytes a new reservation may still take."""
        return self.capacity - self.held

    def as_dict(self) -> dict[str, object]:
        """For JSON: ``/admin/status`` and ``corral plan --json``."""
        return {"device": self.device.id, "name": self.device.name, "total": self.device.total,
                "reserve": self.reserve, "external": self.external, "capacity": self.capacity,
                "reserved": self.held,
                "free": self.free, "holders": dict(self.holders)}


class Ledger:
    """Reservations of device memory by owner (model name). Pure bookkeeping, no I/O."""

    def __init__(self, devices: Iterable[Device], reserve_gpu: int = 0, reserve_ram: int = 0):
        self._devices = by_id(devices)
        self._reserve = {
            d.id: (reserve_gpu if d.kind == "gpu" else reserve_ram) for d in self._devices.values()
        }
        self._external: dict[str, int] = {d: 0 for d in self._devices}
        self._held: dict[str, dict[str, int]] = {}  # owner -> device -> bytes
        self._lock = threading.Lock()

    @property
    def devices(self) -> list[Device]:
        """The devices this ledger budgets, in the order given."""
        return list(self._devices.values())

    def device(self, device_id: str) -> Device:
        """The device with this id; ``KeyError`` if unknown."""
        return self._devices[device_id]

    def capacity(self, device_id: str) -> int:
        """Bytes corral may use on the device in all: total - reserve - external use."""
        device = self._devices[device_id]
        return max(0, device.total - self._reserve[device_id] - self._external[device_id])

    def free(self, device_id: str, ignoring: Iterable[str] = ()) -> int:
        """Bytes not yet reserved; ``ignoring`` counts those owners' holdings as free too."""
        skip = set(ignoring)
        held = sum(
            amounts.get(device_id, 0) for owner, amounts in self._held.items() if owner not in skip
        )
        return self.capacity(device_id) - held

    def held_by(self, device_id: str) -> dict[str, int]:
        """Owner -> bytes held on the device."""
        return {
            owner: amounts[device_id]
            for owner, amounts in self._held.items()
            if amounts.get(device_id, 0) > 0
        }

    def holdings(self, owner: str) -> dict[str, int]:
        """Device -> bytes ``owner`` holds ({} if nothing)."""
        return dict(self._held.get(owner, {}))

    @property
    def owners(self) -> list[str]:
        """Everyone holding a reservation."""
        return list(self._held)

    def reservations(self) -> dict[str, dict[str, int]]:
        """Owner -> device -> bytes for every reservation, copied at one moment."""
        with self._lock:
            return {owner: dict(amounts) for owner, amounts in self._held.items()}

    def external(self, device_id: str) -> int:
        """Bytes other programs use on the device, as last observed (0 if never)."""
        return self._external[device_id]

    def shortfalls(
        self, amounts: Mapping[str, int], ignoring: Iterable[str] = ()
    ) -> list[Shortfall]:
        """The devices on which ``amounts`` would not fit now ([] if it fits everywhere)."""
        skip = set(ignoring)
        result = []
        for device_id, needed in amounts.items():
            if device_id not in self._devices:
                raise ValueError(f"unknown device {device_id!r}")
            free = self.free(device_id, skip)
            if needed > free:
                holders = {o: n for o, n in self.held_by(device_id).items() if o not in skip}
                result.append(
                    Shortfall(device_id, needed, free, self.capacity(device_id),
                              MappingProxyType(holders), self._external[device_id])
                )
        return result

    def fits_on_empty(self, amounts: Mapping[str, int]) -> bool:
        """Whether ``amounts`` would fit with no reservations and no other programs' use."""
        return all(n <= max(0, self._devices[d].total - self._reserve[d])
                   for d, n in amounts.items())

    def fits(self, amounts: Mapping[str, int], ignoring: Iterable[str] = ()) -> bool:
        """Whether ``amounts`` would fit now."""
        return not self.shortfalls(amounts, ignoring)

    def reserve(self, owner: str, amounts: Mapping[str, int]) -> None:
        """Record ``owner``'s bytes per device, all or nothing; raises ``CapacityError``.

        An owner that already holds a reservation has it replaced (checked as if the old one
        were released first), so a child can be resized without ever holding both.
        """
        cleaned = {d: int(n) for d, n in amounts.items() if n > 0}
        if any(n < 0 for n in amounts.values()):
            raise ValueError("reservations must be >= 0")
        with self._lock:
            missing = self.shortfalls(cleaned, ignoring=(owner,))
            if missing:
                raise CapacityError(owner, missing)
            self._held[owner] = cleaned

    def release(self, owner: str) -> dict[str, int]:
        """Drop ``owner``'s reservation; returns what it held ({} if nothing)."""
        with self._lock:
            return self._held.pop(owner, {})

    def set_external(self, device_id: str, used: int) -> None:
        """Bytes used on the device by processes corral does not own (from a fresh probe)."""
        if device_id not in self._devices:
            raise ValueError(f"unknown device {device_id!r}")
        with self._lock:
            self._external[device_id] = max(0, int(used))

    def observe(self, device: Device, corral_used: int) -> None:
        """Record a fresh probe: what is neither free nor corral's children's is external.

        ``device.free`` comes from NVML or psutil; ``corral_used`` is what corral's own children
        use there now, each at most its reservation (``corral_usage``). A child
        still loading has not allocated everything yet; its missing part counts as free on the
        device and stays reserved here, so nothing is counted twice.
        """
        if device.free is None:
            return
        self.set_external(device.id, device.total - device.free - corral_used)

    def without(self, owners: Iterable[str]) -> Ledger:
        """A copy of this ledger as it would be once ``owners`` released their memory."""
        gone = set(owners)
        copy = Ledger(self._devices.values())
        with self._lock:
            copy._reserve = dict(self._reserve)
            copy._external = dict(self._external)
            copy._held = {o: dict(a) for o, a in self._held.items() if o not in gone}
        return copy

    def snapshot(self) -> list[DeviceUsage]:
        """Every device's budget and holders now, for display."""
        with self._lock:
            return [
                DeviceUsage(
                    device, self._reserve[device.id], self._external[device.id],
                    MappingProxyType(self.held_by(device.id)),
                )
                for device in self._devices.values()
            ]


def corral_usage(
    reservations: Mapping[str, Mapping[str, int]],
    measured: Mapping[str, Mapping[str, int]],
) -> dict[str, int]:
    """Bytes per device to count as corral's in ``Ledger.observe``; the rest of what is used
    there is charged to other programs.

    ``reservations`` and ``measured`` are owner -> device -> bytes: what the ledger holds (see
    ``Ledger.reservations``) and what a child uses now (NVML, the kernel). Each reservation
    counts with ``min(measured, reserved)``:

    - a child still loading has used part of its reservation; the rest is free on the device
      and stays reserved in the ledger, so nothing is counted twice and nothing is lost;
    - a child using more than it reserved counts with its reservation: the excess is charged to
      other programs, so the budget still covers it;
    - a child nothing measures counts with its whole reservation. Then what it has not used yet
      hides as much of other programs' use (a loading child's budget is not kept from them).

    Measured processes without a reservation count for nothing: their memory is in use but
    the ledger does not hold it, so it belongs with other programs'.
    """
    used: dict[str, int] = {}
    for owner, amounts in reservations.items():
        actual = measured.get(owner, {})
        for device, reserved in amounts.items():
            now = actual.get(device)
            used[device] = used.get(device, 0) + (reserved if now is None else min(now, reserved))
    return used


@dataclass(frozen=True)
class EvictionCandidate:
    """A running model that could be stopped to make room.

    ``held`` is what it holds per device; left empty, the ledger's record for ``name`` is used.
    """

    name: str
    last_used: float
    held: Mapping[str, int] = field(default_factory=lambda: MappingProxyType({}))
    busy: bool = False
    pinned: bool = False


def choose_evictions(
    need: Mapping[str, int], candidates: Sequence[EvictionCandidate], ledger: Ledger
) -> list[str] | None:
    """Which models to stop so that ``need`` (bytes per device, e.g. ``NoFit.needed``) fits.

    Returns [] when it already fits, None when stopping every eligible model would not be
    enough, else names in the order to stop them (least recently used first). The rule:

    - busy models (requests in flight) and pinned models are never chosen;
    - the fewest models that free enough on every short device;
    - among sets of that size, the one whose most recently used member was used longest ago,
      then the second most recent, and so on (plain LRU when one model is enough);
    - a model that holds nothing on a short device is never chosen.

    With many candidates (more than 20,000 sets of the needed size) it falls back to: add models
    least recently used first until enough is freed, then drop any the rest can do without,
    most recently used first.
    """
    short = {d: n - ledger.free(d) for d, n in need.items() if n > ledger.free(d)}
    if not short:
        return []

    def held(c: EvictionCandidate) -> Mapping[str, int]:
        return c.held or ledger.holdings(c.name)

    useful = sorted(
        (c for c in candidates
         if not c.busy and not c.pinned and any(held(c).get(d, 0) > 0 for d in short)),
        key=lambda c: c.last_used,
    )

    def enough(chosen: Sequence[EvictionCandidate]) -> bool:
        return all(sum(held(c).get(d, 0) for c in chosen) >= n for d, n in short.items())

    if not enough(useful):
        return None
    for k in range(1, len(useful) + 1):
        if math.comb(len(useful), k) > _MAX_COMBINATIONS:
            break
        best: tuple[EvictionCandidate, ...] | None = None
        for combo in itertools.combinations(useful, k):
            if enough(combo) and (best is None or _recency(combo) < _recency(best)):
                best = combo
        if best is not None:
            return [c.name for c in best]
    chosen: list[EvictionCandidate] = []
    for c in useful:
        chosen.append(c)
        if enough(chosen):
            break
    for c in reversed(list(chosen)):
        rest = [o for o in chosen if o is not c]
        if enough(rest):
            chosen = rest
    return [c.name for c in chosen]


def _recency(combo: Sequence[EvictionCandidate]) -> tuple[float, ...]:
    # Most recent use first: comparing these tuples prefers sets whose newest member is oldest.
    return tuple(sorted((c.last_used for c in combo), reverse=True))
