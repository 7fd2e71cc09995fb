"""corral as an InferencePool member: its /metrics against the stock picker's engine
configuration, and the /admin/status fields corral's own picker reads, with the real
llama-server.

The host budget is declared so that one SmolLM2 child fits and two do not: what would fit, and
what a load would evict, is then known.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

from corral import __version__
from corral.config import parse_config
from corral.planreport import build_report
from tests.conftest import ENDLESS, CorralProcess, holding_a_slot

pytestmark = pytest.mark.integration

Start = Callable[..., CorralProcess]
ENGINE_CONFIG = (Path(__file__).parents[2] / "examples" / "inference-pool"
                 / "epp-engine-corral.yaml")
# The protocol's metric flags, and the labels the picker reads from each (none: the value).
PROTOCOL = {
    "total-queued-requests-metric": set(),
    "total-running-requests-metric": set(),
    "kv-cache-usage-percentage-metric": set(),
    "lora-info-metric": {"running_lora_adapters", "waiting_lora_adapters", "max_lora"},
}
SPEC = re.compile(r"^(?P<name>[a-zA-Z_][a-zA-Z0-9_:]*)(\{(?P<labels>[^}]*)\})?$")


def engine_flags() -> dict[str, str]:
    flags: dict[str, str] = yaml.safe_load(ENGINE_CONFIG.read_text())["inferenceExtension"][
        "flags"]
    return flags


def model(smollm2: Path) -> dict[str, Any]:
    return {"path": str(smollm2), "slots": 2, "ctx_per_slot": 512, "args": ENDLESS}


def one_fits(smollm2: Path) -> dict[str, Any]:
    """Models a and b, and a host budget that holds one of them but not both."""
    models = {"a": model(smollm2), "b": model(smollm2)}
    probe = parse_config({"devices": [{"id": "cpu", "memory": "64GiB"}],
                          "reserve": {"ram": 0}, "models": models})
    plan = build_report(probe).models[0].plan
    assert plan is not None
    budget = int(plan.reservation["cpu"] * 1.5)
    return {"devices": [{"id": "cpu", "memory": budget}], "reserve": {"ram": 0},
            "models": models}


def families(server: CorralProcess) -> dict[str, Metric]:
    response = server.http.get("/metrics")
    assert response.status_code == 200
    return {f.name: f for f in text_string_to_metric_families(response.text)}


def protocol_values(server: CorralProcess) -> dict[str, Any]:
    """Each protocol metric named by the engine configuration, checked for type and labels:
    the value, or for the LoRA info metric its labels."""
    found = families(server)
    values: dict[str, Any] = {}
    for flag, labels in PROTOCOL.items():
        spec = SPEC.match(engine_flags()[flag])
        assert spec is not None, f"{flag}: {engine_flags()[flag]!r} is not a metric spec"
        family = found.get(spec["name"])
        assert family is not None, f"{flag}: corral has no metric {spec['name']}"
        assert family.type == "gauge", f"{flag}: {spec['name']} is a {family.type}"
        assert len(family.samples) == 1, f"{flag}: one series expected, {family.samples}"
        sample = family.samples[0]
        assert set(sample.labels) == labels, f"{flag}: labels {sample.labels}"
        values[flag] = sample.labels if labels else sample.value
    return values


def status_of(server: CorralProcess) -> dict[str, Any]:
    response = server.http.get("/admin/status")
    assert response.status_code == 200
    body: dict[str, Any] = response.json()
    return body


def by_name(status: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {m["name"]: m for m in status["models"]}


def test_the_engine_configuration_names_only_what_corral_exports() -> None:
    flags = engine_flags()
    assert set(PROTOCOL) <= set(flags)
    # vLLM's paged-cache info has no llama.cpp equivalent: turned off, not pointed elsewhere.
    assert flags["cache-info-metric"] == ""


def test_pool_metrics_and_status_follow_loads_and_traffic(corral: Start, smollm2: Path) -> None:
    server = corral(one_fits(smollm2))

    # Nothing loaded: either model would load now; nothing runs or waits.
    status = status_of(server)
    assert status["node"] == {"version": __version__,
                              "listen": [f"127.0.0.1:{server.port}"]}
    assert status["totals"]["slots_free"] == 0
    for name in ("a", "b"):
        entry = by_name(status)[name]
        assert entry["fit"] == {"now": True, "after_evicting_idle": True, "evict": []}
        assert entry["slots_free"] == 0
    values = protocol_values(server)
    assert values["total-queued-requests-metric"] == 0.0
    assert values["total-running-requests-metric"] == 0.0
    assert values["kv-cache-usage-percentage-metric"] == 0.0
    assert values["lora-info-metric"] == {"running_lora_adapters": "",
                                          "waiting_lora_adapters": "", "max_lora": "2"}

    # a loaded and idle: b would fit only by evicting a.
    assert server.http.post("/admin/models/a/load").status_code == 200
    status = status_of(server)
    a, b = by_name(status)["a"], by_name(status)["b"]
    assert a["state"] == "ready" and a["fit"] is None and a["slots_free"] == 2
    assert b["fit"] == {"now": False, "after_evicting_idle": True, "evict": ["a"]}
    assert status["totals"]["slots_free"] == 2
    values = protocol_values(server)
    assert values["lora-info-metric"] == {"running_lora_adapters": "a",
                                          "waiting_lora_adapters": "", "max_lora": "1"}
    assert values["kv-cache-usage-percentage-metric"] == 0.0

    # One of a's slots generating: a is busy, so b has no room; the pod runs one request and
    # uses part of its KV cache.
    with holding_a_slot(server, "a"):
        status = status_of(server)
        assert by_name(status)["a"]["slots_free"] == 1
        assert status["totals"]["slots_free"] == 1
        assert by_name(status)["b"]["fit"] == {"now": False, "after_evicting_idle": False,
                                               "evict": []}
        seen: list[dict[str, Any]] = []

        def kv_in_use() -> bool:
            # A scrape reads the child's /slots with a 1 s timeout; on a busy machine it may
            # miss one: read again until it answered.
            seen.append(protocol_values(server))
            return float(seen[-1]["kv-cache-usage-percentage-metric"]) > 0.0

        server.wait_for(kv_in_use)
        assert seen[-1]["total-running-requests-metric"] == 1.0
        assert seen[-1]["total-queued-requests-metric"] == 0.0
        # At most the slot's share: one of two slots of 512 tokens.
        assert 0.0 < seen[-1]["kv-cache-usage-percentage-metric"] <= 0.5
