"""``corral plan`` on models not downloaded yet: the GGUF headers come from the hub with ranged
requests, and the plan is the one the downloaded file would give."""

from __future__ import annotations

from pathlib import Path

import huggingface_hub.constants as hf_constants
import pytest

from corral.config import parse_config
from corral.planreport import build_report, render
from tests.sources.conftest import SMOL_FILE, SMOL_REPO, TINY_REPO
from tests.sources.local_hub import LocalHub

DEVICES = [{"id": "cuda:0", "memory": "8GiB"}, {"id": "cpu", "memory": "16GiB"}]


def test_plan_reads_only_the_header_of_a_model_not_downloaded(hub: LocalHub,
                                                               smollm2: Path) -> None:
    remote = build_report(parse_config({"devices": DEVICES, "models": {
        "smol": {"hf": f"{SMOL_REPO}:Q4_1", "slots": 2}}}))
    local = build_report(parse_config({"devices": DEVICES, "models": {
        "smol": {"path": str(smollm2), "slots": 2}}}))
    [entry], [expected] = remote.models, local.models
    assert entry.error is None and entry.resident
    assert entry.plan == expected.plan
    [get] = hub.downloads(SMOL_FILE)
    assert get.range == "bytes=0-8388607"  # 8 MiB of a 94 MiB file
    assert not (Path(hf_constants.HF_HUB_CACHE) / "models--corral-test--SmolLM2-135M-Instruct-GGUF"
                / "blobs").exists()  # nothing downloaded
    assert f"<{SMOL_REPO}:Q4_1, once downloaded>" in render(remote)


def test_plan_of_a_split_model_with_a_projector(hub: LocalHub) -> None:
    report = build_report(parse_config({"devices": DEVICES, "models": {
        "tiny": {"hf": f"{TINY_REPO}:Q8_0"}}}))
    [entry] = report.models
    assert entry.error is None and entry.resident and entry.n_layers == 5


def test_plan_names_a_source_it_cannot_read(hub: LocalHub,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    report = build_report(parse_config({"devices": DEVICES, "models": {
        "gone": {"hf": "corral-test/Nothing-GGUF:Q4_K_M"}}}))
    assert report.models[0].error is not None
    assert "repository corral-test/Nothing-GGUF not found" in report.models[0].error
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    report = build_report(parse_config({"devices": DEVICES, "models": {
        "smol": {"hf": f"{SMOL_REPO}:Q4_1"}}}))
    assert report.models[0].error == ("cannot read the model's header from its source: "
                                      f"{SMOL_REPO}:Q4_1: HF_HUB_OFFLINE is set and it is not in "
                                      "the cache")
