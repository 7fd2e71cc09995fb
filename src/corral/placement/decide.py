"""Decide where a model goes and with what capacity, and whom to evict when it does not fit.

``plan_placement`` turns a ``PlacementRequest`` (slots, context, GPU layers: each fixed or
"auto") into a ``PlacementPlan``: the capacity, the ``-ngl`` value, which GPUs, the bytes to
reserve per device (``corral.llamacpp.command`` turns a plan into the llama-server command line
that makes the child allocate exactly what was estimated). The rules, in order:

1. Layouts are tried in preference order and the first that fits the *minimum* capacity wins:
   one GPU holding every layer (binpack: the GPU with the least free memory that still fits;
   spread: the one with the most); then the 2, 3, ... GPUs with the most free memory, holding
   every layer together; then, with ``gpu_layers: auto``, as many layers as fit on all allowed
   GPUs with the rest on the CPU; then the CPU alone. ``gpu_layers: all`` or a number never
   falls back to fewer layers; ``0`` is the CPU alone.
2. The minimum capacity is the requested slots and context, where "auto" means 1 slot and
   ``min_ctx_per_slot`` tokens. Within the winning layout, ``slots: auto`` becomes the largest
   count up to ``max_slots`` that fits at the requested context (or at ``min_ctx_per_slot`` when
   the context is auto too), then ``ctx_per_slot: auto`` the largest multiple of 256 that fits,
   capped by the model's trained context. GPU layers come before context: a partly offloaded
   model first gets as many layers as fit at the minimum capacity, then context from what is
   left.
3. Several GPUs share the layers in proportion to their free memory (rebalanced until each
   fits); ``--tensor-split`` is then the number of layers each GPU holds, which reproduces that
   exact assignment in llama.cpp.
4. ``devices`` pins a model: only those GPUs are candidates, and layers may stay on the CPU only
   when ``"cpu"`` is listed too (or nothing is pinned). Host memory is always used.

``choose_evictions`` (defined beside the ledger, re-exported here) picks idle models to stop so
that a reservation fits; see its docstring.

When no layout fits, ``NoFit`` says what the most promising layout needed, on which device, what
was free and who holds it, and whether evicting models could help at all (``impossible``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from corral.config.schema import DEFAULT_PLACEMENT, ModelSettings, Placement
from corral.config.tuning import overrides
from corral.errors import NoFit  # re-exported: defined with every error
from corral.placement.devices import CPU, Device, gpus
from corral.placement.estimate import (
    CTX_PAD,
    DEFAULT_GPU_OVERHEAD,
    DEFAULT_HOST_OVERHEAD,
    MemoryEstimate,
    estimate_memory,
    with_draft,
)
from corral.placement.ledger import (
    EvictionCandidate,
    Ledger,
    Shortfall,
    choose_evictions,
)
from corral.placement.profile import ModelProfile
from corral.placement.tensors import gpus_named

__all__ = [
    "EvictionCandidate",
    "NoFit",
    "PlacementPlan",
    "PlacementRequest",
    "choose_evictions",
    "plan_placement",
]

MiB = 1 << 20
_REBALANCE_ROUNDS = 8


@dataclass(frozen=True)
class PlacementRequest:
    """What a model asks for: its resolved ``settings`` ("auto" values are decided by
    ``plan_placement``), where it may go, and what corral itself sets for every child."""

    settings: ModelSettings = field(default_factory=ModelSettings)
    placement: Placement = DEFAULT_PLACEMENT
    devices: tuple[str, ...] | None = None  # pinned device ids; None = any
    min_ctx_per_slot: int = 2048  # the least an "auto" context may get (capped at n_ctx_train)
    projector_bytes: int = 0  # a multimodal projector's weights (--mmproj)
    draft_profile: ModelProfile | None = None  # the draft model's, when settings.draft is set
    gpu_overhead: int = DEFAULT_GPU_OVERHEAD
    host_overhead: int = DEFAULT_HOST_OVERHEAD
    name: str = "model"  # for messages only

    def __post_init__(self) -> None:
        if self.min_ctx_per_slot < CTX_PAD:
            raise ValueError(f"min_ctx_per_slot must be >= {CTX_PAD}")

    @property
    def overrides(self) -> tuple[tuple[str, str], ...]:
        """The model's tensor overrides, ``-ot`` then ``--cpu-moe``, as llama-server tries them."""
        return overrides(self.settings.tensor_overrides, self.settings.cpu_moe,
                         self.settings.cpu_ffn)

    @property
    def draft_overrides(self) -> tuple[tuple[str, str], ...]:
        """The draft model's tensor overrides."""
        d = self.settings.draft
        return () if d is None else overrides(d.tensor_overrides, d.cpu_moe)

    @property
    def gpus_needed(self) -> int:
        """The fewest GPUs a layout must have: overrides may name the child's n-th GPU, an
        explicit tensor split gives one proportion per GPU."""
        split = self.settings.tensor_split
        return max(gpus_named(self.overrides), gpus_named(self.draft_overrides),
                   len(split) if split else 0)

    def sized(self, slots: int, ctx_per_slot: int) -> PlacementRequest:
        """The same request with its capacity fixed at ``slots`` x ``ctx_per_slot``."""
        fixed = self.settings.model_copy(update={"slots": slots, "ctx_per_slot": ctx_per_slot})
        return replace(self, settings=fixed)


