"""The README's configuration reference against the schema: the yaml block and the
``| key | default | meaning |`` table must state the defaults the code declares, and document
every per-model setting."""

from __future__ import annotations

import re
import typing
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any

import pytest
import yaml
from pydantic import BaseModel, TypeAdapter
from pydantic.fields import FieldInfo

from corral.config.schema import ConfigFile, ModelConfig, ModelSettings

README = Path(__file__).resolve().parents[2] / "README.md"

# Values the yaml block shows as examples of what a file may say, not as defaults.
EXAMPLES = {"default_model", "auth.keys", "devices", "models.*.path", "models.*.aliases",
            "models.*.args", "models.*.hf", "models.*.file", "models.*.ollama"}
REQUIRED = object()
# What the table's words for a default mean in the code.
PROSE = {"required": REQUIRED, "none": None, "4 x slots": None, "discovered": None, "any": None}


def is_example(path: str) -> bool:
    """Under `models.*`, each setting is an example of overriding `defaults:`, whose own
    values are the defaults checked."""
    parts = path.split(".")
    in_a_model = parts[:2] == ["models", "*"] and parts[2] in ModelSettings.model_fields
    return path in EXAMPLES or in_a_model


def reference() -> str:
    text = README.read_text(encoding="utf-8")
    start = text.index("## Configuration reference")
    return text[start:text.index("\n## ", start + 1)]


def yaml_block() -> dict[str, Any]:
    found = re.search(r"```yaml\n(.*?)```", reference(), re.S)
    assert found, "no yaml block under Configuration reference"
    data = yaml.safe_load(found.group(1))
    assert isinstance(data, dict)
    return data


def table() -> list[tuple[str, str]]:
    """``(key path, default as written)`` for each key the table names."""
    lines = reference().splitlines()
    start = lines.index("| key | default | meaning |")
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        keys_cell, default_cell = (cell.strip() for cell in line.strip("|").split("|")[:2])
        keys = [k.removesuffix("[]") for k in re.findall(r"`([^`]+)`", keys_cell)]
        defaults = re.findall(r"`([^`]+)`", default_cell) or [default_cell]
        if len(defaults) == 1:
            defaults = defaults * len(keys)
        assert len(defaults) == len(keys), f"cannot pair keys and defaults in {line!r}"
        for key, default in zip(keys, defaults, strict=True):
            # `*.max_slots`: the same setting in `defaults:` and in each model.
            both = (f"defaults.{key[2:]}", f"models.{key}") if key.startswith("*.") else (key,)
            rows += [(path, default) for path in both]
    return rows


def model_class(field: FieldInfo) -> type[BaseModel] | None:
    """The settings class a field holds (``models`` holds ``ModelConfig`` by name), or None."""
    kind = field.annotation
    if typing.get_origin(kind) is dict:
        kind = typing.get_args(kind)[1]
    return kind if isinstance(kind, type) and issubclass(kind, BaseModel) else None


def field_at(path: str) -> FieldInfo:
    owner: type[BaseModel] = ConfigFile
    parts = [p for p in path.split(".") if p != "*"]
    for i, part in enumerate(parts):
        assert part in owner.model_fields, f"{path}: no such key in the schema"
        field = owner.model_fields[part]
        if i < len(parts) - 1:
            inner = model_class(field)
            assert inner is not None, f"{path}: {part} has no keys"
            owner = inner
    return field


def code_default(field: FieldInfo) -> Any:
    return REQUIRED if field.is_required() else field.get_default(call_default_factory=True)


def as_code_reads(field: FieldInfo, value: Any) -> Any:
    """``value`` as the file would give it, validated to what the code holds (``10m``: 600.0)."""
    kind = Annotated[(field.annotation, *field.metadata)] if field.metadata else field.annotation
    return TypeAdapter(kind).validate_python(value)


def leaves(data: dict[str, Any], owner: type[BaseModel] = ConfigFile,
           prefix: str = "") -> Iterator[tuple[str, Any]]:
    """``(key path, value)`` for each setting the yaml block gives; models' names become ``*``."""
    for key, value in data.items():
        path = f"{prefix}{key}"
        assert key in owner.model_fields, f"{path}: the README documents an unknown key"
        inner = model_class(owner.model_fields[key])
        if path == "models":
            for model in value.values():
                yield from leaves(model, ModelConfig, "models.*.")
        elif inner is not None and isinstance(value, dict) and not is_example(path):
            yield from leaves(value, inner, f"{path}.")
        else:
            yield path, value


def settings_paths(owner: type[BaseModel], prefix: str) -> Iterator[str]:
    """Every key path of ``owner``'s settings, groups (``queue``) opened."""
    for name, field in owner.model_fields.items():
        inner = model_class(field)
        if inner is None:
            yield f"{prefix}{name}"
        else:
            yield from settings_paths(inner, f"{prefix}{name}.")


def test_the_yaml_block_is_a_valid_file() -> None:
    ConfigFile.model_validate(yaml_block())


@pytest.mark.parametrize(("path", "written"), [
    (path, value) for path, value in leaves(yaml_block()) if not is_example(path)
])
def test_the_yaml_block_states_the_code_s_default(path: str, written: Any) -> None:
    field = field_at(path)
    assert as_code_reads(field, written) == code_default(field), (
        f"README says {path}: {written!r}, the code's default is {code_default(field)!r}")


def test_the_yaml_block_shows_every_key_of_defaults_and_of_a_model() -> None:
    shown = {path for path, _ in leaves(yaml_block())}
    wanted = set(settings_paths(ModelSettings, "defaults."))
    wanted |= {f"models.*.{name}" for name in ModelConfig.model_fields
               if name not in ModelSettings.model_fields}
    assert wanted - shown == set(), "document these in the README's yaml block"


@pytest.mark.parametrize(("path", "written"), table())
def test_the_table_states_the_code_s_default(path: str, written: str) -> None:
    field = field_at(path)
    expected = code_default(field)
    if written in PROSE:
        meant = PROSE[written]
        # "none" also says that an empty list is the default: no keys.
        ok = expected == meant or (written == "none" and expected == [])
    else:
        meant = as_code_reads(field, yaml.safe_load(written))
        ok = meant == expected
    assert ok, f"README's table says {path} defaults to {written!r}, the code to {expected!r}"


def test_the_table_lists_every_per_model_setting_for_defaults_and_models() -> None:
    listed = {path for path, _ in table()}
    for path in settings_paths(ModelSettings, ""):
        assert {f"defaults.{path}", f"models.*.{path}"} <= listed, (
            f"add `defaults.{path}` / `models.*.{path}` to the README's table")


@pytest.mark.parametrize("path", sorted(EXAMPLES))
def test_each_example_is_in_the_yaml_block(path: str) -> None:
    # An example that left the block would no longer need excusing from the checks above.
    assert path in {p for p, _ in leaves(yaml_block())}
