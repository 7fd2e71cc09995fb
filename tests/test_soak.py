"""A short run of bench/soak.py, as CI's smoke test of corral under concurrent load."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.integration


@pytest.mark.parametrize(("upstream", "clients"), [("fake", 16), ("real", 4)])
def test_short_soak_has_no_errors(upstream: str, clients: int, tmp_path: Path) -> None:
    out = tmp_path / "soak.json"
    result = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "soak.py"), "--seconds", "10", "--clients",
         str(clients), "--upstream", upstream, "--tokens", "16", "--json", str(out)],
        capture_output=True, text=True, timeout=240,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads(out.read_text())
    # Each client finished at least one request, every one without error. How many more fit
    # in the 10 s depends on the machine.
    assert report["errors"] == 0 and report["requests"] >= clients
