"""An idle model is stopped when that lets a load run wholly on one GPU instead of partly on
the CPU or split; never only for more slots or context.

Profiles of public model shapes (tests/placement/public_models.py) stand in for the files;
the devices are declared, as on a host whose GPUs corral is told about.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from corral.config import parse_config
from corral.placement.ledger import Ledger
from corral.probe import host
from corral.probe.host import make_ledger
from corral.supervisor.placing import Candidate, place
from tests.placement.public_models import llama31_8b, qwen25_32b

PROFILES = {"qwen": qwen25_32b, "llama": llama31_8b, "llama2": llama31_8b}


def config(gpu: str = "24GiB", **models: dict[str, Any]) -> Any:
    return parse_config({
        "models": {n: {"path": f"/models/{n}.gguf", **m} for n, m in models.items()},
        "devices": [{"id": "cuda:0", "memory": gpu}, {"id": "cpu", "memory": "64GiB"}],
        "reserve": {"gpu": 0, "ram": 0}})


@pytest.fixture(autouse=True)
def profiles(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(host, "read_profile", lambda path: PROFILES[Path(path).stem]())


class Host:
    def __init__(self, ledger: Ledger) -> None:
        self.ledger = ledger
        self.busy: set[str] = set()
        self.evicted: list[str] = []

    def candidates(self) -> list[Candidate]:
        return [Candidate(n, 1.0, busy=n in self.busy, pinned=False) for n in self.ledger.owners]

    async def evict(self, name: str) -> None:
        self.evicted.append(name)
        self.ledger.release(name)


async def test_an_idle_model_goes_so_that_a_load_runs_wholly_on_the_gpu() -> None:
    cfg = config(qwen={"slots": 1, "ctx_per_slot": 4096},
                 llama={"slots": 1, "ctx_per_slot": 4096})
    ledger = make_ledger(cfg)
    host = Host(ledger)
    qwen = await place(cfg.models["qwen"], cfg, ledger, host.candidates, host.evict, wait=0)
    assert qwen.gpus == ("cuda:0",) and qwen.gpu_layers == 65  # all of it, on the one GPU
    llama = await place(cfg.models["llama"], cfg, ledger, host.candidates, host.evict, wait=0)
    assert host.evicted == ["qwen"]
    assert llama.gpus == ("cuda:0",) and llama.gpu_layers == 33  # not 14 of 33 beside qwen


async def test_a_busy_model_stays_and_the_load_takes_what_is_left() -> None:
    cfg = config(qwen={"slots": 1, "ctx_per_slot": 4096},
                 llama={"slots": 1, "ctx_per_slot": 4096})
    ledger = make_ledger(cfg)
    host = Host(ledger)
    await place(cfg.models["qwen"], cfg, ledger, host.candidates, host.evict, wait=0)
    host.busy.add("qwen")
    llama = await place(cfg.models["llama"], cfg, ledger, host.candidates, host.evict, wait=0)
    assert host.evicted == []
    assert 0 < llama.gpu_layers < 33  # partly offloaded, beside the busy model


async def test_more_slots_are_no_reason_to_evict() -> None:
    cfg = config(llama={"slots": 2, "ctx_per_slot": 8192},
                 llama2={"slots": "auto", "max_slots": 64, "ctx_per_slot": 8192})
    ledger = make_ledger(cfg)
    host = Host(ledger)
    await place(cfg.models["llama"], cfg, ledger, host.candidates, host.evict, wait=0)
    second = await place(cfg.models["llama2"], cfg, ledger, host.candidates, host.evict,
                         wait=0)
    alone = await place(cfg.models["llama2"], cfg, make_ledger(cfg), host.candidates,
                        host.evict, wait=0)
    # Beside the idle model it runs whole on the GPU with fewer slots than it would have
    # alone; that is what it gets, rather than stopping the other model.
    assert host.evicted == []
    assert second.gpu_layers == 33 and second.gpus == ("cuda:0",)
    assert second.slots < alone.slots


async def test_only_as_many_go_as_the_whole_layout_needs_not_what_auto_slots_would_fill() -> None:
    small = {"slots": 1, "ctx_per_slot": 4096}
    cfg = config("30GiB", llama=small, llama2=small,
                 qwen={"slots": "auto", "max_slots": 16, "ctx_per_slot": 4096})
    ledger = make_ledger(cfg)
    host = Host(ledger)
    for name in ("llama", "llama2"):
        await place(cfg.models[name], cfg, ledger, host.candidates, host.evict, wait=0)
    qwen = await place(cfg.models["qwen"], cfg, ledger, host.candidates, host.evict, wait=0)
    # One 8B model's room is enough for the 32B one whole on the GPU; auto slots then take
    # what is left, and are no reason to stop the second.
    assert len(host.evicted) == 1
    assert qwen.gpu_layers == 65 and qwen.gpus == ("cuda:0",)


async def test_nobody_goes_for_a_few_more_layers_when_the_model_never_fits_whole() -> None:
    small = {"slots": 1, "ctx_per_slot": 4096}
    cfg = config("16GiB", llama=small, qwen=small)
    ledger = make_ledger(cfg)
    host = Host(ledger)
    await place(cfg.models["llama"], cfg, ledger, host.candidates, host.evict, wait=0)
    qwen = await place(cfg.models["qwen"], cfg, ledger, host.candidates, host.evict, wait=0)
    assert host.evicted == [] and 0 < qwen.gpu_layers < 65
