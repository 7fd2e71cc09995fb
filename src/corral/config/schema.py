"""The YAML file's schema as pydantic models, and the resolved per-model ``ModelSpec``.

The schema mirrors the file: ``ConfigFile`` is what the YAML says (unknown keys are errors), with
per-model values optional so they can fall back to ``defaults``. ``ModelSpec`` is what the rest of
corral uses: every value resolved, paths absolute.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Literal

from pydantic import (
    BaseModel,
    ByteSize,
    ConfigDict,
    Field,
    PlainValidator,
    StringConstraints,
    field_validator,
    model_validator,
)

from corral.config.units import Duration, PositiveDuration, Size


def _gpu_layers(value: object) -> int | Literal["auto", "all"]:
    if value == "auto" or value == "all":
        return value
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    raise ValueError("must be 'auto', 'all' or a number of layers >= 0")


def _proxy_address(value: object) -> str:
    try:
        ipaddress.ip_network(value if isinstance(value, str) else "-", strict=False)
    except ValueError:
        raise ValueError("must be an IP address or network, e.g. 10.0.0.5 or 10.0.0.0/24") \
            from None
    assert isinstance(value, str)
    return value


ProxyAddress = Annotated[str, PlainValidator(_proxy_address)]
GpuLayers = Annotated[int | Literal["auto", "all"], PlainValidator(_gpu_layers)]


def _slots(value: object) -> int | Literal["auto"]:
    if value == "auto":
        return "auto"
    if isinstance(value, int) and not isinstance(value, bool):
        if value < 1:
            raise ValueError("must be >= 1")
        if value > 512:
            raise ValueError("must be <= 512")
        return value
    raise ValueError("must be 'auto' or a number of slots")


def _ctx(value: object) -> int | Literal["auto"]:
    # llama-server pads the total context to a multiple of 256 before splitting it over slots;
    # asking for a multiple keeps the planned and the real per-slot context identical.
    if value == "auto":
        return "auto"
    if isinstance(value, int) and not isinstance(value, bool):
        if value < 256 or value % 256:
            raise ValueError("must be a multiple of 256 and >= 256")
        return value
    raise ValueError("must be 'auto' or a number of tokens")


AutoSlots = Annotated[int | Literal["auto"], PlainValidator(_slots)]
AutoCtx = Annotated[int | Literal["auto"], PlainValidator(_ctx)]
CacheType = Literal["f16", "q8_0", "q4_0"]
DeviceId = Annotated[str, StringConstraints(pattern=r"^(cpu|cuda:\d+)$")]
LogLevel = Literal["debug", "info", "warning", "error"]
ModelName = Annotated[str, StringConstraints(min_length=1, pattern=r"^[^\s]+$")]
Slots = Annotated[int, Field(ge=1, le=512)]

# Flags corral computes or owns for every child; setting them in `args` would break routing,
# capacity, the memory estimate or the child's private API key, so the schema refuses them
# with the reason. Every spelling llama.cpp accepts (common/arg.cpp) is listed.
_RESERVED_BY_REASON: dict[str, tuple[str, ...]] = {
    "the model file is `path`": ("-m", "--model"),
    "use `slots`": ("-np", "--parallel"),
    "use `ctx_per_slot`": ("-c", "--ctx-size"),
    "corral binds children to 127.0.0.1": ("--host",),
    "corral picks a free port": ("--port",),
    "corral sets the model name": ("--alias", "-a"),
    "corral gives each child a private key": ("--api-key", "--api-key-file"),
    "use `gpu_layers`": ("-ngl", "--gpu-layers", "--n-gpu-layers"),
    "use `cache_type_k`": ("-ctk", "--cache-type-k"),
    "use `cache_type_v`": ("-ctv", "--cache-type-v"),
    "corral decides the placement and passes --fit off": ("--fit", "-fit"),
    "corral computes the tensor split": ("-ts", "--tensor-split"),
    "corral chooses the split mode": ("-sm", "--split-mode"),
    "use the model's `devices`": ("-dev", "--device", "-mg", "--main-gpu"),
    "the memory estimate assumes corral's batch size": ("-b", "--batch-size"),
    "the memory estimate assumes corral's micro-batch size": ("-ub", "--ubatch-size"),
    "the memory estimate counts the prompt cache corral sets": ("--cache-ram", "-cram"),
    "the memory estimate counts the checkpoints corral sets": (
        "--ctx-checkpoints", "-ctxcp", "--swa-checkpoints",
    ),
    "the memory estimate assumes the default sliding-window cache": ("--swa-full",),
    "the memory estimate assumes the KV cache on the model's devices": (
        "-nkvo", "--no-kv-offload", "-kvo", "--kv-offload",
    ),
    "the memory estimate assumes no expert offload": (
        "--n-cpu-moe", "-ncmoe", "-cmoe", "--cpu-moe",
    ),
    "the memory estimate assumes flash attention as llama-server decides it": (
        "-fa", "--flash-attn",
    ),
    "the memory estimate assumes the tensors where corral places them": (
        "-ot", "--override-tensor",
    ),
    "the memory estimate assumes a KV cache per slot": (
        "-kvu", "--kv-unified", "-no-kvu", "--no-kv-unified", "--kv-unified-per-slot",
    ),
    "the memory estimate assumes llama-server's default op offload": (
        "--no-op-offload", "--op-offload",
    ),
    "corral reads the buffer sizes printed at verbosity 4": (
        "-lv", "--verbosity", "--log-verbosity",
    ),
    "give the projector as a file with --mmproj (nothing is downloaded)": ("-mmu", "--mmproj-url"),
    "the model file is `path` (nothing is downloaded)": (
        "-hf", "-hfr", "--hf-repo", "-hff", "--hf-file", "-mu", "--model-url", "-dr",
        "--docker-repo",
    ),
    "corral is the router: one model per child": (
        "--models-dir", "--models-preset", "--models-max", "--models-autoload",
        "--no-models-autoload",
    ),
    "speculative decoding with a draft model is not supported: its memory is not counted": (
        "-md", "--model-draft", "--spec-draft-model", "-hfd", "-hfrd", "--hf-repo-draft",
        "--spec-draft-hf",
    ),
}
RESERVED_FLAGS = {flag: why for why, flags in _RESERVED_BY_REASON.items() for flag in flags}


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _args_as_text(value: object) -> object:
    # YAML reads `[--threads, 4]` as a string and a number; a command line is all text.
    if isinstance(value, list):
        return [str(v) if isinstance(v, int | float) and not isinstance(v, bool) else v
                for v in value]
    return value


def _check_args(args: list[str]) -> list[str]:
    for arg in args:
        flag = arg.split("=", 1)[0]
        if flag in RESERVED_FLAGS:
            raise ValueError(f"{flag!r} is set by corral ({RESERVED_FLAGS[flag]})")
    return args


class Listen(StrictModel):
    host: str = "127.0.0.1"
    port: int = Field(default=8080, ge=0, le=65535)
    # Proxies whose X-Forwarded-For / X-Forwarded-Proto corral believes; from anyone else (the
    # loopback included) those headers are ignored, so a client cannot pose as another address.
    trusted_proxies: list[ProxyAddress] = Field(default_factory=list)


# Variables corral sets for each child from its plan, or that would override a flag where
# corral cannot check it (llama-server reads LLAMA_ARG_* for any flag not on the command line).
_RESERVED_ENV = {
    "CUDA_VISIBLE_DEVICES": "use the model's `devices`",
    "CUDA_DEVICE_ORDER": "corral numbers GPUs by PCI bus id, as NVML does",
    "LLAMA_API_KEY": "corral gives each child a private key",
}


def _check_env(env: dict[str, str]) -> dict[str, str]:
    for name in env:
        if name in _RESERVED_ENV:
            raise ValueError(f"{name!r} is set by corral ({_RESERVED_ENV[name]})")
        if name.startswith("LLAMA_ARG_"):
            raise ValueError(f"{name!r}: give llama-server flags in `args`, where corral "
                             "checks them")
    return env


class LlamaServerSettings(StrictModel):
    binary: str = "llama-server"
    startup_timeout: PositiveDuration = 120.0
    stop_timeout: PositiveDuration = 10.0
    args: list[str] = Field(default_factory=list)
    env: dict[str, str] = Field(default_factory=dict)

    _args_text = field_validator("args", mode="before")(_args_as_text)
    _args = field_validator("args")(_check_args)
    _env = field_validator("env")(_check_env)


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
    slots: AutoSlots = 4
    max_slots: Slots = 16  # the most `slots: auto` may choose
    ctx_per_slot: AutoCtx = 4096
    gpu_layers: GpuLayers = "auto"
    cache_type_k: CacheType = "f16"
    cache_type_v: CacheType = "f16"


class ModelConfig(StrictModel):
    path: str
    aliases: list[ModelName] = Field(default_factory=list)
    binary: str | None = None  # this model's llama-server build, e.g. one built for its GPU
    ttl: Duration | None = None
    slots: AutoSlots | None = None
    max_slots: Slots | None = None
    ctx_per_slot: AutoCtx | None = None
    gpu_layers: GpuLayers | None = None
    cache_type_k: CacheType | None = None
    cache_type_v: CacheType | None = None
    devices: list[DeviceId] | None = None  # pin to these devices ("cpu" allows CPU layers)
    queue: QueueOverrides = Field(default_factory=QueueOverrides)
    pinned: bool = False  # never evicted; restarted after a crash even when nobody waits
    args: list[str] = Field(default_factory=list)
    env: dict[str, str] = Field(default_factory=dict)
    preload: bool = False

    _args_text = field_validator("args", mode="before")(_args_as_text)
    _args = field_validator("args")(_check_args)
    _env = field_validator("env")(_check_env)

    @field_validator("path")
    @classmethod
    def _path_not_empty(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must not be empty")
        return value


class HealthSettings(StrictModel):
    """Liveness probes of ready children: ``failures`` missed probes in a row mean hung."""

    interval: PositiveDuration = 5.0
    failures: Annotated[int, Field(ge=1)] = 3


class RestartSettings(StrictModel):
    """Give up on a model after ``max_failures`` failed loads or crashes within ``window``."""

    max_failures: Annotated[int, Field(ge=1)] = 5
    window: PositiveDuration = 600.0


class UpstreamSettings(StrictModel):
    """Timeouts towards children. ``read_timeout`` is the longest silence between two chunks
    of a streamed answer. A non-streamed answer is silent until it is complete, so instead it
    gets ``generation_timeout`` for the whole answer (0: none): a child whose health endpoint
    still answers while its decoding is stuck cannot hold a request forever."""

    connect_timeout: PositiveDuration = 5.0
    read_timeout: PositiveDuration = 600.0
    generation_timeout: Duration = 3600.0


class LimitSettings(StrictModel):
    max_body: Size = Field(default=ByteSize(16 * 2**20))
    # The request line and headers together, and how many header lines (431 beyond either).
    max_header_bytes: Size = Field(default=ByteSize(64 * 2**10), ge=1024)
    max_headers: int = Field(default=100, ge=1)
    # A client must send its request line and headers, then its body, within these.
    header_timeout: PositiveDuration = 10.0
    body_timeout: PositiveDuration = 30.0
    # An open connection with no request on it is closed after this.
    idle_timeout: PositiveDuration = 75.0
    # A response the client reads nothing of for this long is cut, and its slot freed.
    write_timeout: PositiveDuration = 60.0


Scope = Literal["inference", "admin"]


def _default_scopes() -> list[Scope]:
    return ["inference"]


class ApiKey(StrictModel):
    """One API key, given directly (``key``), by environment variable or by file."""

    key: str | None = Field(default=None, repr=False)
    key_env: str | None = None
    key_file: str | None = None
    name: str | None = None  # shown in logs instead of the key
    scopes: list[Scope] = Field(default_factory=lambda: _default_scopes())
    models: list[str] | None = None  # None: every model

    @model_validator(mode="after")
    def _one_source(self) -> ApiKey:
        given = [k for k in ("key", "key_env", "key_file") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError("give exactly one of key, key_env, key_file")
        return self


class AuthSettings(StrictModel):
    keys: list[ApiKey] = Field(default_factory=list)
    # Without keys these are open anyway; with keys, these switches leave them open.
    public_metrics: bool = False
    public_health: bool = True


class DeviceConfig(StrictModel):
    """A device declared instead of discovered: ``cuda:N`` or ``cpu`` (the host RAM budget)."""

    id: DeviceId
    memory: Size


class ReserveSettings(StrictModel):
    """Headroom corral never plans into, per GPU and on the host."""

    gpu: Size = Field(default=ByteSize(512 * 2**20))
    ram: Size = Field(default=ByteSize(2**30))


class ConfigFile(StrictModel):
    listen: Listen = Field(default_factory=Listen)
    llama_server: LlamaServerSettings = Field(default_factory=LlamaServerSettings)
    defaults: ModelDefaults = Field(default_factory=ModelDefaults)
    models: dict[ModelName, ModelConfig]
    default_model: str | None = None
    shutdown_timeout: PositiveDuration = 30.0
    log_level: LogLevel = "info"
    state_file: str | None = None
    health: HealthSettings = Field(default_factory=HealthSettings)
    restart: RestartSettings = Field(default_factory=RestartSettings)
    upstream: UpstreamSettings = Field(default_factory=UpstreamSettings)
    limits: LimitSettings = Field(default_factory=LimitSettings)
    auth: AuthSettings = Field(default_factory=AuthSettings)
    allow_unauthenticated: bool = False
    devices: list[DeviceConfig] | None = None  # None: discover (NVML GPUs and system RAM)
    reserve: ReserveSettings = Field(default_factory=ReserveSettings)
    placement: Literal["binpack", "spread"] = "binpack"

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
        if self.devices is not None:
            ids = [d.id for d in self.devices]
            if "cpu" not in ids:
                raise ValueError("devices: declare the host too, e.g. {id: cpu, memory: 64GiB}")
            if len(set(ids)) != len(ids):
                raise ValueError(f"devices: each id may appear once, got {ids}")
            for i, d in enumerate(self.devices):
                reserve, which = ((self.reserve.ram, "reserve.ram") if d.id == "cpu"
                                  else (self.reserve.gpu, "reserve.gpu"))
                if d.memory <= reserve:
                    raise ValueError(
                        f"devices.{i}.memory: {d.memory.human_readable(separator=' ')} "
                        f"leaves nothing once {which} "
                        f"({reserve.human_readable(separator=' ')}) is set aside")
            for name, model in self.models.items():
                for device in model.devices or ():
                    if device not in ids:
                        raise ValueError(f"models.{name}.devices: {device!r} is not a declared "
                                         f"device ({', '.join(ids)})")
        for i, key in enumerate(self.auth.keys):
            for name in key.models or ():
                if name not in owner:
                    raise ValueError(
                        f"auth.keys.{i}.models: {name!r} is not a configured model or alias"
                    )
        return self


@dataclass(frozen=True)
class ModelSpec:
    """One model with every setting resolved: what the supervisor needs to start its child."""

    name: str
    path: Path
    aliases: tuple[str, ...] = ()
    binary: str | None = None  # None: llama_server.binary
    ttl: float = 600.0
    slots: int | Literal["auto"] = 4
    ctx_per_slot: int | Literal["auto"] = 4096
    gpu_layers: int | Literal["auto", "all"] = "auto"
    max_slots: int = 16
    cache_type_k: str = "f16"
    cache_type_v: str = "f16"
    devices: tuple[str, ...] | None = None
    args: tuple[str, ...] = ()
    env: dict[str, str] = field(default_factory=dict)
    preload: bool = False
    pinned: bool = False
    queue_max: int | None = None  # None: 4 x slots
    queue_timeout: float = 60.0

    def queue_limit(self, slots: int) -> int:
        """How many requests may wait for ``slots`` busy slots."""
        return 4 * slots if self.queue_max is None else self.queue_max

    @property
    def projector(self) -> str | None:
        """The multimodal projector file its args give (``--mmproj``), if any."""
        args = self.args
        for i, arg in enumerate(args):
            if arg in _MMPROJ_FLAGS and i + 1 < len(args):
                return args[i + 1]
            if arg.startswith("--mmproj="):
                return arg.split("=", 1)[1]
        return None

    @property
    def multimodal(self) -> bool:
        """Whether the child gets a multimodal projector, so it can take images and audio."""
        return self.projector is not None


_MMPROJ_FLAGS = frozenset({"--mmproj", "-mm"})


@dataclass(frozen=True)
class ResolvedKey:
    """An API key with its secret read (from the file, the environment or the config)."""

    name: str
    secret: str = field(repr=False)
    scopes: frozenset[str]
    models: frozenset[str] | None  # canonical model names; None: all
