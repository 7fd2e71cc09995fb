"""From the configuration to placement's inputs: one place, so ``corral plan`` and the running
supervisor ask exactly the same question."""

from __future__ import annotations

from corral.config import Config, ModelSpec
from corral.placement.decide import PlacementRequest
from corral.placement.devices import Device, gpu, host
from corral.placement.profile import ModelProfile


def placement_request(
    spec: ModelSpec, config: Config, projector_bytes: int = 0,
    draft: ModelProfile | None = None,
) -> PlacementRequest:
    """The placement question for one model (``projector_bytes``: its ``--mmproj`` file's
    tensors; ``draft``: its draft model's profile; both read by the caller)."""
    return PlacementRequest(
        settings=spec.settings,
        placement=config.file.placement,
        devices=spec.devices,
        projector_bytes=projector_bytes,
        draft_profile=draft,
        name=spec.name,
    )


def declared_devices(config: Config) -> list[Device] | None:
    """The devices the config declares (they replace discovery), or None."""
    if config.file.devices is None:
        return None
    found = []
    for declared in config.file.devices:
        if declared.id == "cpu":
            found.append(host(int(declared.memory)))
        else:
            found.append(gpu(int(declared.id.split(":", 1)[1]), int(declared.memory)))
    return found
