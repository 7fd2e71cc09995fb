"""The YAML file's schema as pydantic models, and the resolved per-model ``ModelSpec``.

The schema mirrors the file: ``ConfigFile`` is what the YAML says (unknown keys are errors), with
per-model values optional so they can fall back to ``defaults``. ``ModelSpec`` is what the rest of
corral uses: every value resolved, paths absolute.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Literal, TypeVar

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

from corral.config.sources import Source, parse_hf, parse_ollama
from corral.config.tuning import (
    CpuMoe,
    DraftSettings,
    FlashAttn,
    SplitMode,
    TensorOverride,
    TensorSplit,
)
from corral.config.units import Duration, PositiveDuration, Size
from corral.config.web import AllowedHost, CorsSettings
from corral.llamacpp.flags import MMPROJ_FLAGS, check_args, check_env
from corral.llamacpp.tuning import lift_tuning_flags


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
Placement = Literal["binpack", "spread"]
DEFAULT_PLACEMENT: Placement = "binpack"  # `placement:`, and a placement request's without one
ModelName = Annotated[str, StringConstraints(min_length=1, pattern=r"^[^\s]+$")]
Slots = Annotated[int, Field(ge=1, le=512)]
# When a model named by a source (hf:, ollama:) gets its files: in the background as corral
# starts, on the first request for it, or only by `corral pull`.
DownloadWhen = Literal["startup", "request", "manual"]



class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _args_as_text(value: object) -> object:
    # YAML reads `[--threads, 4]` as a string and a number; a command line is all text.
    if isinstance(value, list):
        return [str(v) if isinstance(v, int | float) and not isinstance(v, bool) else v
                for v in value]
    return value


def _listen_host(value: object) -> str | list[str]:
    # One address or several (llama-server's `--host 127.0.0.1,::1`): a socket on each.
    given = value if isinstance(value, list) else [value]
    hosts: list[str] = []
    for host in given:
        if not isinstance(host, str) or not host.strip() or host != host.strip():
            raise ValueError(f"must be addresses or host names without spaces, got {host!r}")
        hosts.append(host)
    if not hosts:
        raise ValueError("must be an address or a non-empty list of addresses")
    if len(set(hosts)) != len(hosts):
        raise ValueError(f"lists an address twice: {hosts}")
    return hosts[0] if isinstance(value, str) else hosts


ListenHost = Annotated[str | list[str], PlainValidator(_listen_host)]


class Listen(StrictModel):
    host: ListenHost = "127.0.0.1"
    port: int = Field(default=8080, ge=0, le=65535)
    # Proxies whose X-Forwarded-For / X-Forwarded-Proto corral believes; from anyone else (the
    # loopback included) those headers are ignored, so a client cannot pose as another address.
    trusted_proxies: list[ProxyAddress] = Field(default_factory=list)

    @property
    def hosts(self) -> tuple[str, ...]:
        """Every address corral listens on (``host`` as one or a list)."""
        return (self.host,) if isinstance(self.host, str) else tuple(self.host)


class LlamaServerSettings(StrictModel):
    binary: str = "llama-server"
    startup_timeout: PositiveDuration = 120.0
    stop_timeout: PositiveDuration = 10.0
    args: list[str] = Field(default_factory=list)
    env: dict[str, str] = Field(default_factory=dict)

    _args_text = field_validator("args", mode="before")(_args_as_text)
    _args = field_validator("args")(check_args)
    _env = field_validator("env")(check_env)


class QueueSettings(StrictModel):
    """The admission queue in front of a model's slots."""

    max: Annotated[int, Field(ge=0)] | None = None  # None: 4 x slots
    timeout: PositiveDuration = 60.0


