"""The YAML file's schema as pydantic models, and the resolved per-model ``ModelSpec``.

The schema mirrors the file: ``ConfigFile`` is what the YAML says (unknown keys are errors), with
per-model values optional so they can fall back to ``defaults``. ``ModelSpec`` is what the rest of
corral uses: every value resolved, paths absolute.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PlainValidator,
    StringConstraints,
    field_validator,
    model_validator,
)

from corral.config.units import Duration, PositiveDuration


def _gpu_layers(value: object) -> int | Literal["auto", "all"]:
    if value == "auto" or value == "all":
        return value
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    raise ValueError("must be 'auto', 'all' or a number of layers >= 0")


GpuLayers = Annotated[int | Literal["auto", "all"], PlainValidator(_gpu_layers)]
LogLevel = Literal["debug", "info", "warning", "error"]
ModelName = Annotated[str, StringConstraints(min_length=1, pattern=r"^[^\s]+$")]
Slots = Annotated[int, Field(ge=1, le=512)]

# Flags corral computes or owns for every child; setting them in `args` would break routing,
# capacity or the child's private API key, so the schema refuses them with the reason.
RESERVED_FLAGS = {
    "-m": "the model file is `path`",
    "--model": "the model file is `path`",
    "-np": "use `slots`",
    "--parallel": "use `slots`",
    "-c": "use `ctx_per_slot`",
    "--ctx-size": "use `ctx_per_slot`",
    "--host": "corral binds children to 127.0.0.1",
    "--port": "corral picks a free port",
    "--alias": "corral sets the model name",
    "-a": "corral sets the model name",
    "--api-key": "corral gives each child a private key",
    "--api-key-file": "corral gives each child a private key",
}


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _check_args(args: list[str]) -> list[str]:
    for arg in args:
        flag = arg.split("=", 1)[0]
        if flag in RESERVED_FLAGS:
            raise ValueError(f"{flag!r} is set by corral ({RESERVED_FLAGS[flag]})")
    return args


def _check_ctx(value: int | None) -> int | None:
    # llama-server pads the total context to a multiple of 256 before splitting it over slots;
    # asking for a multiple keeps the planned and the real per-slot context identical.
    if value is not None and (value < 256 or value % 256):
        raise ValueError("must be a multiple of 256 and >= 256")
    return value


class Listen(StrictModel):
    host: str = "127.0.0.1"
    port: int = Field(default=8080, ge=0, le=65535)


class LlamaServerSettings(StrictModel):
    binary: str = "llama-server"
    startup_timeout: PositiveDuration = 120.0
    stop_timeout: PositiveDuration = 10.0
    args: list[str] = Field(default_factory=list)
    env: dict[str, str] = Field(default_factory=dict)

    _args = field_validator("args")(_check_args)


class QueueSettings(StrictModel):
    """The admission queue in front of a model's slots."""

    max: Annotated[int, Field(ge=0)] | None = None  # None: 4 x slots
    timeout: PositiveDuration = 60.0


class QueueOverrides(StrictModel):
    max: Annotated[int, Field(ge=0)] | None = None
    timeout: PositiveDuration | None = None


class ModelDefaults(StrictModel):
    ttl: Duration = 600.0
    queue: QueueSettings = Field(default_factory=QueueSettings)
    slots: Slots = 4
    ctx_per_slot: int = 4096
    gpu_layers: GpuLayers = "auto"

    _ctx = field_validator("ctx_per_slot")(_check_ctx)


class ModelConfig(StrictModel):
    path: str
    aliases: list[ModelName] = Field(default_factory=list)
    ttl: Duration | None = None
    slots: Slots | None = None
    ctx_per_slot: int | None = None
    gpu_layers: GpuLayers | None = None
    queue: QueueOverrides = Field(default_factory=QueueOverrides)
    args: list[str] = Field(default_factory=list)
    env: dict[str, str] = Field(default_factory=dict)
    preload: bool = False

    _args = field_validator("args")(_check_args)
    _ctx = field_validator("ctx_per_slot")(_check_ctx)

    @field_validator("path")
    @classmethod
    def _path_not_empty(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must not be empty")
        return value


class ConfigFile(StrictModel):
    listen: Listen = Field(default_factory=Listen)
    llama_server: LlamaServerSettings = Field(default_factory=LlamaServerSettings)
    defaults: ModelDefaults = Field(default_factory=ModelDefaults)
    models: dict[ModelName, ModelConfig]
    default_model: str | None = None
    shutdown_timeout: PositiveDuration = 30.0
    log_level: LogLevel = "info"
    state_file: str | None = None

    @model_validator(mode="after")
    def _names_are_unique(self) -> ConfigFile:
        owner: dict[str, str] = {name: name for name in self.models}
        for name, model in self.models.items():
            for alias in model.aliases:
                if alias in owner and owner[alias] != name:
                    raise ValueError(
                        f"models.{name}.aliases: {alias!r} is already the name or an alias "
                        f"of model {owner[alias]!r}"
                    )
                owner[alias] = name
        if self.default_model is not None and self.default_model not in owner:
            raise ValueError(
                f"default_model: {self.default_model!r} is not a configured model or alias"
            )
        return self


@dataclass(frozen=True)
class ModelSpec:
    """One model with every setting resolved: what the supervisor needs to start its child."""

    name: str
    path: Path
    aliases: tuple[str, ...] = ()
    ttl: float = 600.0
    slots: int = 4
    ctx_per_slot: int = 4096
    gpu_layers: int | Literal["auto", "all"] = "auto"
    args: tuple[str, ...] = ()
    env: dict[str, str] = field(default_factory=dict)
    preload: bool = False
    queue_max: int | None = None  # None: 4 x slots
    queue_timeout: float = 60.0

    def queue_limit(self, slots: int) -> int:
        """How many requests may wait for ``slots`` busy slots."""
        return 4 * slots if self.queue_max is None else self.queue_max
