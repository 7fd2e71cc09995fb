"""Defaults the README documents, and how ``defaults`` and per-model values resolve."""

from __future__ import annotations

from typing import Any

import pytest

from corral.config import parse_config


def with_models(**file: Any) -> dict[str, Any]:
    models = {"plain": {"path": "a.gguf", "slots": 2},
              "own": {"path": "b.gguf", "slots": 2, "queue": {"max": 3, "timeout": "5s"}},
              "half": {"path": "c.gguf", "slots": 6, "queue": {"timeout": "2m"}}}
    return {"models": models, **file}


def test_queue_defaults_to_four_per_slot_and_a_minute() -> None:
    config = parse_config(with_models())
    plain, own, half = (config.models[n] for n in ("plain", "own", "half"))
    assert (plain.queue_max, plain.queue_timeout) == (None, 60.0)
    assert plain.queue_limit(2) == 8  # 4 x slots, counted from the slots it really runs
    assert plain.queue_limit(5) == 20
    assert (own.queue_max, own.queue_timeout) == (3, 5.0)
    assert own.queue_limit(2) == 3
    assert (half.queue_max, half.queue_timeout) == (None, 120.0)
    assert half.queue_limit(6) == 24


def test_defaults_queue_applies_to_every_model_without_its_own() -> None:
    config = parse_config(with_models(defaults={"queue": {"max": 10, "timeout": "30s"}}))
    plain, own, half = (config.models[n] for n in ("plain", "own", "half"))
    assert (plain.queue_max, plain.queue_timeout) == (10, 30.0)
    assert plain.queue_limit(2) == 10
    assert (own.queue_max, own.queue_timeout) == (3, 5.0)  # its own values win
    assert (half.queue_max, half.queue_timeout) == (10, 120.0)  # each key falls back alone


def test_a_queue_of_zero_is_kept_not_taken_for_unset() -> None:
    config = parse_config({"defaults": {"queue": {"max": 7}},
                           "models": {"m": {"path": "m.gguf", "queue": {"max": 0}}}})
    assert config.models["m"].queue_max == 0
    assert config.models["m"].queue_limit(4) == 0


def test_health_and_limits_defaults() -> None:
    file = parse_config(with_models()).file
    assert (file.health.interval, file.health.failures) == (5.0, 3)
    assert file.limits.max_body == 16 * 2**20
    assert (file.limits.header_timeout, file.limits.body_timeout) == (10.0, 30.0)


def test_health_and_limits_overrides() -> None:
    file = parse_config(with_models(health={"interval": "2s", "failures": 5},
                                limits={"max_body": "1MiB"})).file
    assert (file.health.interval, file.health.failures) == (2.0, 5)
    assert file.limits.max_body == 2**20


@pytest.mark.parametrize(("args", "multimodal"), [
    ([], False),
    (["--temp", "0.7"], False),
    (["--mmproj", "/models/mmproj.gguf"], True),
    (["-mm", "/models/mmproj.gguf"], True),
    (["--mmproj=/models/mmproj.gguf"], True),
])
def test_a_model_is_multimodal_when_its_args_give_a_projector(
    args: list[str], multimodal: bool
) -> None:
    config = parse_config({"models": {"m": {"path": "m.gguf", "args": args}}})
    assert config.models["m"].multimodal is multimodal
    assert config.models["m"].projector == ("/models/mmproj.gguf" if multimodal else None)


def test_each_setting_is_the_model_s_else_defaults_else_the_declared_default() -> None:
    config = parse_config({
        "defaults": {"ttl": "5m", "slots": "auto", "cache_type_k": "q8_0"},
        "models": {"own": {"path": "a.gguf", "ttl": 0, "slots": 3, "gpu_layers": 7},
                   "bare": {"path": "b.gguf"},
                   "nulls": {"path": "c.gguf", "ttl": None, "queue": {"timeout": None}}},
    })
    own, bare, nulls = (config.models[n] for n in ("own", "bare", "nulls"))
    assert (own.ttl, own.slots, own.gpu_layers, own.cache_type_k) == (0.0, 3, 7, "q8_0")
    assert (bare.ttl, bare.slots, bare.gpu_layers, bare.cache_type_k) == (300.0, "auto", "auto",
                                                                          "q8_0")
    assert (bare.ctx_per_slot, bare.max_slots, bare.cache_type_v) == (4096, 16, "f16")
    # A null per-model value takes the one in `defaults:`, as an absent key does.
    assert (nulls.ttl, nulls.slots, nulls.queue_timeout) == (300.0, "auto", 60.0)


def test_specs_compare_by_value_so_a_reload_sees_what_changed() -> None:
    def spec(**model: Any) -> Any:
        return parse_config({"models": {"m": {"path": "m.gguf", **model}}}).models["m"]

    assert spec(slots=2, queue={"max": 3}) == spec(slots=2, queue={"max": 3})
    assert spec(slots=2) != spec(slots=3)
    assert spec(queue={"max": 3}) != spec(queue={"max": 4})
    assert spec(slots=4) == spec()  # the declared default, given or not
