"""llama-server itself, its model given as a local file instead of a download.

Usage (what llama.cpp's server tests run as ``$LLAMA_SERVER_BIN_PATH``)::

    python bench/llamacpp_suite/as_llama_server.py --hf-repo REPO [--hf-file FILE] FLAGS...

The real binary is ``$CORRAL_SUITE_LLAMA_SERVER`` (default: the one corral would run).
"""

from __future__ import annotations

import os
import sys

from cmdline import Unsupported, fail, split_model


def main(argv: list[str]) -> None:
    """Exec llama-server with ``-m LOCAL`` for the model flags of ``argv``."""
    try:
        split = split_model(argv)
    except Unsupported as exc:
        fail(str(exc))
        return
    binary = os.environ.get("CORRAL_SUITE_LLAMA_SERVER")
    if binary is None:
        from corral.probe.host import resolve_binary
        binary = resolve_binary("llama-server")
    if binary is None:
        fail("llama-server not found: set CORRAL_SUITE_LLAMA_SERVER")
        return
    model = [] if split.model is None else ["-m", str(split.model)]  # none: router mode
    os.execv(binary, [binary, *model, *split.rest])


if __name__ == "__main__":
    main(sys.argv[1:])
