"""Read the YAML file once, at the edge, into a validated ``Config``.

Usage::

    config = load_config("corral.yaml")      # raises ConfigError listing every problem
    spec = config.resolve("smol")            # alias -> ModelSpec
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from corral.config.schema import (
    ApiKey,
    AuthSettings,
    ConfigFile,
    ModelSpec,
    ResolvedKey,
    resolve_settings,
)
from corral.errors import ConfigError

DEFAULT_CONFIG = "corral.yaml"
# Where huggingface_hub reads a token for gated and private repositories: corral's alone.
HF_TOKEN_ENV = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")


@dataclass(frozen=True)
class Config:
    """The validated configuration: the file as written plus each model resolved."""

    file: ConfigFile
    source: str
    models: dict[str, ModelSpec]
    _names: dict[str, str] = field(repr=False)
    api_keys: tuple[ResolvedKey, ...] = field(default=(), repr=False)

    def resolve(self, name: str) -> ModelSpec | None:
        """The model called ``name`` (its name or one of its aliases), or None."""
        canonical = self._names.get(name)
        return None if canonical is None else self.models[canonical]

    @property
    def default_model(self) -> ModelSpec | None:
        name = self.file.default_model
        return None if name is None else self.resolve(name)

    def model_names(self) -> list[str]:
        """Every name a request may use: model names, then aliases."""
        return list(self._names)

    @property
    def secret_env(self) -> frozenset[str]:
        """Variables of corral's environment that hold API keys or the Hugging Face token:
        children never inherit them."""
        named = {k.key_env for k in self.file.auth.keys if k.key_env is not None}
        return frozenset({"CORRAL_API_KEY", *HF_TOKEN_ENV, *named})


def config_path(explicit: str | None) -> str:
    """The file to read: ``-c`` if given, else ``$CORRAL_CONFIG``, else ``./corral.yaml``."""
    return explicit or os.environ.get("CORRAL_CONFIG") or DEFAULT_CONFIG


def load_config(path: str | os.PathLike[str]) -> Config:
    """Read and validate ``path``; raise ``ConfigError`` naming each bad key path and value."""
    source = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(source, [f"cannot read the file: {exc.strerror or exc}"]) from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(source, [f"not valid YAML: {_yaml_problem(exc)}"]) from None
    return parse_config(data, source=source, base_dir=Path(path).resolve().parent)


def parse_config(data: Any, *, source: str = "<memory>", base_dir: Path | None = None) -> Config:
    """Validate already-parsed YAML ``data``; relative model paths are taken from ``base_dir``."""
    if not isinstance(data, dict):
        got = "an empty file" if data is None else type(data).__name__
        raise ConfigError(source, [f"the top level must be a mapping of keys, got {got}"])
    try:
        file = ConfigFile.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(source, list(_describe(exc))) from None
    base = base_dir or Path.cwd()
    models: dict[str, ModelSpec] = {}
    names: dict[str, str] = {}
    for name, model in file.models.items():
        settings = resolve_settings(file.defaults, model)
        if settings.draft is not None:
            draft = settings.draft.model_copy(update={"path": str(_file(settings.draft.path,
                                                                          base))})
            settings = settings.model_copy(update={"draft": draft})
        if settings.download_dir is not None:
            settings = settings.model_copy(update={"download_dir": str(
                _file(settings.download_dir, base))})
        models[name] = ModelSpec(
            **dict(settings),
            name=name,
            path=None if model.path is None else _file(model.path, base),
            source=model.source,
            aliases=tuple(model.aliases),
            binary=model.binary,
            devices=None if model.devices is None else tuple(model.devices),
            args=(*file.llama_server.args, *model.args),
            env={**file.llama_server.env, **model.env},
            preload=model.preload,
            pinned=model.pinned,
        )
        names[name] = name
    for name, model in file.models.items():
        names.update({alias: name for alias in model.aliases})
    keys = _resolve_keys(file, names, source, base)
    problems = _exposure_problems(file, keys) + [
        problem for name, spec in models.items() for problem in _tuning_problems(name, spec)]
    if problems:
        raise ConfigError(source, problems)
    return Config(file=file, source=source, models=models, _names=names, api_keys=keys)


def _tuning_problems(name: str, spec: ModelSpec) -> list[str]:
    """Settings that are each valid but that llama-server cannot run together (they may come
    from ``defaults:`` and the model apart)."""
    problems = []
    quantized = [f"{key}: {owner.cache_type_v}"
                 for owner, key in ((spec, "cache_type_v"), (spec.draft, "draft.cache_type_v"))
                 if owner is not None and owner.cache_type_v != "f16"]
    if spec.flash_attn == "off" and quantized:
        problems.append(f"models.{name}.flash_attn: off, but a quantized V cache "
                        f"({', '.join(quantized)}) needs flash attention")
    return problems


def _file(given: str, base: Path) -> Path:
    """A model file's absolute path: ``~`` expanded, relative paths taken from ``base``."""
    path = Path(os.path.expanduser(given))
    return path if path.is_absolute() else (base / path).resolve()


