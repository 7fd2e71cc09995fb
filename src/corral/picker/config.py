"""The picker's configuration (``corral picker -c picker.yaml``), validated at the edge.

Example::

    listen: {grpc: {host: 0.0.0.0, port: 9002}, http: {host: 0.0.0.0, port: 9003}}
    pods: ["10.0.0.5:8080", "10.0.0.6:8080"]      # or:
    # pods: {kubernetes: {namespace: llm, service: corral, port: 8080}}
    api_key_env: CORRAL_API_KEY                    # or api_key: "..." (not recommended)
    refresh: 1s
    fail_open: true
    affinity: {header: x-session-id, max_load: 1.25}
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from corral.config.units import PositiveDuration
from corral.errors import ConfigError


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Address(_Strict):
    """A host and port to listen on."""

    host: str = "127.0.0.1"
    port: int = Field(ge=0, le=65535)


class Listen(_Strict):
    """Where the picker listens: gRPC ext_proc for the gateway, HTTP for health and metrics."""

    grpc: Address = Address(port=9002)
    http: Address = Address(port=9003)


class KubernetesPods(_Strict):
    """The ready endpoints of a Service, from its EndpointSlices."""

    namespace: str = Field(min_length=1)
    service: str = Field(min_length=1)
    port: int = Field(ge=1, le=65535)


class KubernetesSource(_Strict):
    kubernetes: KubernetesPods


class Affinity(_Strict):
    """Session affinity: requests with the same ``header`` value go to the same pod while its
    load stays under ``max_load`` times the fleet's mean (bounded-load rendezvous hashing)."""

    header: str = Field(min_length=1)
    max_load: float = Field(default=1.25, ge=1.0)

    @field_validator("header")
    @classmethod
    def _lower(cls, value: str) -> str:
        return value.lower()


class PickerConfig(_Strict):
    """The whole picker file."""

    listen: Listen = Listen()
    pods: list[str] | KubernetesSource
    # The key the picker presents to read each pod's /admin/status (status scope); taken from
    # the environment variable named by api_key_env when api_key is not written in the file.
    api_key: str | None = None
    api_key_env: str = "CORRAL_API_KEY"
    refresh: PositiveDuration = 1.0
    # How long one pod may take to answer /admin/status before it counts as down.
    status_timeout: PositiveDuration = 2.0
    fail_open: bool = True
    affinity: Affinity | None = None

    @field_validator("pods")
    @classmethod
    def _endpoints(cls, value: list[str] | KubernetesSource) -> list[str] | KubernetesSource:
        if isinstance(value, list):
            if not value:
                raise ValueError("the static list of pods is empty")
            for item in value:
                parse_endpoint(item)
        return value

    def key(self) -> str | None:
        """The API key to present to pods: ``api_key``, else ``$api_key_env``, else none."""
        return self.api_key or os.environ.get(self.api_key_env) or None


def parse_endpoint(text: str) -> tuple[str, int]:
    """``"10.0.0.5:8080"`` or ``"[::1]:8080"`` -> host and port; ValueError when malformed."""
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{text!r} is not host:port")
    if host.startswith("["):
        if not host.endswith("]"):
            raise ValueError(f"{text!r} is not host:port")
        host = host[1:-1]
    elif ":" in host:
        raise ValueError(f"{text!r}: write an IPv6 address in brackets, [addr]:port")
    return host, int(port)


def parse_config(data: Any, source: str = "<picker config>") -> PickerConfig:
    """Validate ``data`` (the YAML document); ConfigError names each bad key path and value."""
    if not isinstance(data, dict):
        raise ConfigError(source, ["the file must be a mapping of settings"])
    try:
        return PickerConfig.model_validate(data)
    except ValidationError as exc:
        problems = []
        for error in exc.errors():
            # pydantic names the member of a union it tried ("list[str]", "KubernetesSource"):
            # not a key the user wrote.
            path = ".".join(str(p) for p in error["loc"] if not _union_tag(p)) or "(top level)"
            message = error["msg"].removeprefix("Value error, ")
            # A key is never echoed, right or wrong.
            value = "(hidden)" if error["loc"][:1] == ("api_key",) else repr(error["input"])
            problems.append(f"{path}: {message}, got {value}"
                            if error["type"] != "missing" else f"{path}: {message}")
        raise ConfigError(source, problems) from None


def _union_tag(part: str | int) -> bool:
    return isinstance(part, str) and (part[:1].isupper() or "[" in part)


def load_picker_config(path: str | Path) -> PickerConfig:
    """Read and validate the picker's YAML file."""
    try:
        data = yaml.safe_load(Path(path).read_text())
    except OSError as exc:
        raise ConfigError(str(path), [f"cannot read: {exc.strerror}"]) from None
    except yaml.YAMLError as exc:
        raise ConfigError(str(path), [f"not valid YAML: {exc}"]) from None
    return parse_config(data, str(path))
