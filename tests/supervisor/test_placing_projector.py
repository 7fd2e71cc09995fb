"""A multimodal projector (``--mmproj``) is read and reserved with its model."""

from __future__ import annotations

from pathlib import Path

import pytest

from corral.config import parse_config
from corral.errors import ModelLoadError
from corral.planreport import build_report
from corral.probe.host import make_ledger
from corral.supervisor.placing import Candidate, place
from tests.probe.test_gguf import F32, write

MiB = 1 << 20


def nobody() -> list[Candidate]:
    return []


async def no_eviction(name: str) -> None:
    raise AssertionError(name)


async def test_the_projectors_tensors_are_reserved_with_the_model(
    smollm2_header: Path, tmp_path: Path
) -> None:
    # A stand-in projector: 8 MiB of f32 tensors in a GGUF (the real ones are CLIP models).
    projector = write(tmp_path / "mmproj.gguf", "clip", {"clip.has_vision_encoder": True},
                      [(f"v.blk.{i}.w", (1024, 512), F32) for i in range(4)])
    size = 4 * 1024 * 512 * 4
    model = {"path": str(smollm2_header), "slots": 1, "ctx_per_slot": 512}
    cfg = parse_config({
        "models": {"text": model, "vision": {**model, "args": ["--mmproj", str(projector)]}},
        "devices": [{"id": "cpu", "memory": "8GiB"}]})
    ledger = make_ledger(cfg)
    text = await place(cfg.models["text"], cfg, ledger, nobody, no_eviction, wait=0)
    vision = await place(cfg.models["vision"], cfg, ledger, nobody, no_eviction, wait=0)
    assert vision.reservation["cpu"] - text.reservation["cpu"] == size
    # corral plan asks the same question.
    report = build_report(cfg)
    planned = {m.spec.name: m.plan for m in report.models}
    assert planned["vision"] is not None and planned["vision"].reservation == vision.reservation


async def test_a_projector_that_cannot_be_read_fails_the_load_with_its_reason(
    smollm2_header: Path, tmp_path: Path
) -> None:
    cfg = parse_config({
        "models": {"vision": {"path": str(smollm2_header), "slots": 1, "ctx_per_slot": 512,
                              "args": ["-mm", str(tmp_path / "missing.gguf")]}},
        "devices": [{"id": "cpu", "memory": "8GiB"}]})
    with pytest.raises(ModelLoadError, match=r"cannot read the model file: .*missing\.gguf"):
        await place(cfg.models["vision"], cfg, make_ledger(cfg), nobody, no_eviction, wait=0)
