"""llama-server's command line as llama.cpp's server tests write it, read for two stand-ins.

The tests (tools/server/tests/utils.py) start ``$LLAMA_SERVER_BIN_PATH`` with llama-server's
flags and name their models by Hugging Face repository (``--hf-repo``, ``--hf-file``). Nothing
is downloaded here: ``models.json`` beside this file (or ``$CORRAL_SUITE_MODELS``) maps each
``repo`` or ``repo/file`` to a local GGUF, relative to the repository root, or to ``@tiny``:
the tiny stand-in for ``stories260K`` that ``run.py`` writes (``tiny_model.py``), its path in
``$CORRAL_SUITE_TINY``. Both stand-ins (the
real llama-server, ``as_llama_server.py``; corral, ``as_corral.py``) read the same map, so both
run the same model.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
MODEL_MAP = Path(os.environ.get("CORRAL_SUITE_MODELS", Path(__file__).with_name("models.json")))
HF_FLAGS = {"-hf": "repo", "-hfr": "repo", "--hf-repo": "repo",
            "-hff": "file", "--hf-file": "file"}


class Unsupported(Exception):
    """A command line the stand-in cannot run (a model not in the map, router mode)."""


@dataclass
class Split:
    """A command line with the model named by a local path instead of a download."""

    model: Path | None  # None: no model, llama-server's router mode
    rest: list[str] = field(default_factory=list)  # every other flag, in order


def local_model(repo: str | None, file: str | None) -> Path:
    """The local file ``models.json`` maps ``repo`` (and ``file``) to."""
    table: dict[str, str] = json.loads(MODEL_MAP.read_text())
    wanted = f"{repo}/{file}" if file else str(repo)
    for key in (wanted, str(repo)):
        if key in table:
            if table[key] == "@tiny":
                tiny = os.environ.get("CORRAL_SUITE_TINY")
                if not tiny:
                    raise Unsupported(f"{wanted}: the tiny stand-in model is written by run.py "
                                      "($CORRAL_SUITE_TINY not set)")
                return Path(tiny)
            path = Path(table[key])
            return path if path.is_absolute() else ROOT / path
    raise Unsupported(f"no local file for {wanted} in {MODEL_MAP} (nothing is downloaded)")


def split_model(argv: list[str]) -> Split:
    """Take the model flags (``-m``, ``--hf-repo``, ``--hf-file``) out of ``argv``."""
    hf: dict[str, str] = {}
    model: Path | None = None
    rest: list[str] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg in HF_FLAGS and i + 1 < len(argv):
            hf[HF_FLAGS[arg]] = argv[i + 1]
            i += 2
        elif arg in ("-m", "--model") and i + 1 < len(argv):
            model = Path(argv[i + 1]).resolve()
            i += 2
        else:
            rest.append(arg)
            i += 1
    if model is None and "repo" in hf:
        model = local_model(hf["repo"], hf.get("file"))
    return Split(model, rest)


def fail(message: str) -> None:
    """Exit as llama-server does on a command line it cannot run."""
    print(f"stand-in: {message}", file=sys.stderr)
    raise SystemExit(1)
