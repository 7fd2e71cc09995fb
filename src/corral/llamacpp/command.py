"""The one place that builds a child's llama-server command line and environment.

Everything corral decides reaches llama-server here: the model and its name, the child's
private socket, the placement (slots, context, layers, split, cache types, batch sizes) and
the GPU selection. ``corral plan`` prints what ``child_command`` returns and the supervisor runs
exactly that, so the two cannot disagree.

Usage::

    command = child_command(spec, plan, binary, socket)
    env = child_env(os.environ, spec.env, command.env, api_key, secret)
    subprocess.Popen(command.argv, env=env)
"""

from __future__ import annotations

import shlex
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from corral.config.schema import ModelSpec
from corral.placement.decide import PlacementPlan
from corral.placement.devices import gpu_env

MiB = 1 << 20


@dataclass(frozen=True)
class ChildCommand:
    """A child's argv and the variables its plan sets (GPU selection); its API key is added
    by ``child_env`` at start, never shown."""

    argv: tuple[str, ...]
    env: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))
    socket: str = ""

    def shell(self) -> str:
        """The command as one shell line, variables first: what ``corral plan`` prints."""
        assignments = [f"{k}={shlex.quote(v)}" for k, v in sorted(self.env.items())]
        return " ".join([*assignments, shlex.join(self.argv)])


def placement_flags(plan: PlacementPlan) -> list[str]:
    """The flags that make llama-server allocate exactly what ``plan`` estimated: capacity and
    layers, then every tuning setting (``corral.config.tuning``) that differs from
    llama-server's own default or that corral sets itself."""
    want = plan.request.settings
    args = ["-np", str(plan.slots), "-c", str(plan.ctx_total), "-ngl", str(plan.gpu_layers),
            "--fit", "off", "--cache-type-k", want.cache_type_k, "--cache-type-v",
            want.cache_type_v,
            "-b", str(want.batch_size), "-ub", str(want.ubatch_size),
            "--cache-ram", str(int(want.prompt_cache) // MiB)]
    if want.flash_attn != "auto":
        args += ["--flash-attn", want.flash_attn]
    if plan.checkpoints:
        args += ["--ctx-checkpoints", str(want.ctx_checkpoints)]
    if want.kv_unified:
        args.append("--kv-unified")
    if not want.kv_offload:
        args.append("--no-kv-offload")
    if want.swa_full:
        args.append("--swa-full")
    args += _override_flags("--override-tensor", want.tensor_overrides, want.cpu_moe,
                            "--cpu-moe", "--n-cpu-moe")
    if want.cpu_ffn:
        args += ["--n-cpu-ffn", str(want.cpu_ffn)]
    if plan.tensor_split:
        args += ["--split-mode", want.split_mode,
                 "--tensor-split", ",".join(map(str, plan.tensor_split))]
    elif want.split_mode == "none" and plan.gpus:
        args += ["--split-mode", "none"]
    draft = want.draft
    if draft is not None:
        layers = draft.gpu_layers if plan.gpus else 0
        args += ["--model-draft", draft.path, "--gpu-layers-draft", str(layers),
                 "--cache-type-k-draft", draft.cache_type_k,
                 "--cache-type-v-draft", draft.cache_type_v]
        args += _override_flags("--override-tensor-draft", draft.tensor_overrides,
                                draft.cpu_moe, "--cpu-moe-draft", "--n-cpu-moe-draft")
    return args


def _override_flags(flag: str, tensor_overrides: tuple[str, ...], cpu_moe: int | str,
                    all_flag: str, n_flag: str) -> list[str]:
    """``-ot`` first, then the expert offload: the order llama-server tries them in."""
    args = [a for o in tensor_overrides for a in (flag, o)]
    if cpu_moe == "all":
        args.append(all_flag)
    elif cpu_moe:
        args += [n_flag, str(cpu_moe)]
    return args


def _model_file(spec: ModelSpec) -> str:
    # A model from a source has a path once its files are fetched; before that (corral plan)
    # the command names where it comes from.
    if spec.path is not None or spec.source is None:
        return str(spec.path)
    return f"<{spec.source.ref}, once downloaded>"


def child_command(spec: ModelSpec, plan: PlacementPlan, binary: str, socket: str) -> ChildCommand:
    """The complete command line of ``spec``'s child, placed by ``plan``, listening on the Unix
    socket ``socket`` (only corral's user can reach it: see ``corral.probe.host``)."""
    argv = (
        binary,
        "-m", _model_file(spec),
        "--host", socket,
        "--alias", spec.name,
        "--metrics",
        "--no-webui",
        # Verbosity 4 prints the buffer sizes corral compares with its estimate.
        "--log-verbosity", "4",
        *placement_flags(plan),
        *spec.args,
    )
    return ChildCommand(argv, MappingProxyType(planned_env(plan)), socket)


def planned_env(plan: PlacementPlan) -> dict[str, str]:
    """The variables that restrict the child to the plan's GPUs, in the plan's order (none
    visible for a model on the CPU alone: no CUDA context, no offload)."""
    return gpu_env(plan.gpu_devices)


def child_env(
    inherited: Mapping[str, str], configured: Mapping[str, str], planned: Mapping[str, str],
    api_key: str, secret: Collection[str] = (),
) -> dict[str, str]:
    """A child's environment: corral's own, less its API keys and any ``LLAMA_ARG_*`` (which
    would set llama-server flags unchecked), then the configured ``env``, then the plan's GPU
    selection, which nothing overrides, and the child's private key."""
    env = {k: v for k, v in inherited.items()
           if k not in secret and not k.startswith("LLAMA_ARG_")}
    env.update(configured)
    env.update(planned)
    env["LLAMA_API_KEY"] = api_key
    return env
