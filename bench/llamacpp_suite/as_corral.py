"""corral in llama-server's place: llama-server's command line in, ``corral serve`` out.

Usage (what llama.cpp's server tests run as ``$LLAMA_SERVER_BIN_PATH``)::

    python bench/llamacpp_suite/as_corral.py --port 8080 --hf-repo REPO --alias NAME FLAGS...

One model, ``default_model`` set to it and ``unknown_model_to_default: true`` (what a single
llama-server does with the ``model`` a request names), loaded at start as llama-server loads
its model. The flags corral owns become its settings (``--host``, ``--port``, ``--alias``,
``--api-key``, ``-c``/``-np``, ``-ngl``, ``-ctk``/``-ctv``, ``--cors-*``); every other flag
goes to the model's ``args``, where corral reads its tuning flags (``-b``, ``-ub``, ``-fa``,
...) into their settings; a flag corral still refuses is dropped with a note on stderr. The config
and the state file go to ``$TMPDIR/corral-as-llama-server-PORT/``, reused at each start.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

from cmdline import ROOT, Unsupported, fail, split_model

from corral.llamacpp.flags import RESERVED_FLAGS

# Flags corral owns that take no value (every other reserved flag takes one).
_SWITCHES = frozenset({
    "--swa-full", "-kvu", "--kv-unified", "-no-kvu", "--no-kv-unified", "--kv-unified-per-slot",
    "-nkvo", "--no-kv-offload", "-kvo", "--kv-offload", "-cmoe", "--cpu-moe",
    "--no-op-offload", "--op-offload", "--models-autoload", "--no-models-autoload",
})
_CACHE_TYPES = frozenset({"f16", "q8_0", "q4_0"})
_ROUTER = frozenset({"--models-dir", "--models-preset", "--models-max"})
# Flags corral would also read from args into its settings: translated here, so the config
# shows them as settings.
_TRANSLATED = frozenset({"--parallel", "-np", "--n-gpu-layers", "-ngl", "--gpu-layers", "-ctk",
                         "--cache-type-k", "-ctv", "--cache-type-v"})


def config_for(argv: list[str], workdir: Path) -> dict[str, Any]:
    """The corral config that stands in for ``llama-server argv``."""
    split = split_model(argv)
    owned: dict[str, str] = {}
    args: list[str] = []
    rest = split.rest
    i = 0
    while i < len(rest):
        arg = rest[i]
        name, eq, inline = arg.partition("=")
        if name.startswith("--") and eq:
            arg, value = name, inline
            takes = 1
        else:
            value = rest[i + 1] if i + 1 < len(rest) else ""
            takes = 2
        if arg in _ROUTER:
            raise Unsupported("router mode: corral is the router, one model per child")
        if arg in ("--cors-origins", "--cors-methods", "--cors-headers") or arg in _TRANSLATED or (
                arg in RESERVED_FLAGS and arg not in _SWITCHES):
            owned[arg] = value
            i += takes
        elif arg in RESERVED_FLAGS:
            owned[arg] = ""
            i += 1
        else:
            args.append(rest[i])
            i += 1
    return _settings(split.model, owned, args, workdir)


def _settings(model: Path | None, owned: dict[str, str], args: list[str],
              workdir: Path) -> dict[str, Any]:
    aliases = sorted({a.strip() for a in (owned.pop("--alias", "") or owned.pop("-a", ""))
                      .split(",") if a.strip()})
    # llama-server's id is the first alias in sorted order, else the file's name.
    name = aliases[0] if aliases else model.stem if model else ""
    slots = int(owned.pop("--parallel", "") or owned.pop("-np", "") or 0)
    ctx = int(owned.pop("--ctx-size", "") or owned.pop("-c", "") or 0)
    spec: dict[str, Any] = {"path": str(model), "aliases": aliases[1:], "args": args,
                            "preload": True, "ttl": 0}
    if slots > 0:
        spec["slots"] = slots
    if ctx > 0:
        # llama-server splits -c over the slots; corral's ctx_per_slot is a multiple of 256.
        per_slot = -(-ctx // (slots or 4))
        spec["ctx_per_slot"] = max(256, -(-per_slot // 256) * 256)
    layers = owned.pop("--n-gpu-layers", "") or owned.pop("-ngl", "") or owned.pop(
        "--gpu-layers", "")
    if layers:
        spec["gpu_layers"] = "all" if layers in ("all", "-1", "999") else int(layers)
    for flag, key in (("-ctk", "cache_type_k"), ("--cache-type-k", "cache_type_k"),
                      ("-ctv", "cache_type_v"), ("--cache-type-v", "cache_type_v")):
        if owned.get(flag) in _CACHE_TYPES:
            spec[key] = owned.pop(flag)
    hosts = [h.strip() for h in owned.pop("--host", "127.0.0.1").split(",") if h.strip()]
    config: dict[str, Any] = {
        "listen": {"host": hosts if len(hosts) > 1 else hosts[0],
                   "port": int(owned.pop("--port", "") or 8080)},
        # No model (llama-server's router mode, its models downloaded on demand): corral
        # with none, for what needs no model (CORS, /health, /v1/models).
        "models": {name: spec} if model else {},
        **({"default_model": name, "unknown_model_to_default": True} if model else {}),
        "state_file": str(workdir / "children.json"),
        "shutdown_timeout": 2,
        "llama_server": {"stop_timeout": 2},
        "allow_unauthenticated": True,
    }
    binary = os.environ.get("CORRAL_SUITE_LLAMA_SERVER")
    if binary:
        config["llama_server"]["binary"] = binary
    key = owned.pop("--api-key", "")
    if key:
        config["auth"] = {"keys": [{"key": key, "scopes": ["inference", "admin"]}]}
    cors: dict[str, list[str]] = {}
    for flag, setting in (("--cors-origins", "allow_origins"),
                          ("--cors-methods", "allow_methods"),
                          ("--cors-headers", "allow_headers")):
        if flag in owned:
            cors[setting] = [v.strip() for v in owned.pop(flag).split(",") if v.strip()]
    if cors:
        config["cors"] = cors
    for flag in ("--port", "--host", "-m", "--model"):
        owned.pop(flag, None)
    if owned:
        print(f"stand-in: corral sets these itself, dropped: {' '.join(sorted(owned))}",
              file=sys.stderr)
    return config


def main(argv: list[str]) -> None:
    """Write the config and become ``corral serve`` (so the tests' SIGTERM reaches it)."""
    port = next((argv[i + 1] for i, a in enumerate(argv[:-1]) if a == "--port"), "8080")
    workdir = Path(tempfile.gettempdir()) / f"corral-as-llama-server-{port}"
    workdir.mkdir(mode=0o700, exist_ok=True)
    try:
        config = config_for(argv, workdir)
    except (Unsupported, ValueError) as exc:
        fail(str(exc))
        return
    path = workdir / "corral.yaml"
    path.write_text(json.dumps(config, indent=1))  # JSON is YAML
    os.environ["PYTHONPATH"] = str(ROOT / "src")
    os.execv(sys.executable, [sys.executable, "-m", "corral", "serve", "-c", str(path)])


if __name__ == "__main__":
    main(sys.argv[1:])
