"""``would_fit``: what a load would do now, on devices declared in the config.

The model is SmolLM2's header (planned exactly as the real file, with no weights); the host
budget is declared so that one child of 1 slot x 512 fits and two do not. Other models' memory
is what the ledger holds for them, as after their loads.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from corral.config import Config, parse_config
from corral.placement.decide import plan_placement
from corral.placement.fitness import NO_ROOM, FitAnswer, would_fit
from corral.placement.ledger import EvictionCandidate, Ledger
from corral.placement.requests import declared_devices, placement_request
from corral.probe.gguf import read_profile
from tests.placement.public_models import GiB, llama31_8b


def config(header: Path, budget: int | str) -> Config:
    model = {"path": str(header), "slots": 1, "ctx_per_slot": 512}
    return parse_config({"devices": [{"id": "cpu", "memory": budget}], "reserve": {"ram": 0},
                         "models": {"a": model, "b": model, "c": model}})


def need(header: Path) -> int:
    """What one such child reserves on the host."""
    probe = config(header, "64GiB")
    devices = declared_devices(probe)
    assert devices is not None
    plan = plan_placement(read_profile(header), placement_request(probe.models["c"], probe),
                          devices, Ledger(devices))
    return plan.reservation["cpu"]


def ask_c(header: Path, budget: int, held: dict[str, Any],
          candidates: list[EvictionCandidate]) -> FitAnswer:
    cfg = config(header, budget)
    devices = declared_devices(cfg)
    assert devices is not None
    ledger = Ledger(devices)
    for owner, amount in held.items():
        ledger.reserve(owner, {"cpu": amount})
    return would_fit(read_profile(header), placement_request(cfg.models["c"], cfg), ledger,
                     candidates)


def test_fits_now_in_free_memory(smollm2_header: Path) -> None:
    one = need(smollm2_header)
    answer = ask_c(smollm2_header, int(one * 1.5), {}, [])
    assert answer == FitAnswer(now=True, after_evicting_idle=True, evict=())
    assert answer.as_dict() == {"now": True, "after_evicting_idle": True, "evict": []}


def test_fits_after_evicting_the_least_recently_used_idle_model(smollm2_header: Path) -> None:
    one = need(smollm2_header)
    # Room for two: a and b hold it all; a was used longest ago.
    answer = ask_c(smollm2_header, int(one * 2.5), {"a": one, "b": one},
                   [EvictionCandidate("a", last_used=10.0), EvictionCandidate("b", 20.0)])
    assert answer.as_dict() == {"now": False, "after_evicting_idle": True, "evict": ["a"]}


@pytest.mark.parametrize("blocker", [{"busy": True}, {"pinned": True}])
def test_no_room_when_only_busy_or_pinned_models_hold_memory(
    smollm2_header: Path, blocker: dict[str, bool]
) -> None:
    one = need(smollm2_header)
    answer = ask_c(smollm2_header, int(one * 1.5), {"a": one},
                   [EvictionCandidate("a", last_used=0.0, **blocker)])
    assert answer == NO_ROOM
    assert answer.as_dict() == {"now": False, "after_evicting_idle": False, "evict": []}


def test_no_room_when_it_never_fits_here(smollm2_header: Path) -> None:
    one = need(smollm2_header)
    # Smaller than the model itself: evicting everything would not help.
    answer = ask_c(smollm2_header, one // 2, {}, [])
    assert answer == NO_ROOM


def test_a_load_that_would_stop_idle_models_to_run_wholly_on_the_gpu_does_not_fit_now() -> None:
    # gpu_layers auto: Llama-3.1-8B fits beside an idle model with layers on the CPU, but a load
    # stops the idle model first to run it whole on the GPU; a busy one it leaves alone.
    cfg = parse_config({"devices": [{"id": "cuda:0", "memory": "24GiB"},
                                    {"id": "cpu", "memory": "64GiB"}],
                        "reserve": {"ram": 0, "gpu": 0},
                        "models": {"big": {"path": "/nonexistent.gguf"}}})
    devices = declared_devices(cfg)
    assert devices is not None
    ledger = Ledger(devices)
    ledger.reserve("other", {"cuda:0": 20 * GiB})
    request = placement_request(cfg.models["big"], cfg)
    idle = would_fit(llama31_8b(), request, ledger, [EvictionCandidate("other", 0.0)])
    assert idle.as_dict() == {"now": False, "after_evicting_idle": True, "evict": ["other"]}
    busy = would_fit(llama31_8b(), request, ledger,
                     [EvictionCandidate("other", 0.0, busy=True)])
    assert busy == FitAnswer(now=True, after_evicting_idle=True)
