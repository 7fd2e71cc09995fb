"""corral as an InferencePool member: its /metrics against both forms of the stock
picker's engine configuration (metric flags, EndpointPickerConfig), and the /admin/status
fields corral's own picker reads, with the real llama-server.

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
EXAMPLES = Path(__file__).parents[2] / "examples" / "inference-pool"
# Older pickers: Helm values with the metric flags. Newer ones: an EndpointPickerConfig.
ENGINE_FLAGS = EXAMPLES / "epp-engine-corral.yaml"
ENGINE_CONFIG = EXAMPLES / "epp-config-corral.yaml"
# Each protocol reading: its flag, its engineConfigs key, and the labels the picker reads
# from its series (none: the value).
PROTOCOL = {
    "queued": ("total-queued-requests-metric", "queuedRequestsSpec", set()),
    "running": ("total-running-requests-metric", "runningRequestsSpec", set()),
    "kv": ("kv-cache-usage-percentage-metric", "kvUsageSpec", set()),
    "lora": ("lora-info-metric", "loraSpec",
             {"running_lora_adapters", "waiting_lora_adapters", "max_lora"}),
}
# The pickers' metric spec: a name and an optional selector, `name{label=value,...}`.
SPEC = re.compile(r"^(?P<name>[a-zA-Z_][a-zA-Z0-9_:]*)(\{(?P<labels>[^}]*)\})?$")
SELECTOR = re.compile(r'^\s*(?P<label>[a-zA-Z_][a-zA-Z0-9_]*)\s*=\s*"?(?P<value>[^",]*)"?\s*$')


def parse_spec(spec: str) -> tuple[str, dict[str, str]]:
    """A metric spec's name and its label selector (empty without one)."""
    match = SPEC.match(spec)
    assert match is not None, f"{spec!r} is not a metric spec"
    selector: dict[str, str] = {}
    for part in (match["labels"] or "").split(","):
        if not part.strip():
            continue
        pair = SELECTOR.match(part)
        assert pair is not None, f"{spec!r}: {part!r} is not label=value"
        selector[pair["label"]] = pair["value"]
    return match["name"], selector


def engine_flags() -> dict[str, str]:
    flags: dict[str, str] = yaml.safe_load(ENGINE_FLAGS.read_text())["inferenceExtension"][
        "flags"]
    return flags


def engine_config() -> dict[str, Any]:
    """The corral entry of the EndpointPickerConfig's metrics extractor."""
    document = yaml.safe_load(ENGINE_CONFIG.read_text())
    (plugin,) = [p for p in document["plugins"] if p["type"] == "core-metrics-extractor"]
    parameters: dict[str, Any] = plugin["parameters"]
    (entry,) = [e for e in parameters["engineConfigs"]
                if e["name"] == parameters["defaultEngine"]]
    return entry


def specs_of_both_files() -> dict[str, dict[str, str]]:
    """For each file, the spec it gives each protocol reading."""
    flags, entry = engine_flags(), engine_config()
    return {ENGINE_FLAGS.name: {r: flags[flag] for r, (flag, _, _) in PROTOCOL.items()},
            ENGINE_CONFIG.name: {r: entry[key] for r, (_, key, _) in PROTOCOL.items()}}


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
    """Each protocol reading as the picker would take it from corral's /metrics, by the specs
    of both engine configuration files (which must agree), checked for type and labels: the
    value, or for the LoRA info metric its labels."""
    found = families(server)
    by_file: dict[str, dict[str, Any]] = {}
    for file, specs in specs_of_both_files().items():
        values: dict[str, Any] = {}
        for reading, (_, _, labels) in PROTOCOL.items():
            where = f"{file} {reading} {specs[reading]!r}"
            name, selector = parse_spec(specs[reading])
            family = found.get(name)
            assert family is not None, f"{where}: corral has no metric {name}"
            assert family.type == "gauge", f"{where}: {name} is a {family.type}"
            samples = [s for s in family.samples
                       if all(s.labels.get(k) == v for k, v in selector.items())]
            assert len(samples) == 1, f"{where}: one series expected, {family.samples}"
            sample = samples[0]
            assert set(sample.labels) - set(selector) == labels, f"{where}: {sample.labels}"
            values[reading] = sample.labels if labels else sample.value
        by_file[file] = values
    first, second = by_file.values()
    assert first == second, by_file
    return first


def status_of(server: CorralProcess) -> dict[str, Any]:
    response = server.http.get("/admin/status")
    assert response.status_code == 200
    body: dict[str, Any] = response.json()
    return body


def by_name(status: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {m["name"]: m for m in status["models"]}


def test_the_metric_spec_parser_reads_names_and_selectors() -> None:
    assert parse_spec("corral_pool_waiting_requests") == ("corral_pool_waiting_requests", {})
    assert parse_spec('m:x{kind=waiting, b="c"}') == ("m:x", {"kind": "waiting", "b": "c"})
    with pytest.raises(AssertionError):
        parse_spec("m{kind}")
    with pytest.raises(AssertionError):
        parse_spec("not a name")


def test_both_engine_configurations_name_only_what_corral_exports() -> None:
    flags = engine_flags()
    assert {flag for flag, _, _ in PROTOCOL.values()} <= set(flags)
    # vLLM's paged-cache info has no llama.cpp equivalent: turned off, not pointed elsewhere.
    assert flags["cache-info-metric"] == ""

    document = yaml.safe_load(ENGINE_CONFIG.read_text())
    assert document["apiVersion"] == "llm-d.ai/v1"
    assert document["kind"] == "EndpointPickerConfig"
    entry = engine_config()
    assert entry["name"] == "corral"
    # An entry replaces the picker's built-in one whole: every spec is written out.
    assert {key for _, key, _ in PROTOCOL.values()} | {"cacheInfoSpec"} <= set(entry)
    assert entry["cacheInfoSpec"] == ""
    # The two forms are the same configuration.
    first, second = specs_of_both_files().values()
    assert first == second


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
    assert values["queued"] == 0.0
    assert values["running"] == 0.0
    assert values["kv"] == 0.0
    assert values["lora"] == {"running_lora_adapters": "",
                                          "waiting_lora_adapters": "", "max_lora": "2"}

    # a loaded and idle: b would fit only by evicting a.
    assert server.http.post("/admin/models/a/load").status_code == 200
    status = status_of(server)
    a, b = by_name(status)["a"], by_name(status)["b"]
    assert a["state"] == "ready" and a["fit"] is None and a["slots_free"] == 2
    assert b["fit"] == {"now": False, "after_evicting_idle": True, "evict": ["a"]}
    assert status["totals"]["slots_free"] == 2
    values = protocol_values(server)
    assert values["lora"] == {"running_lora_adapters": "a",
                                          "waiting_lora_adapters": "", "max_lora": "1"}
    assert values["kv"] == 0.0

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
            return float(seen[-1]["kv"]) > 0.0

        server.wait_for(kv_in_use)
        assert seen[-1]["running"] == 1.0
        assert seen[-1]["queued"] == 0.0
        # At most the slot's share: one of two slots of 512 tokens.
        assert 0.0 < seen[-1]["kv"] <= 0.5
