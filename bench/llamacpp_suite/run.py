"""Run llama.cpp's server tests against llama-server and against corral in its place.

Usage::

    python bench/llamacpp_suite/run.py [--tests DIR] [--only llama-server|corral]
        [--out DIR] [--compare] [-k EXPR] [FILE ...]

``FILE``: test files under ``DIR/unit`` (default: the ones the drop-in promise covers).
``DIR``: llama.cpp's ``tools/server/tests`` (default: the llama.cpp checkout corral's
``scripts/install-llama-server`` left under ``~/.cache/corral``). Nothing is committed from it.
Both servers run at once, each the same files on free ports, its model mapped to a local
file (``models.json``; ``stories260K``, which most files use, is the tiny model
``tiny_model.py`` writes into ``OUT/models``); the outcome of every test goes to
``OUT/TARGET/FILE.xml`` (JUnit, one pytest per file; ``OUT`` defaults to
``$TMPDIR/corral-llamacpp-suite``) and both, side by side, to ``OUT/compare.json``; the
differences are printed. Needs nothing of llama.cpp's test requirements beyond what corral's
dev environment has.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import tiny_model

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
FILES = ("test_tokenize.py", "test_ignore_eos.py", "test_ctx_shift.py", "test_template.py",
         "test_basic.py", "test_security.py", "test_compat_oai_responses.py", "test_metrics.py",
         "test_stream.py", "test_chat_completion.py", "test_completion.py",
         "test_compat_anthropic.py")
TARGETS = {"llama-server": "as_llama_server.py", "corral": "as_corral.py"}


def default_tests() -> Path | None:
    """llama.cpp's server tests in corral's cache (where install-llama-server puts it)."""
    cache = Path(os.environ.get("CORRAL_CACHE") or Path(
        os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "corral")
    found = sorted(cache.glob("llama.cpp-*/tools/server/tests/unit"))
    return found[-1].parent if found else None


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def run(target: str, tests: Path, files: list[str], out: Path, keyword: str | None,
        tiny: Path) -> None:
    """Run ``files`` with ``target`` as llama-server, one pytest per file (so what finished
    is kept if the run is cut short): ``OUT/TARGET/FILE.xml``."""
    launcher = out / f"{target}.sh"
    launcher.write_text(f"#!/bin/sh\nexec {sys.executable} {HERE / TARGETS[target]} \"$@\"\n")
    launcher.chmod(0o755)
    (out / target).mkdir(exist_ok=True)
    env = {**os.environ, "CORRAL_SUITE_TINY": str(tiny), "LLAMA_SERVER_BIN_PATH": str(launcher),
           "PYTHONPATH": os.pathsep.join([str(HERE), str(ROOT / "src")]),
           "LLAMA_CACHE": str(out / "llama-cache")}
    for file in files:
        report = out / target / f"{Path(file).stem}.xml"
        command = [sys.executable, "-m", "pytest", "-p", "suite_plugin", "-q", "-rN",
                   "--timeout", "120", f"--junitxml={report}", "-o",
                   f"cache_dir={out / 'cache'}", *(["-k", keyword] if keyword else []),
                   f"unit/{file}"]
        started = time.monotonic()
        with (out / target / f"{Path(file).stem}.log").open("wb") as log:
            subprocess.run(command, cwd=tests, env={**env, "PORT": str(free_port())},
                           stdout=log, stderr=subprocess.STDOUT, check=False)
        print(f"{target} {file}: {time.monotonic() - started:.0f}s", flush=True)


def outcomes(reports: Path) -> dict[str, str]:
    """``file::test[params]`` -> passed / failed / error / skipped, from the JUnit files."""
    found = {}
    for report in sorted(reports.glob("*.xml")):
        found.update(_outcomes(report))
    return found


def _outcomes(report: Path) -> dict[str, str]:
    found = {}
    for case in ET.parse(report).iter("testcase"):
        name = f"{case.get('classname', '').rpartition('.')[2]}.py::{case.get('name')}"
        kinds = {child.tag for child in case}
        found[name] = ("failed" if "failure" in kinds else "error" if "error" in kinds
                       else "skipped" if "skipped" in kinds else "passed")
    return found


def compare(results: dict[str, dict[str, str]]) -> dict[str, object]:
    """Counts per server and the tests whose outcome differs."""
    names = sorted(set().union(*results.values()))
    differ = {n: {t: r.get(n, "absent") for t, r in results.items()} for n in names
              if len({r.get(n, "absent") for r in results.values()}) > 1}
    counts = {t: {o: sum(1 for v in r.values() if v == o)
                  for o in ("passed", "failed", "error", "skipped")}
              for t, r in results.items()}
    return {"counts": counts, "differ": differ}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("files", nargs="*", default=list(FILES))
    parser.add_argument("--tests", type=Path, default=default_tests())
    parser.add_argument("--only", choices=sorted(TARGETS))
    parser.add_argument("--compare", action="store_true",
                        help="run nothing: compare the outcomes already in --out")
    parser.add_argument("--out", type=Path,
                        default=Path(tempfile.gettempdir()) / "corral-llamacpp-suite")
    parser.add_argument("-k", dest="keyword")
    parser.add_argument("--tokenizer-from", type=Path, default=tiny_model.SOURCE,
                        help="the GGUF whose tokenizer the tiny model gets (SmolLM2's)")
    args = parser.parse_args()
    if args.tests is None or not (args.tests / "utils.py").exists():
        parser.error("llama.cpp's tools/server/tests not found: give --tests")
    args.out.mkdir(parents=True, exist_ok=True)
    targets = [] if args.compare else [args.only] if args.only else list(TARGETS)
    # Side by side: each target runs its files in a thread of its own.
    # The tests' stories260K: a tiny model written here, the same file for both servers.
    tiny = tiny_model.ensure(args.out / "models", args.tokenizer_from)
    threads = [threading.Thread(target=run, args=(t, args.tests, args.files, args.out,
                                                  args.keyword, tiny)) for t in targets]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    results = {t: outcomes(args.out / t) for t in TARGETS}
    summary = compare(results)
    (args.out / "compare.json").write_text(json.dumps({**summary, "results": results},
                                                      indent=1, sort_keys=True))
    for target, count in summary["counts"].items():  # type: ignore[attr-defined]
        print(f"{target:>12}: " + ", ".join(f"{n} {o}" for o, n in count.items()))
    differ: dict[str, dict[str, str]] = summary["differ"]  # type: ignore[assignment]
    print(f"\n{len(differ)} tests differ (llama-server / corral):")
    for name, by in differ.items():
        print(f"  {by.get('llama-server', 'absent'):>8} / {by.get('corral', 'absent'):<8} {name}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
