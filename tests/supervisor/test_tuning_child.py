"""Tuning flags given in ``args`` reach the real llama-server as settings corral planned: the
child runs them once, ``/admin/models`` shows them, and what the child reports allocating
matches the plan, draft model included."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from corral.config import parse_config
from corral.planreport import build_report
from tests.conftest import CorralProcess

pytestmark = pytest.mark.integration

Start = Callable[..., CorralProcess]
MiB = 2**20


def test_tuning_flags_in_args_reach_the_child_and_the_plan(
    corral: Start, smollm2: Path
) -> None:
    config = {"models": {"m": {
        "path": str(smollm2), "slots": 2, "ctx_per_slot": 512,
        # llama-server spellings, as a team would paste them: SmolLM2 drafts for itself.
        "args": ["-ub", "128", "--model-draft", str(smollm2), "-kvu", "--flash-attn=off",
                 "--temp", "0.5"],
    }}}
    planned = build_report(parse_config(config)).models[0].as_dict()
    server = corral(config)
    assert server.http.post("/admin/models/m/load").status_code == 200
    shown = server.model("m")
    assert {k: shown["tuning"][k] for k in ("ubatch_size", "kv_unified", "flash_attn")} == {
        "ubatch_size": 128, "kv_unified": True, "flash_attn": "off"}
    assert shown["tuning"]["draft"]["path"] == str(smollm2)
    argv = server.children()[0].cmdline()
    for flag, value in (("-ub", "128"), ("--model-draft", str(smollm2)),
                        ("--flash-attn", "off")):
        assert argv.count(flag) == 1 and argv[argv.index(flag) + 1] == value, flag
    assert argv.count("--kv-unified") == 1 and argv[-2:] == ["--temp", "0.5"]
    assert "-kvu" not in argv and "--flash-attn=off" not in argv
    # A unified cache: each slot may fill all of it.
    slots = server.http.get("/slots", params={"model": "m"}).json()
    assert [s["n_ctx"] for s in slots] == [1024, 1024] and shown["ctx_per_slot"] == 1024
    # The draft's weights, cache and compute buffer are planned, and match the child's report.
    cpu = planned["memory"]["cpu"]
    assert cpu["draft"] > 92 * MiB  # SmolLM2's weights alone are 92 MiB
    actual = shown["memory"]["actual"]["cpu"]
    assert abs(actual - (cpu["total"] - cpu["overhead"])) <= 0.02 * actual
