"""Pod views read from a real corral's ``/admin/status`` (and from the contract's shape)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from corral.picker.decide import decide
from corral.picker.view import StatusReader, parse_status
from tests.conftest import CorralProcess
from tests.picker.status_pods import model, status

Start = Callable[..., CorralProcess]
ADMIN_KEY = "picker-admin-secret-0123456789"
APP_KEY = "picker-app-secret-9876543210"


def config(path: Path) -> dict[str, object]:
    return {
        "models": {"smol": {"path": str(path), "slots": 2, "ctx_per_slot": 256,
                            "aliases": ["tiny"]}},
        "auth": {"keys": [{"name": "picker", "key": ADMIN_KEY, "scopes": ["admin"]},
                          {"name": "app", "key": APP_KEY}]},
    }


async def test_a_real_corral_read_with_the_admin_key(corral: Start, smollm2_header: Path) -> None:
    # No model is loaded: this runs corral itself, not llama-server.
    server = corral(config(smollm2_header))
    endpoint = f"127.0.0.1:{server.port}"
    reader = StatusReader(ADMIN_KEY, timeout=10.0)
    try:
        view = await reader.read(endpoint)
        assert view.up and view.error is None and not view.draining
        smol = view.find("tiny:latest")
        assert smol is not None and smol.name == "smol" and smol.aliases == ("tiny",)
        assert smol.state == "unloaded" and smol.slots_free == 0 and smol.queue_limit > 0
        assert view.find("other") is None
        # A key without the admin scope: the pod is down for the picker, saying why.
        app_reader = StatusReader(APP_KEY)
        refused = await app_reader.read(endpoint)
        await app_reader.aclose()
        assert (refused.up, refused.error) == (False, "/admin/status answered 403")
    finally:
        await reader.aclose()


async def test_a_pod_that_is_not_there_is_down_within_the_timeout() -> None:
    reader = StatusReader(None, timeout=1.0)
    try:
        view = await reader.read("127.0.0.1:9")
        assert not view.up and view.error and "ConnectError" in view.error
    finally:
        await reader.aclose()


@pytest.mark.integration
async def test_a_loaded_model_on_a_real_corral_is_picked(corral: Start, smollm2: Path) -> None:
    server = corral(config(smollm2))
    assert server.http.post("/admin/models/smol/load",
                            headers={"Authorization": f"Bearer {ADMIN_KEY}"}).status_code == 200
    endpoint = f"127.0.0.1:{server.port}"
    reader = StatusReader(ADMIN_KEY, timeout=10.0)
    try:
        view = await reader.read(endpoint)
        smol = view.find("smol")
        assert smol is not None and smol.serving and (smol.slots, smol.slots_free) == (2, 2)
        decision = decide("tiny", [view])
        assert (decision.endpoints, decision.reason) == ((endpoint,), "loaded_free")
    finally:
        await reader.aclose()


def test_the_contract_fields_are_read() -> None:
    body = status(model("smol", free=1, queue=0), model(
        "big", "unloaded", fit={"now": False, "after_evicting_idle": True, "evict": ["smol"]}),
        listen="10.0.0.5:8080")
    view = parse_status("10.0.0.5:8080", body, 12.0)
    smol, big = view.models
    assert (smol.slots, smol.slots_free, smol.fit) == (2, 1, None)
    assert big.fit is not None and big.fit.evict == ("smol",) and not big.fit.now
    assert view.node == {"version": "0.0.0", "listen": ["10.0.0.5:8080"]}
    assert view.fetched_at == 12.0 and view.load() == 1


def test_a_corral_without_fit_ranks_its_unloaded_models_last_not_never() -> None:
    body = status(model("smol", "unloaded"))
    del body["models"][0]["fit"], body["models"][0]["slots_free"], body["node"]
    view = parse_status("10.0.0.5:8080", body, 1.0)
    decision = decide("smol", [view])
    assert (decision.endpoints, decision.reason) == (("10.0.0.5:8080",), "fits_after_evicting")
