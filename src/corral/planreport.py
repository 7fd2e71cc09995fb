"""``corral plan``: the placement decisions for a configuration, without starting anything.

Preloaded and pinned models are placed first, in config order (they must all fit: exit 1
otherwise), then the others, as long as they fit beside them. The decisions come from the same
functions the running supervisor uses (``plan_placement`` on a ``Ledger``), so ``corral plan``
and ``corral serve`` agree.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from corral.config import Config, ModelSpec
from corral.config.tuning import changed_tuning, tuning_of
from corral.errors import DownloadError
from corral.llamacpp.command import ChildCommand, child_command
from corral.placement import Ledger, NoFit, PlacementPlan, plan_placement
from corral.placement.devices import format_bytes
from corral.placement.requests import declared_devices, placement_request
from corral.probe.host import (
    child_socket,
    make_ledger,
    read_draft,
    read_model,
    resolve_binary,
    socket_dir,
    state_file_path,
)
from corral.sources.remote_header import readable_spec


@dataclass
class ModelPlan:
    spec: ModelSpec
    plan: PlacementPlan | None = None
    n_layers: int = 0
    resident: bool = False  # fits beside the models placed before it
    error: str | None = None
    command: ChildCommand | None = None  # exactly what `corral serve` would run

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.spec.name, "required": _required(self.spec),
                               "resident": self.resident, "error": self.error}
        if self.plan is not None:
            p = self.plan
            out.update({
                "devices": list(p.gpus) or ["cpu"], "gpu_layers": p.gpu_layers,
                "layers": self.n_layers, "slots": p.slots, "ctx_per_slot": p.ctx_per_slot,
                "tensor_split": list(p.tensor_split),
                "slot_limit": p.estimate.slot_limit, "tuning": tuning_of(self.spec.settings),
                "memory": {d.device: {"weights": d.weights, "kv_cache": d.kv_cache,
                                      "recurrent_state": d.recurrent_state, "output": d.output,
                                      "compute": d.compute, "overhead": d.overhead,
                                      "draft": d.draft, "total": d.total}
                           for d in p.estimate.devices if d.total},
            })
        if self.command is not None:
            out["command"] = list(self.command.argv)
            out["env"] = dict(self.command.env)
            out["socket"] = self.command.socket
        return out


@dataclass
class PlanReport:
    models: list[ModelPlan] = field(default_factory=list)
    ledger: Ledger | None = None

    @property
    def ok(self) -> bool:
        """Every preloaded and pinned model fits together."""
        return all(m.resident for m in self.models if _required(m.spec))

    def as_dict(self) -> dict[str, Any]:
        assert self.ledger is not None
        return {
            "ok": self.ok,
            "models": [m.as_dict() for m in self.models],
            "devices": [u.as_dict() for u in self.ledger.snapshot()],
            "resident_together": [m.spec.name for m in self.models if m.resident],
        }


def _required(spec: ModelSpec) -> bool:
    return spec.preload or spec.pinned


def build_report(config: Config, ledger: Ledger | None = None) -> PlanReport:
    """Place every model of ``config`` on ``ledger`` (the host's, by default).

    On discovered devices, what is in use now counts as other programs' use, as the running
    server counts it: so ``plan`` and ``serve`` decide alike on a shared GPU (run it where
    corral itself is not running, or its children count too).
    """
    if ledger is None:
        ledger = make_ledger(config)
        if declared_devices(config) is None:
            for device in ledger.devices:
                ledger.observe(device, 0)
    report = PlanReport(ledger=ledger)
    sockets = socket_dir(state_file_path(config))
    specs = sorted(config.models.values(), key=lambda s: not _required(s))
    with tempfile.TemporaryDirectory(prefix="corral-plan-") as headers:
        for spec in specs:
            _place(spec, config, ledger, report, sockets, Path(headers) / spec.name)
    return report


def _place(spec: ModelSpec, config: Config, ledger: Ledger, report: PlanReport,
           sockets: Path, headers: Path) -> None:
    """Plan one model into ``report``; a model not downloaded yet is planned from its GGUF
    headers, read from the hub with ranged requests into ``headers``."""
    entry = ModelPlan(spec)
    report.models.append(entry)
    try:
        profile, projector = read_model(readable_spec(spec, headers))
        draft = read_draft(spec)
    except DownloadError as exc:
        entry.error = f"cannot read the model's header from its source: {exc.reason}"
        return
    except (OSError, ValueError) as exc:
        entry.error = f"cannot read the model file: {exc}"
        return
    entry.n_layers = profile.n_layer + 1
    request = placement_request(spec, config, projector, draft)
    try:
        entry.plan = plan_placement(profile, request, ledger.devices, ledger)
        ledger.reserve(spec.name, entry.plan.reservation)
        entry.resident = True
        wanted = spec.binary or config.file.llama_server.binary
        entry.command = child_command(spec, entry.plan, resolve_binary(wanted) or wanted,
                                      str(child_socket(sockets, spec.name)))
    except NoFit as exc:
        entry.error = str(exc)
        try:  # what it would take on its own, for the table
            entry.plan = plan_placement(profile, request, ledger.devices,
                                        Ledger(ledger.devices, *_reserves(ledger)))
        except (NoFit, ValueError):
            pass
    except ValueError as exc:
        entry.error = str(exc)


def _shown(value: object) -> str:
    """A tuning value for people: a draft by its file and layers, lists comma-separated."""
    if isinstance(value, dict):
        return ", ".join(f"{k} {_shown(v)}" for k, v in value.items() if v not in ((), [], 0))
    if isinstance(value, list | tuple):
        return ",".join(map(str, value))
    return str(value).lower() if isinstance(value, bool) else str(value)


def _reserves(ledger: Ledger) -> tuple[int, int]:
    usage = {u.device.kind: u.reserve for u in ledger.snapshot()}
    return usage.get("gpu", 0), usage.get("cpu", 0)


def render(report: PlanReport) -> str:
    """The report as text for people."""
    assert report.ledger is not None
    lines = []
    for m in report.models:
        tag = " (preload)" if m.spec.preload else ""
        tag += " (pinned)" if m.spec.pinned else ""
        lines.append(f"{m.spec.name}{tag}")
        if m.plan is not None:
            p = m.plan
            lines.append(f"  devices {', '.join(p.gpus) or 'cpu'}; layers on GPU "
                         f"{p.gpu_layers}/{m.n_layers}; {p.slots} slots x {p.ctx_per_slot} "
                         "tokens" + (f"; tensor split {p.tensor_split}" if p.tensor_split else "")
                         + (f" (unified KV cache: one slot may hold up to "
                            f"{p.estimate.slot_limit})" if p.estimate.kv_unified else ""))
            tuned = changed_tuning(m.spec.settings)
            if tuned:
                lines.append("  tuning: " + "; ".join(f"{k} {_shown(v)}"
                                                      for k, v in tuned.items()))
            for d in p.estimate.devices:
                if d.total:
                    lines.append(
                        f"  {d.device:>7}: weights {format_bytes(d.weights)}, KV "
                        f"{format_bytes(d.kv_cache + d.recurrent_state)}, compute "
                        f"{format_bytes(d.compute + d.output)}, overhead "
                        f"{format_bytes(d.overhead)}"
                        + (f", draft model {format_bytes(d.draft)}" if d.draft else "")
                        + f", total {format_bytes(d.total)}")
        if m.command is not None:
            lines.append(f"  command: {m.command.shell()}")
        if m.error:
            lines.append(f"  does not fit beside the models above: {m.error}"
                         if m.plan is not None else f"  error: {m.error}")
    lines.append("")
    for u in report.ledger.snapshot():
        holders = ", ".join(f"{n} {format_bytes(b)}" for n, b in u.holders.items()) or "-"
        lines.append(f"{u.device.id}: reserved {format_bytes(u.held)} of "
                     f"{format_bytes(u.capacity)} (total {format_bytes(u.device.total)}, "
                     f"reserve {format_bytes(u.reserve)}"
                     + (f", other programs {format_bytes(u.external)}" if u.external else "")
                     + f"); {holders}")
    together = [m.spec.name for m in report.models if m.resident]
    lines.append(f"resident together: {', '.join(together) or 'none'}")
    if not report.ok:
        missing = [m.spec.name for m in report.models if _required(m.spec) and not m.resident]
        lines.append(f"PROBLEM: preloaded/pinned models do not all fit: {', '.join(missing)}")
    return "\n".join(lines)


def to_json(report: PlanReport) -> str:
    return json.dumps(report.as_dict(), indent=2)