class ModelSettings(StrictModel):
    """The settings a model may take from ``defaults:`` or set itself, each declared once here
    with its default.

    ``defaults:`` is one of these; each model is one too (``ModelConfig``), with the same keys
    beside its own. A setting resolves to the model's value if it gives one, else the value in
    ``defaults:``, else the default declared here; a group of settings (``queue``) resolves key
    by key (``resolve_settings``). A new setting is one more field here: the file reads it in
    both places, ``ModelSpec`` and the placement request carry it.
    """

    ttl: Duration = 600.0
    queue: QueueSettings = Field(default_factory=QueueSettings)
    slots: AutoSlots = 4
    max_slots: Slots = 16  # the most `slots: auto` may choose
    ctx_per_slot: AutoCtx = 4096
    gpu_layers: GpuLayers = "auto"
    cache_type_k: CacheType = "f16"
    cache_type_v: CacheType = "f16"
    # llama-server's tuning (corral.config.tuning); each also read from its flag in `args`.
    batch_size: Annotated[int, Field(ge=1)] = 2048
    ubatch_size: Annotated[int, Field(ge=1)] = 512
    flash_attn: FlashAttn = "auto"
    cpu_moe: CpuMoe = 0
    cpu_ffn: Annotated[int, Field(ge=0)] = 0
    tensor_overrides: tuple[TensorOverride, ...] = ()
    draft: DraftSettings | None = None
    kv_unified: bool = False
    kv_offload: bool = True
    swa_full: bool = False
    ctx_checkpoints: Annotated[int, Field(ge=0)] = 2
    prompt_cache: Size = Field(default=ByteSize(0))
    tensor_split: TensorSplit = None
    split_mode: SplitMode = "layer"
    download: DownloadWhen = "request"
    # While a model downloads, a request for it waits (up to its queue.timeout) instead of
    # getting 503 with the progress so far.
    download_wait: bool = False
    # Where Hugging Face files go: None is the standard cache (HF_HUB_CACHE), shared with other
    # tools; a directory keeps them as plain files there.
    download_dir: str | None = None


def _group(settings: type[BaseModel], key: str) -> type[BaseModel] | None:
    """The class of ``key`` when it is a group of settings (``queue``), else None."""
    field = settings.model_fields.get(key)
    kind = None if field is None else field.annotation
    return kind if isinstance(kind, type) and issubclass(kind, BaseModel) else None


def _without_nulls(data: object, settings: type[BaseModel]) -> object:
    """``data`` without the ``settings`` it gives as null, groups opened (``queue.max``)."""
    if not isinstance(data, dict):
        return data
    kept = {}
    for key, value in data.items():
        group = _group(settings, key)
        if group is not None:
            value = _without_nulls(value, group)
        elif value is None and key in settings.model_fields:
            continue
        kept[key] = value
    return kept


_Settings = TypeVar("_Settings", bound=BaseModel)


def resolve_settings(below: _Settings, above: BaseModel) -> _Settings:
    """``below`` with each setting ``above`` gives (``model_fields_set``) in its place; a group
    of settings resolves key by key. ``resolve_settings(defaults, model)``: what a model runs
    with."""
    update: dict[str, object] = {}
    for name in above.model_fields_set & type(below).model_fields.keys():
        value, under = getattr(above, name), getattr(below, name)
        if isinstance(value, BaseModel) and isinstance(under, BaseModel):
            value = resolve_settings(under, value)
        update[name] = value
    return below.model_copy(update=update)


