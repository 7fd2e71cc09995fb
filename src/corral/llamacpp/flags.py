"""The llama-server flags and variables corral owns, and the checks of what a config adds.

Every flag listed here is set by corral for each child (``corral.llamacpp.command`` builds the
command line) or would break routing, capacity, the memory estimate or the child's private API
key. ``args`` and ``env`` in the config may not set them; the error says why. Every spelling
llama.cpp accepts (common/arg.cpp) is listed. The tuning flags (batch sizes, flash attention,
offload, draft model, ...) are not refused: ``corral.llamacpp.tuning`` reads them into their
settings. Plain data: the config schema imports it.
"""

from __future__ import annotations

_RESERVED_BY_REASON: dict[str, tuple[str, ...]] = {
    "the model file is `path`": ("-m", "--model"),
    "corral's context is per slot: use `ctx_per_slot` (llama-server's -c is slots x "
    "ctx_per_slot)": ("-c", "--ctx-size"),
    "corral gives each child a private socket": ("--host", "--port"),
    "corral sets the model name": ("--alias", "-a"),
    "corral gives each child a private key": ("--api-key", "--api-key-file"),
    "corral decides the placement and passes --fit off": ("--fit", "-fit"),
    "use the model's `devices`": (
        "-dev", "--device", "-mg", "--main-gpu", "--spec-draft-device", "-devd",
        "--device-draft",
    ),
    "use `kv_unified` with `ctx_per_slot`": ("--kv-unified-per-slot",),
    "the memory estimate assumes llama-server's default op offload": (
        "--no-op-offload", "--op-offload",
    ),
    "corral reads the buffer sizes printed at verbosity 4": (
        "-lv", "--verbosity", "--log-verbosity",
    ),
    "give the projector as a file with --mmproj (nothing is downloaded)": ("-mmu", "--mmproj-url"),
    "name the model by `path`, or download it with corral (`hf: owner/repo:Q4_K_M`)": (
        "-hf", "-hfr", "--hf-repo", "-hff", "--hf-file", "-mu", "--model-url", "-dr",
        "--docker-repo",
    ),
    "the draft model is `draft.path` (nothing is downloaded)": (
        "-hfd", "-hfrd", "--hf-repo-draft", "--spec-draft-hf",
    ),
    "corral is the router: one model per child": (
        "--models-dir", "--models-preset", "--models-max", "--models-autoload",
        "--no-models-autoload",
    ),
}
RESERVED_FLAGS = {flag: why for why, flags in _RESERVED_BY_REASON.items() for flag in flags}

# Variables corral sets for each child from its plan, or that would override a flag where
# corral cannot check it (llama-server reads LLAMA_ARG_* for any flag not on the command line).
RESERVED_ENV = {
    "CUDA_VISIBLE_DEVICES": "use the model's `devices`",
    "CUDA_DEVICE_ORDER": "corral numbers GPUs by PCI bus id, as NVML does",
    "LLAMA_API_KEY": "corral gives each child a private key",
}

# The flags that give a multimodal projector file.
MMPROJ_FLAGS = frozenset({"--mmproj", "-mm"})


def check_args(args: list[str]) -> list[str]:
    """``args`` unchanged, or ``ValueError`` naming the first flag corral owns."""
    for arg in args:
        flag = arg.split("=", 1)[0]
        if flag in RESERVED_FLAGS:
            raise ValueError(f"{flag!r} is set by corral ({RESERVED_FLAGS[flag]})")
    return args


def check_env(env: dict[str, str]) -> dict[str, str]:
    """``env`` unchanged, or ``ValueError`` naming the first variable corral owns."""
    for name in env:
        if name in RESERVED_ENV:
            raise ValueError(f"{name!r} is set by corral ({RESERVED_ENV[name]})")
        if name.startswith("LLAMA_ARG_"):
            raise ValueError(f"{name!r}: give llama-server flags in `args`, where corral "
                             "checks them")
    return env
