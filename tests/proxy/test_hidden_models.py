"""A key limited to some models cannot tell the others from names that do not exist."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from tests.conftest import CorralProcess

pytestmark = pytest.mark.integration

Start = Callable[..., CorralProcess]
TEAM = "team-secret-0123456789"
OPS = "ops-secret-9876543210"


def test_a_limited_key_gets_the_same_404_for_hidden_and_missing_models(
    corral: Start, smollm2: Path
) -> None:
    model = {"path": str(smollm2), "slots": 1, "ctx_per_slot": 256}
    server = corral({
        "models": {"open": {**model, "aliases": ["o"]},
                   "closed": {**model, "aliases": ["secret-alias"]}},
        "auth": {"keys": [
            {"name": "team", "key": TEAM, "models": ["open"]},
            {"name": "ops", "key": OPS, "scopes": ["inference", "admin"]},
        ]},
    })
    team = {"Authorization": f"Bearer {TEAM}"}

    def asked(name: str) -> list[httpx.Response]:
        return [
            server.http.post("/v1/completions", json={"model": name, "prompt": "Hi"},
                             headers=team),
            server.http.get(f"/v1/models/{name}", headers=team),
            server.http.get(f"/slots?model={name}", headers=team),
            server.http.get(f"/props?model={name}", headers=team),
        ]

    missing = asked("nope")
    for hidden in ("closed", "secret-alias"):
        for seen, unknown in zip(asked(hidden), missing, strict=True):
            assert seen.status_code == unknown.status_code == 404, seen.text
            error, expected = seen.json()["error"], unknown.json()["error"]
            assert error["message"].replace(hidden, "X") == expected["message"].replace(
                "nope", "X")
            assert error["code"] == expected["code"] == "model_not_found"
            assert error["message"].endswith("available models: open, o")
            assert "closed" not in seen.text.replace(hidden, "")
    # A key for every model still sees them all.
    everything = server.http.get("/v1/models/secret-alias", headers={"X-Api-Key": OPS})
    assert everything.status_code == 200 and everything.json()["corral"]["alias_of"] == "closed"