class ModelConfig(ModelSettings):
    """One entry of ``models:``: the settings it gives, beside the keys only a model has."""

    path: str | None = None
    # Instead of path: a Hugging Face repository (owner/repo:Q4_K_M, or owner/repo with file),
    # pinned to a revision if given; or an Ollama model name read from Ollama's store.
    hf: str | None = None
    file: str | None = None
    revision: str | None = None
    ollama: str | None = None
    aliases: list[ModelName] = Field(default_factory=list)
    binary: str | None = None  # this model's llama-server build, e.g. one built for its GPU
    devices: list[DeviceId] | None = None  # pin to these devices ("cpu" allows CPU layers)
    pinned: bool = False  # never evicted; restarted after a crash even when nobody waits
    args: list[str] = Field(default_factory=list)
    env: dict[str, str] = Field(default_factory=dict)
    preload: bool = False

    _args_text = field_validator("args", mode="before")(_args_as_text)
    _args = field_validator("args")(check_args)
    _env = field_validator("env")(check_env)

    @model_validator(mode="before")
    @classmethod
    def _null_is_unset(cls, data: object) -> object:
        # A null per-model setting means "take it from `defaults:`", as an absent one does; a
        # whole group given as null (`queue: null`) stays, and is refused.
        return _without_nulls(data, ModelSettings)

    @field_validator("path")
    @classmethod
    def _path_not_empty(cls, value: str | None) -> str | None:
        if value is not None and not value.strip():
            raise ValueError("must not be empty")
        return value

    @field_validator("hf")
    @classmethod
    def _hf_repo(cls, value: str | None) -> str | None:
        if value is not None:
            parse_hf(value)
        return value

    @field_validator("ollama")
    @classmethod
    def _ollama_name(cls, value: str | None) -> str | None:
        if value is not None:
            parse_ollama(value)
        return value

    @model_validator(mode="after")
    def _one_source(self) -> ModelConfig:
        given = [k for k in ("path", "hf", "ollama") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError("give exactly one of path, hf (owner/repo:QUANT), ollama (name:tag)"
                             + (f" (it gives {' and '.join(given)})" if given else ""))
        if self.hf is None and (self.file is not None or self.revision is not None):
            raise ValueError("file and revision apply to hf: models only")
        if self.hf is not None:
            parse_hf(self.hf, self.file, self.revision)  # file and quantization together
        return self

    @property
    def source(self) -> Source | None:
        """Where its files come from, or None for a local ``path``."""
        if self.hf is not None:
            return parse_hf(self.hf, self.file, self.revision)
        if self.ollama is not None:
            return parse_ollama(self.ollama)
        return None


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


# "status": read-only (GET /admin/status, GET /admin/models, /metrics), for a picker or a
# Prometheus that must not unload or reload anything; "admin" includes it.
Scope = Literal["inference", "status", "admin"]


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
        wide = [s for s in self.scopes if s in ("status", "admin")]
        if self.models is not None and wide:
            # /admin/status and /metrics name every model: the list could not hold.
            raise ValueError(f"a key with the {wide[0]!r} scope sees every model, so it cannot "
                             "have a models list: give the clients limited to some models a "
                             "key of their own")
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
    defaults: ModelSettings = Field(default_factory=ModelSettings)
    models: dict[ModelName, ModelConfig]
    default_model: str | None = None
    # A request naming a model corral does not know goes to default_model, as a single
    # llama-server ignores the name; off: 404.
    unknown_model_to_default: bool = False
    shutdown_timeout: PositiveDuration = 30.0
    log_level: LogLevel = "info"
    state_file: str | None = None
    health: HealthSettings = Field(default_factory=HealthSettings)
    restart: RestartSettings = Field(default_factory=RestartSettings)
    upstream: UpstreamSettings = Field(default_factory=UpstreamSettings)
    limits: LimitSettings = Field(default_factory=LimitSettings)
    auth: AuthSettings = Field(default_factory=AuthSettings)
    allow_unauthenticated: bool = False
    # Host names corral answers to besides IP addresses, localhost and listen.host (DNS
    # rebinding); web pages that may call it from a browser.
    allowed_hosts: list[AllowedHost] = Field(default_factory=list)
    cors: CorsSettings = Field(default_factory=CorsSettings)
    devices: list[DeviceConfig] | None = None  # None: discover (NVML GPUs and system RAM)
    reserve: ReserveSettings = Field(default_factory=ReserveSettings)
    placement: Placement = DEFAULT_PLACEMENT

    @model_validator(mode="before")
    @classmethod
    def _tuning_flags_are_settings(cls, data: object) -> object:
        return lift_tuning_flags(data, ModelSettings)

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
        if self.unknown_model_to_default and self.default_model is None:
            raise ValueError("unknown_model_to_default: needs a default_model to send the "
                             "requests to")
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


class ModelSpec(ModelSettings):
    """One model with every setting resolved: what the supervisor needs to start its child."""

    name: str
    path: Path | None  # absolute; None: its source gives it once fetched (see ``source``)
    source: Source | None = None  # hf: or ollama:, else None (a local path)
    aliases: tuple[str, ...]
    binary: str | None  # None: llama_server.binary
    devices: tuple[str, ...] | None
    args: tuple[str, ...]  # llama_server.args, then the model's
    env: dict[str, str]  # llama_server.env, updated by the model's
    preload: bool
    pinned: bool

    @property
    def settings(self) -> ModelSettings:
        """Its resolved settings alone (what placement and ``/admin/models`` need)."""
        return ModelSettings(**{name: getattr(self, name) for name in ModelSettings.model_fields})

    @property
    def queue_max(self) -> int | None:
        """``queue.max``: how many may wait; None: 4 x slots."""
        return self.queue.max

    @property
    def queue_timeout(self) -> float:
        """``queue.timeout``: the longest wait for a slot, in seconds."""
        return self.queue.timeout

    def queue_limit(self, slots: int) -> int:
        """How many requests may wait for ``slots`` busy slots."""
        return 4 * slots if self.queue_max is None else self.queue_max

    @property
    def projector(self) -> str | None:
        """The multimodal projector file its args give (``--mmproj``), if any."""
        args = self.args
        for i, arg in enumerate(args):
            if arg in MMPROJ_FLAGS and i + 1 < len(args):
                return args[i + 1]
            if arg.startswith("--mmproj="):
                return arg.split("=", 1)[1]
        return None

    @property
    def multimodal(self) -> bool:
        """Whether the child gets a multimodal projector, so it can take images and audio."""
        return self.projector is not None



@dataclass(frozen=True)
class ResolvedKey:
    """An API key with its secret read (from the file, the environment or the config)."""

    name: str
    secret: str = field(repr=False)
    scopes: frozenset[str]
    models: frozenset[str] | None  # canonical model names; None: all
