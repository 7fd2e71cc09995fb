"""The reduced form of bench/compare.py, end to end, so the harness cannot rot.

It checks that the harness works (every contender started and answered, every part produced
every row of its table), never the figures: those depend on the machine.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.integration

REAL = {"direct", "corral", "router", "nginx"}
FAKE = {"fake", "corral-fake", "nginx-fake"}


# It starts every contender: a busy machine may need more than the suite's 300 s per test.
@pytest.mark.timeout(900)
def test_quick_comparison_runs_every_part_and_contender(tmp_path: Path) -> None:
    out = tmp_path / "compare.json"
    result = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "compare.py"), "--quick", "--json", str(out)],
        # Under the test's own timeout; a harness killed here takes its servers with it.
        capture_output=True, text=True, timeout=840,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads(out.read_text())
    # Requests llama.cpp's router fails while it swaps models are a figure of P5 ("failed
    # requests": it failed some in full runs too), not the harness failing; any other failure
    # is.
    unexpected = {name: f for name, f in report["failures"].items() if name != "router-p5"}
    assert unexpected == {}, report["failures"]
    rows = report["rows"]
    contenders: dict[str, set[str]] = {}
    for row in rows:
        contenders.setdefault(row["part"], set()).add(row["contender"])
        assert row["rounds"] >= 1
    assert contenders == {"P1": REAL, "P2": FAKE, "P3": REAL,
                          "P4": {"corral", "router", "by hand"},
                          "P5": {"corral-p5", "router-p5"}, "P6": {"corral"}}

    def figures(part: str) -> set[str]:
        return {row["figure"] for row in rows if row["part"] == part}

    assert len(figures("P1")) == 2 * 3  # two concurrencies x p50, p95, p99
    assert figures("P2") >= {"1 streams: chunks/s", "1 streams: CPU s per 1000 chunks"}
    assert len(figures("P3")) == 2 * 2  # two concurrencies, streamed and not
    assert figures("P5") == {"completed per minute", "failed requests", "loads per minute"}
    # Something answered: every rate that measures an answer is above zero.
    assert all(row["median"] > 0 for row in rows
               if row["unit"] == "/s" or row["figure"].startswith("cold start"))
    # Every contender is compared with its part's baseline, and all of it is in the table.
    assert any("added" in row for row in rows if row["part"] == "P1")
    assert any("ratio" in row for row in rows if row["part"] == "P2")
    for row in rows:
        assert f"| {row['part']} | {row['figure']} | {row['contender']} |" in result.stdout
    assert report["machine"]["cores"] and report["machine"]["nginx"] != "absent"


def test_corral_cpu_measures_two_trees_in_turn() -> None:
    # bench/corral_cpu.py (docs/benchmarks.md, "P1 profiled again"), reduced: this tree against
    # itself, so both servers must start, answer and be reported.
    result = subprocess.run(
        [sys.executable, "corral_cpu.py", "--rounds", "2", "--requests", "20", "--streams", "4",
         "--chunks", "400", "--against", str(ROOT)],
        cwd=ROOT / "bench", capture_output=True, text=True, timeout=280,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    for name in ("this-tree", "against"):
        assert f"{name}, median of 2:" in result.stdout, result.stdout + result.stderr
        assert f"{name}: 1-token latency, 20 in turn: p50" in result.stdout
        assert result.stderr.count(f"round 0 {name}: ") == 1
    assert "this tree / against, per round: per request" in result.stdout


def test_admission_cost_measures_both_ways_in_turn() -> None:
    # bench/admission_cost.py (docs/benchmarks.md, P1 at 16 clients), reduced to seconds.
    result = subprocess.run(
        [sys.executable, "admission_cost.py", "--rounds", "2", "--clients", "6", "--each", "1"],
        cwd=ROOT / "bench", capture_output=True, text=True, timeout=280,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    for r in (0, 1):
        for name in ("straight", "held"):
            assert f"round {r} {name}: p50 " in result.stdout, result.stdout + result.stderr
    assert "6 clients, p50 straight " in result.stdout and "held to 4 " in result.stdout
