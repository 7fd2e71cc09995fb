"""The settings that keep web pages out: which ``Host`` names corral answers to, which origins
(web pages) may call it from a browser (``cors``). Enforced by ``corral.proxy.websafety``."""

from __future__ import annotations

import ipaddress
import re
from typing import Annotated
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, PlainValidator

# Labels of letters, digits, hyphens and underscores (container and compose service names
# have them), joined by dots.
_NAME = re.compile(r"[a-z0-9_](?:[a-z0-9_-]*[a-z0-9_])?(?:\.[a-z0-9_](?:[a-z0-9_-]*[a-z0-9_])?)*")
_DEFAULT_PORTS = {"http": 80, "https": 443}


def ip_literal(host: str) -> bool:
    """Whether ``host`` (``[::1]`` or ``::1`` for IPv6) is an IP address, not a name."""
    try:
        ipaddress.ip_address(host.removeprefix("[").removesuffix("]"))
    except ValueError:
        return False
    return True


def _allowed_host(value: object) -> str:
    if isinstance(value, str):
        host = value.strip().lower()
        if host == "*" or ip_literal(host):
            return host.removeprefix("[").removesuffix("]")
        if _NAME.fullmatch(host.removeprefix(".")):
            return host
    raise ValueError("must be a host name without scheme or port ('api.example.com'), "
                     "'.example.com' for a domain and every name under it, or '*' for any")


def _origin(value: object) -> str:
    if isinstance(value, str):
        if value in ("*", "null"):
            return value
        try:
            parts = urlsplit(value.strip())
            port = parts.port
        except ValueError:
            parts = None
        if (parts is not None and parts.scheme in _DEFAULT_PORTS and parts.hostname
                and parts.path in ("", "/")
                and not (parts.query or parts.fragment or parts.username)):
            host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
            # As a browser sends it: lower case, the scheme's own port left out.
            shown_port = "" if port in (None, _DEFAULT_PORTS[parts.scheme]) else f":{port}"
            return f"{parts.scheme}://{host}{shown_port}"
    raise ValueError("must be an origin, scheme and host with an optional port and nothing "
                     "else ('https://app.example.com', 'http://localhost:3000'), or '*'")


AllowedHost = Annotated[str, PlainValidator(_allowed_host)]
Origin = Annotated[str, PlainValidator(_origin)]


class CorsSettings(BaseModel):
    """Web pages (origins) allowed to call corral from a browser; none by default."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    allow_origins: list[Origin] = Field(default_factory=list)