@dataclass(frozen=True)
class PlacementPlan:
    """Where and how one child runs, and what it reserves."""

    slots: int
    ctx_per_slot: int
    gpu_layers: int  # the -ngl value: n_layer + 1 means every layer and the output
    gpus: tuple[str, ...]  # device ids in the child's CUDA order
    tensor_split: tuple[int, ...]  # layers per GPU (with the output layer); () for <= 1 GPU
    estimate: MemoryEstimate
    request: PlacementRequest  # what was asked: cache types, batch sizes, ... as planned with
    checkpoints: bool = False  # sliding-window or recurrent layers: context checkpoints apply
    gpu_devices: tuple[Device, ...] = ()  # the GPUs of ``gpus``, for the child's CUDA order
    n_vocab: int = 0  # the model's vocabulary size (0: unknown), for checking token ids

    @property
    def ctx_total(self) -> int:
        """The ``-c`` value: every slot's context together."""
        return self.slots * self.ctx_per_slot

    @property
    def reservation(self) -> dict[str, int]:
        """Bytes to reserve in the ``Ledger``, per device id."""
        return self.estimate.reservation()


@dataclass(frozen=True)
class _Layout:
    gpus: tuple[Device, ...]
    ngl: int  # -1: as many as fit


@dataclass(frozen=True)
class _Fit:
    estimate: MemoryEstimate
    split: tuple[int, ...]
    shortfalls: tuple[Shortfall, ...]
    ok_when_idle: bool
    ok_when_empty: bool  # with no other programs' use either


