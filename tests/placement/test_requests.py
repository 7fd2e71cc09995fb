"""The placement question is the model's resolved settings, asked as the config resolves them."""

from __future__ import annotations

import dataclasses

from corral.config import parse_config
from corral.config.schema import ModelSettings
from corral.llamacpp.command import placement_flags
from corral.placement.decide import PlacementRequest, plan_placement
from corral.placement.devices import gpu, host
from corral.placement.requests import placement_request
from tests.placement.public_models import GiB, llama31_8b


def test_a_model_is_placed_with_the_settings_it_resolves_to() -> None:
    config = parse_config({
        "defaults": {"cache_type_k": "q8_0", "slots": "auto", "max_slots": 3},
        "placement": "spread",
        "models": {"m": {"path": "m.gguf", "ctx_per_slot": 8192, "cache_type_v": "q4_0",
                         "devices": ["cuda:1"]}},
    })
    spec = config.models["m"]
    request = placement_request(spec, config, projector_bytes=5 * 2**20)
    assert request.settings == spec.settings
    assert (request.placement, request.devices, request.name) == ("spread", ("cuda:1",), "m")
    devices = [gpu(0, 80 * GiB), gpu(1, 80 * GiB), host(64 * GiB)]
    plan = plan_placement(llama31_8b(), request, devices)
    flags = placement_flags(plan)
    args = dict(zip(flags[::2], flags[1::2], strict=True))
    assert (args["-np"], args["-c"]) == ("3", str(3 * 8192))  # auto slots, up to max_slots
    assert (args["--cache-type-k"], args["--cache-type-v"]) == ("q8_0", "q4_0")
    assert plan.gpus == ("cuda:1",)
    without = plan_placement(llama31_8b(), placement_request(spec, config), devices)
    assert plan.reservation["cuda:1"] == without.reservation["cuda:1"] + 5 * 2**20


def test_a_request_restates_no_model_setting() -> None:
    # Each per-model setting is declared once, in ModelSettings; the request carries them.
    restated = {f.name for f in dataclasses.fields(PlacementRequest)} & set(
        ModelSettings.model_fields)
    assert restated == set()