def _resolve_keys(
    file: ConfigFile, names: dict[str, str], source: str, base: Path
) -> tuple[ResolvedKey, ...]:
    """Read each key's secret; a missing variable or file is a configuration error."""
    keys, problems = [], []
    for i, key in enumerate(file.auth.keys):
        where = f"auth.keys.{i}"
        secret = key.key
        if key.key_env is not None:
            secret = os.environ.get(key.key_env)
            if not secret:
                problems.append(f"{where}.key_env: environment variable {key.key_env!r} "
                                "is not set or empty")
                continue
        elif key.key_file is not None:
            path = Path(os.path.expanduser(key.key_file))
            path = path if path.is_absolute() else base / path
            try:
                secret = path.read_text(encoding="utf-8").strip()
            except OSError as exc:
                problems.append(f"{where}.key_file: cannot read {str(path)!r}: "
                                f"{exc.strerror or exc}")
                continue
            except UnicodeDecodeError:
                # The decoder's own message quotes the offending bytes, which are the key's.
                problems.append(f"{where}.key_file: {str(path)!r} is not UTF-8 text")
                continue
        if not secret:
            problems.append(f"{where}: the key is empty")
            continue
        if not _header_safe(secret):
            given = next(f for f in ("key", "key_env", "key_file") if getattr(key, f) is not None)
            # Never the key itself, nor the offending character: both would reveal it.
            problems.append(f"{where}.{given}: the key must be printable ASCII without spaces "
                            "at either end (HTTP headers carry no other text reliably)")
            continue
        models = None if key.models is None else frozenset(names[m] for m in key.models)
        keys.append(ResolvedKey(name=key.name or f"key{i}", secret=secret,
                                scopes=frozenset(key.scopes) | (
                                    {"status"} if "admin" in key.scopes else set()),
                                models=models))
    if problems:
        raise ConfigError(source, problems)
    return tuple(keys)


def _header_safe(secret: str) -> bool:
    """Whether a client can present ``secret`` in a header byte for byte: clients encode
    anything but ASCII differently (UTF-8, latin-1), and strip the ends."""
    return secret.isascii() and secret.isprintable() and secret == secret.strip()


def _exposure_problems(file: ConfigFile, keys: tuple[ResolvedKey, ...]) -> list[str]:
    exposed = [h for h in file.listen.hosts if not _is_loopback(h)]
    if keys or file.allow_unauthenticated or not exposed:
        return []
    return [f"listen.host: {exposed[0]!r} is reachable from other machines and no auth.keys are "
            "configured; add keys or set allow_unauthenticated: true"]


# Settings read once at start-up: the socket, the state file and its lock, the ledger of
# devices and headroom, and the log level (structlog caches each logger on first use).
RESTART_ONLY = ("listen", "state_file", "devices", "reserve", "log_level")


def reload_problems(
    running: Config, new: Config, listening_on: str | tuple[str, ...]
) -> list[str]:
    """Why ``new`` cannot replace ``running`` by a reload; empty if it can.

    ``listening_on`` is the host (or hosts) corral is bound to. Exposure is judged against
    it, not the new file's ``listen.host``: a file that says loopback would otherwise pass
    without keys while corral still listens on every interface.
    """
    old_values = dict(_leaves(running.file.model_dump(mode="json", include=set(RESTART_ONLY))))
    new_values = dict(_leaves(new.file.model_dump(mode="json", include=set(RESTART_ONLY))))
    problems = [
        f"{path}: needs a restart (running with {old_values.get(path)!r}, "
        f"the file says {new_values.get(path)!r})"
        for path in sorted(old_values.keys() | new_values.keys())
        if old_values.get(path) != new_values.get(path)
    ]
    hosts = (listening_on,) if isinstance(listening_on, str) else listening_on
    exposed = [h for h in hosts if not _is_loopback(h)]
    if exposed and not (new.api_keys or new.file.allow_unauthenticated):
        problems.append(
            f"auth.keys: corral listens on {exposed[0]!r}, reachable from other machines, and "
            "the file has no auth.keys; add keys or set allow_unauthenticated: true"
        )
    return problems