class _Planner:
    def __init__(
        self, profile: ModelProfile, request: PlacementRequest, devices: Sequence[Device],
        ledger: Ledger,
    ) -> None:
        self.profile = profile
        self.req = request
        self.ledger = ledger
        self.n_total = profile.n_layer + 1
        pinned = set(request.devices) if request.devices is not None else None
        self.gpus = [g for g in gpus(devices) if pinned is None or g.id in pinned]
        self.cpu_layers_ok = pinned is None or CPU in pinned
        train = profile.n_ctx_train // CTX_PAD * CTX_PAD
        self.ctx_cap = max(CTX_PAD, train) if train else 1 << 20
        self.want = want = request.settings
        self.min_slots = want.slots if isinstance(want.slots, int) else 1
        self.min_ctx = (
            want.ctx_per_slot if isinstance(want.ctx_per_slot, int)
            else min(request.min_ctx_per_slot, self.ctx_cap)
        )
        self.best_failure: _Fit | None = None

    def free(self, device: Device) -> int:
        return self.ledger.free(device.id)

    def fit(self, layout_gpus: Sequence[Device], ngl: int, slots: int, ctx: int) -> _Fit:
        """Estimate one configuration; several GPUs are rebalanced until each fits if it can."""
        fixed = self.want.tensor_split
        weights = ([float(max(1, self.free(g))) for g in layout_gpus] if fixed is None
                   else list(fixed[:len(layout_gpus)]))
        fit = self._check(layout_gpus, ngl, slots, ctx, weights)
        rounds = 0
        while (fit.shortfalls and len(layout_gpus) > 1 and rounds < _REBALANCE_ROUNDS
               and fixed is None):
            rounds += 1
            short = {s.device for s in fit.shortfalls}
            if CPU in short:
                break  # moving layers between GPUs cannot help the host
            for i, g in enumerate(layout_gpus):
                need = max(1, fit.estimate.on(g.id).total)
                weights[i] *= min(4.0, max(0.25, self.free(g) / need))
            fit = self._check(layout_gpus, ngl, slots, ctx, weights)
        return fit

    def _check(
        self, layout_gpus: Sequence[Device], ngl: int, slots: int, ctx: int, weights: list[float]
    ) -> _Fit:
        split = [(g.id, w) for g, w in zip(layout_gpus, weights, strict=True)]
        est = self._estimate(ngl, slots, ctx, split or None)
        counts = tuple(est.layer_devices.count(g.id) for g in layout_gpus)
        if self.want.split_mode == "row":
            # Each matrix is cut in rows by these proportions: pass them, in thousandths.
            counts = tuple(max(1, round(1000 * w / sum(weights))) for w in weights)
        elif len(layout_gpus) > 1 and self.want.tensor_split is None:
            # Re-estimate with integer layer counts: what --tensor-split will really say.
            est = self._estimate(ngl, slots, ctx, [(g.id, float(c)) for g, c in
                                                    zip(layout_gpus, counts, strict=True)])
        need = est.reservation()
        shortfalls = tuple(self.ledger.shortfalls(need))
        idle = not self.ledger.shortfalls(need, ignoring=self.ledger.owners)
        return _Fit(est, counts, shortfalls, idle, idle or self.ledger.fits_on_empty(need))

    def _estimate(
        self, ngl: int, slots: int, ctx: int, split: Sequence[tuple[str, float]] | None
    ) -> MemoryEstimate:
        r, want = self.req, self.want
        shared: dict[str, Any] = dict(
            slots=slots, ctx_per_slot=ctx, gpu_split=split, n_batch=want.batch_size,
            n_ubatch=want.ubatch_size, flash_attn=want.flash_attn != "off",
            swa_full=want.swa_full, kv_offload=want.kv_offload, kv_unified=want.kv_unified,
            split_mode=want.split_mode,
        )
        est = estimate_memory(
            self.profile, cache_type_k=want.cache_type_k, cache_type_v=want.cache_type_v,
            gpu_layers=ngl if split else 0, gpu_overhead=r.gpu_overhead,
            host_overhead=r.host_overhead, cache_ram=int(want.prompt_cache),
            ctx_checkpoints=want.ctx_checkpoints, projector_bytes=r.projector_bytes,
            overrides=r.overrides, **shared,
        )
        draft = want.draft
        if r.draft_profile is None or draft is None:
            return est
        # llama-server gives the draft the model's context parameters and its own weights,
        # cache types, -ngld and overrides, on the same GPUs and split (speculative.cpp).
        # A checkpoint of the model's saves the draft's partial state too (server-context.cpp).
        layers = r.draft_profile.n_layer + 1 if draft.gpu_layers == "all" else draft.gpu_layers
        checkpoints = est.swa_cells or any(self.profile.recurrent_layers)
        return with_draft(est, estimate_memory(
            r.draft_profile, cache_type_k=draft.cache_type_k, cache_type_v=draft.cache_type_v,
            gpu_layers=layers if split else 0, gpu_overhead=0, host_overhead=0,
            overrides=r.draft_overrides,
            ctx_checkpoints=want.ctx_checkpoints if checkpoints else 0, **shared,
        ))

    def note_failure(self, fit: _Fit) -> None:
        """Remember the failed layout that is closest to fitting (prefer ones eviction helps)."""
        def badness(f: _Fit) -> tuple[bool, int]:
            return (not f.ok_when_idle, sum(s.missing for s in f.shortfalls))
        if self.best_failure is None or badness(fit) < badness(self.best_failure):
            self.best_failure = fit

    def layouts(self) -> list[_Layout]:
        """Candidate layouts in preference order (rule 1)."""
        wanted = self.want.gpu_layers
        cpu_only = [_Layout((), 0)] if (self.cpu_layers_ok or not self.gpus) and not \
            self.req.gpus_needed else []
        if wanted == 0 or not self.gpus:
            return cpu_only
        ngl = self.n_total if wanted in ("auto", "all") else min(int(wanted), self.n_total)
        if ngl < self.n_total and not self.cpu_layers_ok:
            raise ValueError(f"gpu_layers={wanted} leaves layers on the CPU, which is not pinned")
        order = sorted(self.gpus, key=self.free, reverse=self.req.placement == "spread")
        by_free = sorted(self.gpus, key=self.free, reverse=True)
        result = [_Layout((g,), ngl) for g in order]
        if self.want.split_mode != "none":
            result += [_Layout(tuple(by_free[:k]), ngl) for k in range(2, len(by_free) + 1)]
        if wanted == "auto" and self.cpu_layers_ok:
            result.append(_Layout(tuple(by_free[:1] if self.want.split_mode == "none"
                                        else by_free), -1))
            result += cpu_only
        need = self.req.gpus_needed
        split = self.want.tensor_split
        return [layout for layout in result if not layout.gpus or (
            len(layout.gpus) >= need and (split is None or len(layout.gpus) == len(split)))]

    def max_int(self, lo: int, hi: int, ok: Callable[[int], bool]) -> int | None:
        """Largest x in [lo, hi] with ok(x), assuming ok is monotone decreasing; None if none."""
        if hi < lo or not ok(lo):
            return None
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if ok(mid):
                lo = mid
            else:
                hi = mid - 1
        return lo

    def place(self, layout: _Layout) -> PlacementPlan | None:
        g = layout.gpus
        ngl = layout.ngl
        if ngl < 0:
            best = self.max_int(
                1, self.n_total - 1,
                lambda n: not self.fit(g, n, self.min_slots, self.min_ctx).shortfalls,
            )
            if best is None:
                self.note_failure(self.fit(g, 1, self.min_slots, self.min_ctx))
                return None
            ngl = best
        first = self.fit(g, ngl, self.min_slots, self.min_ctx)
        if first.shortfalls:
            self.note_failure(first)
            return None
        slots = self.min_slots
        if self.want.slots == "auto":
            top = self.max_int(
                1, self.want.max_slots, lambda s: not self.fit(g, ngl, s, self.min_ctx).shortfalls
            )
            slots = top or 1
        ctx = self.min_ctx
        if self.want.ctx_per_slot == "auto":
            steps = self.max_int(
                self.min_ctx // CTX_PAD, self.ctx_cap // CTX_PAD,
                lambda c: not self.fit(g, ngl, slots, c * CTX_PAD).shortfalls,
            )
            ctx = (steps or self.min_ctx // CTX_PAD) * CTX_PAD
        final = self.fit(g, ngl, slots, ctx)
        if 0 in final.split and len(g) > 1 and self.want.split_mode == "layer":
            # A GPU left without layers would still get a CUDA context: leave it out entirely.
            kept = [(d, n) for d, n in zip(g, final.split, strict=True) if n]
            g = tuple(d for d, _ in kept)
            final = self._check(g, ngl, slots, ctx, [float(n) for _, n in kept])
        return self.plan(g, final, slots, ctx)

    def plan(self, g: Sequence[Device], fit: _Fit, slots: int, ctx: int) -> PlacementPlan:
        # The child's flags are rendered from this by corral.llamacpp.command, the one place
        # that builds a command line.
        est = fit.estimate
        split = fit.split if len(g) > 1 else ()
        return PlacementPlan(slots, est.ctx_per_slot, est.gpu_layers, tuple(d.id for d in g),
                             split, est, self.req,
                             bool(est.swa_cells or self.profile.recurrent_layers),
                             tuple(g), self.profile.n_vocab)


def plan_placement(
    profile: ModelProfile,
    request: PlacementRequest,
    devices: Sequence[Device],
    ledger: Ledger | None = None,
) -> PlacementPlan:
    """Decide a child's capacity and placement against what ``ledger`` has free.

    ``devices`` are the candidates (usually ``ledger.devices``); without a ledger every device is
    assumed idle. Reserves nothing: pass ``plan.reservation`` to ``ledger.reserve`` before
    starting the child (it raises if someone else took the memory meanwhile). Raises ``NoFit``
    when nothing fits and ``ValueError`` for a request that contradicts its pinning.
    """
    if ledger is None:
        ledger = Ledger(devices)
    known = {d.id for d in devices}
    if CPU not in known:
        raise ValueError("devices must include the host ('cpu'): llama-server always uses it")
    unknown = sorted(set(request.devices or ()) - known)
    if unknown:
        raise ValueError(f"models.{request.name}.devices: pinned devices not found: "
                         f"{', '.join(unknown)} (this host has {', '.join(sorted(known))})")
    planner = _Planner(profile, request, devices, ledger)
    if request.gpus_needed > len(planner.gpus):
        raise ValueError(f"models.{request.name}: its tensor_overrides or tensor_split name "
                         f"GPUs by number and so needs {request.gpus_needed} GPUs, "
                         f"{len(planner.gpus)} allowed")
    for layout in planner.layouts():
        plan = planner.place(layout)
        if plan is not None:
            return plan
    failure = planner.best_failure
    if failure is None:
        raise ValueError("no candidate device for this request")
    raise NoFit(request.name, failure.shortfalls, failure.estimate.reservation(),
                impossible=not failure.ok_when_idle, permanent=not failure.ok_when_empty)

