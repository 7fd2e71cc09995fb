"""llama-server's tuning flags given in ``args``, read into the settings they mean.

A user who writes ``-ub 256`` or ``--n-cpu-moe=8`` in ``args`` gets exactly what
``ubatch_size: 256`` or ``cpu_moe: 8`` gives: the flag leaves ``args`` and becomes the setting,
so the memory estimate counts it and ``corral.llamacpp.command`` passes it to the child once.
Flags in ``llama_server.args`` stand beside ``defaults:``, a model's flags beside its own
settings; a flag and its setting given together with different values is an error naming
both. Every spelling llama.cpp accepts (common/arg.cpp, 515e855) is listed. Plain data and
parsing: the config schema calls ``lift_tuning_flags`` before it validates the file.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ValidationError

from corral.config.tuning import DraftSettings

MiB = 1 << 20
_TRUE = ("on", "enabled", "true", "1")
_FALSE = ("off", "disabled", "false", "0")


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"wants a whole number, got {text!r}") from None


def _layers(text: str) -> int | str:
    return text if text in ("auto", "all") else _int(text)


def _draft_layers(text: str) -> int | str:
    # With --fit off, llama.cpp offloads every draft layer for "auto" (n_gpu_layers -1).
    return "all" if text in ("auto", "all") else _int(text)


def _flash_attn(text: str) -> str:
    if text in _TRUE:
        return "on"
    if text in _FALSE:
        return "off"
    if text == "auto":
        return "auto"
    raise ValueError(f"wants on, off or auto, got {text!r}")


def _mib(text: str) -> int:
    value = _int(text)
    if value < 0:
        raise ValueError(f"{value} (no limit) cannot be planned: give a size in MiB, or 0")
    return value * MiB


def _split(text: str) -> list[float]:
    try:
        return [float(part) for part in text.replace("/", ",").split(",") if part]
    except ValueError:
        raise ValueError(f"wants proportions like 3,1, got {text!r}") from None


def _overrides(text: str) -> list[str]:
    return [part for part in text.split(",") if part]


@dataclass(frozen=True)
class TuningFlag:
    """One flag: the setting it sets (``draft.path`` inside a group), how its value reads
    (None: a switch that sets ``const``), and whether repeating it adds to a list."""

    setting: str
    read: Callable[[str], Any] | None = None
    const: Any = None
    appends: bool = False


def _spellings(flag: TuningFlag, *names: str) -> dict[str, TuningFlag]:
    return dict.fromkeys(names, flag)


TUNING_FLAGS: dict[str, TuningFlag] = {
    **_spellings(TuningFlag("slots", _int), "-np", "--parallel"),
    **_spellings(TuningFlag("gpu_layers", _layers), "-ngl", "--gpu-layers", "--n-gpu-layers"),
    **_spellings(TuningFlag("cache_type_k", str), "-ctk", "--cache-type-k"),
    **_spellings(TuningFlag("cache_type_v", str), "-ctv", "--cache-type-v"),
    **_spellings(TuningFlag("batch_size", _int), "-b", "--batch-size"),
    **_spellings(TuningFlag("ubatch_size", _int), "-ub", "--ubatch-size"),
    **_spellings(TuningFlag("flash_attn", _flash_attn), "-fa", "--flash-attn"),
    **_spellings(TuningFlag("cpu_moe", const="all"), "-cmoe", "--cpu-moe"),
    **_spellings(TuningFlag("cpu_moe", _int), "-ncmoe", "--n-cpu-moe"),
    **_spellings(TuningFlag("cpu_ffn", _int), "-ncffn", "--n-cpu-ffn"),
    **_spellings(TuningFlag("tensor_overrides", _overrides, appends=True),
                 "-ot", "--override-tensor"),
    **_spellings(TuningFlag("kv_unified", const=True), "-kvu", "--kv-unified"),
    **_spellings(TuningFlag("kv_unified", const=False), "-no-kvu", "--no-kv-unified"),
    **_spellings(TuningFlag("kv_offload", const=True), "-kvo", "--kv-offload"),
    **_spellings(TuningFlag("kv_offload", const=False), "-nkvo", "--no-kv-offload"),
    **_spellings(TuningFlag("swa_full", const=True), "--swa-full"),
    **_spellings(TuningFlag("ctx_checkpoints", _int),
                 "-ctxcp", "--ctx-checkpoints", "--swa-checkpoints"),
    **_spellings(TuningFlag("prompt_cache", _mib), "-cram", "--cache-ram"),
    **_spellings(TuningFlag("tensor_split", _split), "-ts", "--tensor-split"),
    **_spellings(TuningFlag("split_mode", str), "-sm", "--split-mode"),
    **_spellings(TuningFlag("draft.path", str), "-md", "--model-draft", "--spec-draft-model"),
    **_spellings(TuningFlag("draft.gpu_layers", _draft_layers),
                 "--spec-draft-ngl", "-ngld", "--gpu-layers-draft", "--n-gpu-layers-draft"),
    **_spellings(TuningFlag("draft.cache_type_k", str),
                 "--spec-draft-type-k", "-ctkd", "--cache-type-k-draft"),
    **_spellings(TuningFlag("draft.cache_type_v", str),
                 "--spec-draft-type-v", "-ctvd", "--cache-type-v-draft"),
    **_spellings(TuningFlag("draft.tensor_overrides", _overrides, appends=True),
                 "--spec-draft-override-tensor", "-otd", "--override-tensor-draft"),
    **_spellings(TuningFlag("draft.cpu_moe", const="all"),
                 "--spec-draft-cpu-moe", "-cmoed", "--cpu-moe-draft"),
    **_spellings(TuningFlag("draft.cpu_moe", _int), "--spec-draft-n-cpu-moe",
                 "--spec-draft-ncmoe", "-ncmoed", "--n-cpu-moe-draft"),
}


def read_tuning_flags(args: list[Any], where: str) -> tuple[list[Any], dict[str, Any], dict[
        str, str]]:
    """``args`` without its tuning flags, the settings they give (dotted names), and for each
    setting the flag as written (for messages). ``--flag=value`` and ``--flag value`` alike;
    a repeated flag: the last wins, as in llama-server, except ``-ot``, which adds."""
    kept: list[Any] = []
    found: dict[str, Any] = {}
    spelled: dict[str, str] = {}
    i = 0
    while i < len(args):
        arg = args[i]
        i += 1
        name, eq, inline = arg.partition("=") if isinstance(arg, str) else ("", "", "")
        flag = TUNING_FLAGS.get(name)
        if flag is None:
            kept.append(arg)
            continue
        if flag.read is None:
            if eq:
                raise ValueError(f"{where}: {name!r} takes no value, got {arg!r}")
            value, text = flag.const, name
        else:
            if eq:
                raw = inline
            elif i < len(args) and isinstance(args[i], str | int | float) \
                    and not isinstance(args[i], bool):
                raw, i = str(args[i]), i + 1  # YAML reads `[-ub, 256]` as a number
            else:
                raise ValueError(f"{where}: {name!r} needs a value")
            try:
                value = flag.read(raw)
            except ValueError as exc:
                raise ValueError(f"{where}: {name!r} {exc}") from None
            text = f"{name} {raw}"
        if flag.appends:
            value = [*found.get(flag.setting, []), *value]
        found[flag.setting] = value
        spelled[flag.setting] = text
    return kept, found, spelled


def merge_tuning(
    settings: Mapping[str, Any], found: Mapping[str, Any], spelled: Mapping[str, str],
    where: str, scope: str, normalize: Callable[[str, Any], Any],
) -> dict[str, Any]:
    """``settings`` (one scope of the YAML: a model, or ``defaults:``) with the settings read
    from flags added; a setting given both ways with different values is an error naming both.
    ``scope`` prefixes the setting's key path in messages (``models.m``, ``defaults``);
    ``normalize(setting, value)`` is the validated value (raising ``ValueError``), so
    ``512MiB`` and ``--cache-ram 512`` agree."""
    merged = dict(settings)
    for dotted, value in found.items():
        group, _, name = dotted.rpartition(".")
        target = merged
        if group:
            inner = merged.get(group)
            merged[group] = target = dict(inner) if isinstance(inner, Mapping) else {}
        try:
            read = normalize(dotted, value)
        except ValueError as exc:
            raise ValueError(f"{where}: {spelled[dotted]!r}: {exc}") from None
        given = target.get(name)
        if given is not None:
            try:
                same = normalize(dotted, given) == read
            except ValueError:
                same = False
            if not same:
                raise ValueError(
                    f"{where}: {spelled[dotted]!r} and {scope}.{dotted}: {given!r} disagree; "
                    "give one of them")
        target[name] = value
    return merged


def lift_tuning_flags(data: object, settings: type[BaseModel]) -> object:
    """The raw config file ``data`` with the tuning flags of ``llama_server.args`` moved into
    ``defaults:`` and those of each model's ``args`` into its settings; ``settings`` is the
    class that validates a model's settings (``ModelSettings``)."""
    if not isinstance(data, dict):
        return data

    def normalize(dotted: str, value: Any) -> Any:
        group, _, name = dotted.rpartition(".")
        try:
            if group:
                return getattr(DraftSettings.model_validate({"path": "-", name: value}), name)
            return getattr(settings.model_validate({name: value}), name)
        except ValidationError as exc:
            message = exc.errors(include_url=False)[0]["msg"]
            raise ValueError(message.removeprefix("Value error, ")) from None

    data = dict(data)
    server = data.get("llama_server")
    if isinstance(server, dict) and isinstance(server.get("args"), list):
        args, found, spelled = read_tuning_flags(server["args"], "llama_server.args")
        data["llama_server"] = {**server, "args": args}
        defaults = data.get("defaults")
        if found:
            data["defaults"] = merge_tuning(defaults if isinstance(defaults, dict) else {},
                                            found, spelled, "llama_server.args", "defaults",
                                            normalize)
    models = data.get("models")
    if isinstance(models, dict):
        data["models"] = models = dict(models)
        for name, model in models.items():
            if not (isinstance(model, dict) and isinstance(model.get("args"), list)):
                continue
            where = f"models.{name}.args"
            args, found, spelled = read_tuning_flags(model["args"], where)
            models[name] = merge_tuning({**model, "args": args}, found, spelled, where,
                                        f"models.{name}", normalize)
    return data