def _leaves(value: Any, path: str = "") -> Iterator[tuple[str, Any]]:
    """``(key.path, value)`` for each setting in ``value``; a list is one setting."""
    if isinstance(value, dict) and value:
        for key, item in value.items():
            yield from _leaves(item, f"{path}.{key}" if path else key)
    else:
        yield path, value


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


_MESSAGES = {
    "extra_forbidden": "unknown key",
    "missing": "required key is missing",
}


def _describe(exc: ValidationError) -> Iterator[str]:
    """One ``key.path: message, got value`` line per pydantic error."""
    for error in exc.errors(include_url=False):
        loc = [str(part) for part in error["loc"] if not _is_union_tag(part)]
        kind = error["type"]
        ctx = error.get("ctx") or {}
        if kind in _MESSAGES:
            message = _MESSAGES[kind]
        elif kind in ("greater_than_equal", "greater_than", "less_than_equal", "less_than"):
            op = {"greater_than_equal": ">=", "greater_than": ">",
                  "less_than_equal": "<=", "less_than": "<"}[kind]
            bound = next(iter(ctx.values()))
            message = f"must be {op} {bound}"
        elif kind == "value_error":
            message = str(ctx.get("error", error["msg"]))
        else:
            message = error["msg"][0].lower() + error["msg"][1:]
        path = ".".join(_hide_unknown_names(loc))
        if kind == "value_error" and not loc:
            # A cross-field check: its message already names the key path.
            yield message
        elif kind in ("missing", "extra_forbidden"):
            yield f"{path}: {message}"
        else:
            yield f"{path}: {message}, got {_redacted(loc, error['input'])!r}"


REDACTED = "***"
# The only names a mapping under ``auth`` may have; any other one may be a key pasted in the
# wrong place (``auth: {sk-...: ...}``), so it is never echoed, neither in a path nor a value.
_AUTH_NAMES = frozenset(AuthSettings.model_fields) | frozenset(ApiKey.model_fields)


def _redacted(loc: list[str], value: Any) -> Any:
    """``value`` with every API key in it replaced by ``***``.

    Problems reach stderr, the log and the answer to ``POST /admin/reload``, so they must never
    carry a key. Under ``auth`` and each ``auth.keys`` entry a bare scalar is most likely a key
    written in the wrong place, so it is hidden too; the key path still says where to look.
    """
    if loc[:1] != ["auth"]:
        return value  # nothing outside ``auth`` quotes it: the top level must be a mapping
    in_keys = loc[:2] == ["auth", "keys"]
    if in_keys and len(loc) >= 4 and loc[3] == "key":
        return REDACTED
    return _hide_keys(value, bare=loc == ["auth"] or (in_keys and len(loc) <= 3))


def _hide_keys(value: Any, *, bare: bool) -> Any:
    if isinstance(value, dict):
        return {
            (k if k in _AUTH_NAMES else REDACTED):
                REDACTED if k == "key" else _hide_keys(v, bare=k not in _AUTH_NAMES)
            for k, v in value.items()
        }
    if isinstance(value, list):
        return [_hide_keys(v, bare=bare) for v in value]
    return REDACTED if bare else value


def _hide_unknown_names(loc: list[str]) -> list[str]:
    """The key path, with any name under ``auth`` that is not one of its own hidden."""
    if loc[:1] != ["auth"]:
        return loc
    return [part if i == 0 or part.isdigit() or part in _AUTH_NAMES else REDACTED
            for i, part in enumerate(loc)]


def _yaml_problem(exc: yaml.YAMLError) -> str:
    """The parser's complaint and where, without the excerpt of the file that PyYAML adds:
    the excerpt is the offending line, which may be the one holding an API key."""
    if not isinstance(exc, yaml.MarkedYAMLError):
        return str(exc)
    parts = []
    for text, mark in ((exc.context, exc.context_mark), (exc.problem, exc.problem_mark)):
        if text:
            where = "" if mark is None else f" (line {mark.line + 1}, column {mark.column + 1})"
            parts.append(f"{text}{where}")
    return "; ".join(parts) or "cannot be parsed"


def _is_union_tag(part: int | str) -> bool:
    # pydantic puts the union member it tried into the location (``int``, ``literal['auto']``);
    # a user only needs the key path.
    return isinstance(part, str) and (
        part in ("int", "str", "float", "bool") or part.startswith(("literal[", "constrained-"))
    )
