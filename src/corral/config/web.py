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
_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]{1,64}")
# In cors.allow_origins: any page served from this machine (http(s)://localhost, 127.0.0.1 or
# [::1], any port), as llama-server's `--cors-origins localhost`.
LOCALHOST_ORIGINS = "localhost"
_LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "[::1]"})


def loopback_origin(origin: str) -> bool:
    """Whether ``origin`` (as a browser sends it) is a page served from this machine."""
    scheme, sep, rest = origin.lower().partition("://")
    if not sep or scheme not in _DEFAULT_PORTS:
        return False
    if rest.startswith("["):
        end = rest.find("]") + 1
        name, port = rest[:end], rest[end:]
    else:
        name, colon, digits = rest.partition(":")
        port = colon + digits
    if port and not (port.startswith(":") and port[1:].isdigit()):
        return False
    return name in _LOOPBACK_NAMES


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
        if value in ("*", "null", LOCALHOST_ORIGINS):
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
                     "else ('https://app.example.com', 'http://localhost:3000'), 'localhost' "
                     "for pages served from this machine, or '*'")


def _method(value: object) -> str:
    if isinstance(value, str) and _TOKEN.fullmatch(value.strip()):
        return value.strip().upper()
    raise ValueError("must be an HTTP method name ('GET', 'POST')")


def _header_name(value: object) -> str:
    if isinstance(value, str) and (value == "*" or _TOKEN.fullmatch(value.strip())):
        return value.strip()
    raise ValueError("must be a header name ('Authorization', 'Content-Type') or '*' for any")


AllowedHost = Annotated[str, PlainValidator(_allowed_host)]
Origin = Annotated[str, PlainValidator(_origin)]
Method = Annotated[str, PlainValidator(_method)]
HeaderName = Annotated[str, PlainValidator(_header_name)]


class CorsSettings(BaseModel):
    """Web pages (origins) allowed to call corral from a browser, and what their preflights
    are answered. By default pages served from this machine only (``localhost``), besides
    corral's own origin: a page of any other site is refused."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    allow_origins: list[Origin] = Field(default_factory=lambda: [LOCALHOST_ORIGINS])
    # Answered to a preflight; llama-server's defaults. "*" in allow_headers: every header
    # the preflight asks for, named back (a literal "*" would not cover Authorization).
    allow_methods: list[Method] = Field(
        default_factory=lambda: ["GET", "POST", "DELETE", "OPTIONS"], min_length=1)
    allow_headers: list[HeaderName] = Field(default_factory=lambda: ["*"])
