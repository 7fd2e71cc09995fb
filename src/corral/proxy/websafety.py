"""Keeping web pages out: Host allow-list, origins, CORS, and JSON for what changes state.

A browser lets any web page send requests to ``127.0.0.1``; without keys corral would serve
them. Before anything else (the drain guard, keys, routing) each request passes these checks:

1. ``Host`` (DNS rebinding: a page whose name resolves to 127.0.0.1 sends its own name): an IP
   address, ``localhost``, ``listen.host`` or a name in ``allowed_hosts``; else 421.
2. ``Origin`` (a page's request): only origins in ``cors.allow_origins`` (by default
   ``localhost``: pages served from this machine), or the host's own; else 403
   ``cross_site_request``. Without ``Origin``, ``Sec-Fetch-Site: cross-site`` or
   ``same-site`` (a navigation, an image, a script of another site's page) is refused alike.
3. ``OPTIONS`` preflights of allowed origins are answered here (200, as llama-server does),
   with ``cors.allow_methods`` and ``cors.allow_headers``.
4. A request that may change state (any method but GET, HEAD, OPTIONS) with a body type that is
   not JSON gets 415: an HTML form (``application/x-www-form-urlencoded``,
   ``multipart/form-data``, ``text/plain``) cannot trigger anything. One without a body type
   (``curl -X POST``) passes: a browser that sends one also sends ``Origin``.

CORS is corral's own policy: the ``Access-Control-*`` headers a child adds never pass through;
corral adds its own for allowed origins. Clients that are not browsers send no ``Origin`` and
are unaffected.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

import structlog
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from corral.config import ConfigFile
from corral.config.web import LOCALHOST_ORIGINS, ip_literal, loopback_origin
from corral.echo import clip, quote
from corral.errors import BadRequestError, CorralError, CrossSiteRequestError, HostNotAllowedError
from corral.proxy.errors import response_for

log = structlog.get_logger("corral.proxy")

_SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
_REFUSED_FETCH_SITES = frozenset({b"cross-site", b"same-site"})
_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]{1,64}")
_MAX_REQUESTED_HEADERS = 64
_CORS_PREFIX = b"access-control-"
_EXPOSED = b"X-Request-Id, Retry-After"


def json_media_problem(content_type: str | None) -> BadRequestError | None:
    """The 415 for a body type that is not JSON (``application/json`` or ``*+json``); None
    for JSON or no type at all."""
    if content_type is None:
        return None
    media = content_type.partition(";")[0].strip().lower()
    if media == "application/json" or media.endswith("+json"):
        return None
    return BadRequestError(
        f"Content-Type must be application/json, got {quote(media or 'nothing')}",
        code="unsupported_media_type", status=415)


@dataclass(frozen=True)
class WebPolicy:
    """The names corral answers to and the origins it serves, from one configuration."""

    hosts: frozenset[str]  # exact names
    domains: tuple[str, ...]  # ".example.com": the name and everything under it
    any_host: bool
    origins: frozenset[str]
    any_origin: bool
    loopback_origins: bool  # "localhost" listed: pages served from this machine
    methods: bytes  # Access-Control-Allow-Methods
    headers: tuple[str, ...] | None  # Access-Control-Allow-Headers; None: those asked for

    @classmethod
    def of(cls, file: ConfigFile) -> WebPolicy:
        """The policy of ``file`` (whose ``listen.host`` is where corral is bound: a reload
        may not change it)."""
        names = {"localhost", *(h.lower() for h in file.listen.hosts), *file.allowed_hosts}
        cors = file.cors
        return cls(
            hosts=frozenset(n for n in names if not n.startswith(".")),
            domains=tuple(n for n in names if n.startswith(".")),
            any_host="*" in names,
            origins=frozenset(cors.allow_origins) - {LOCALHOST_ORIGINS},  # a keyword
            any_origin="*" in cors.allow_origins,
            loopback_origins=LOCALHOST_ORIGINS in cors.allow_origins,
            methods=", ".join(dict.fromkeys(cors.allow_methods)).encode(),
            headers=None if "*" in cors.allow_headers else tuple(cors.allow_headers),
        )

    def host_allowed(self, host: str) -> bool:
        """Whether a ``Host`` header value (``name[:port]``) names corral. The port is not
        checked: a page cannot choose it (it reaches corral's port or nothing), and port
        forwarding (``docker -p``) changes it."""
        if self.any_host:
            return True
        if host.startswith("["):
            name, bracket, rest = host[1:].partition("]")
            return bool(bracket) and (not rest or _port(rest)) and ip_literal(name)
        name, colon, port = host.rpartition(":")
        if not colon:
            name = port
        elif not port.isdigit():
            return False
        name = name.lower().removesuffix(".")
        # An address is no name a page can point elsewhere: rebinding needs a name.
        return (name in self.hosts or ip_literal(name)
                or any(name == d[1:] or name.endswith(d) for d in self.domains))

    def origin_allowed(self, origin: str, host: str | None) -> bool:
        """Whether a page of ``origin`` may call corral: listed in ``cors.allow_origins`` (or
        served from this machine, with ``localhost`` listed), or corral's own origin (the
        ``Host`` it was sent to)."""
        lowered = origin.lower()
        if self.any_origin or lowered in self.origins:
            return True
        if self.loopback_origins and loopback_origin(lowered):
            return True
        return host is not None and lowered.partition("://")[2] == host.lower()


def _port(rest: str) -> bool:
    return rest.startswith(":") and rest[1:].isdigit()


class WebGuard:
    """ASGI middleware applying ``WebPolicy`` to every HTTP request (see the module)."""

    def __init__(self, app: ASGIApp, config: Callable[[], ConfigFile]) -> None:
        self.app = app
        self._config = config  # read at each request: a reload may change the policy
        self._policy_of: tuple[ConfigFile, WebPolicy] | None = None

    def policy(self) -> WebPolicy:
        file = self._config()
        if self._policy_of is None or self._policy_of[0] is not file:
            self._policy_of = (file, WebPolicy.of(file))
        return self._policy_of[1]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = _Headers(scope["headers"])
        try:
            policy = self.policy()
            cors = self._check_page(headers, policy)
        except CorralError as exc:
            await _refuse(exc, scope, receive, send, headers)
            return
        if (cors and scope["method"] == "OPTIONS"
                and headers.get(b"access-control-request-method") is not None):
            await self._preflight(headers, cors, policy, send)
            return
        extra = _cors_headers(cors)

        async def send_own_cors(message: Message) -> None:
            if message["type"] == "http.response.start":
                kept = [(k, v) for k, v in message.get("headers", ())
                        if not k.lower().startswith(_CORS_PREFIX)]
                message = {**message, "headers": kept + extra}
            await send(message)

        if scope["method"] not in _SAFE_METHODS:
            refused = json_media_problem(headers.text(b"content-type"))
            if refused is not None:  # answered with CORS headers: an allowed page reads why
                await _refuse(refused, scope, receive, send_own_cors, headers)
                return
        await self.app(scope, receive, send_own_cors)

    @staticmethod
    def _check_page(headers: _Headers, policy: WebPolicy) -> bytes | None:
        """Refuse a foreign ``Host`` and other sites' pages; the ``Access-Control-Allow-Origin``
        value to answer with, if the request comes from an allowed page."""
        for host in headers.hosts:
            if not policy.host_allowed(host):
                raise HostNotAllowedError(
                    f"Host {quote(host)} is not a name of this corral; if it is, add it to "
                    "allowed_hosts (a web page that a DNS name points here sends its own)")
        origin = headers.origin
        if origin is not None:
            if not policy.origin_allowed(origin, headers.host):
                raise CrossSiteRequestError(
                    f"requests from web pages of {quote(origin)} are not allowed; list the "
                    "origin in cors.allow_origins to let its pages call corral")
            return b"*" if policy.any_origin else origin.encode("latin-1")
        if (site := headers.get(b"sec-fetch-site")) in _REFUSED_FETCH_SITES:
            assert site is not None
            raise CrossSiteRequestError(
                "requests from web pages of other sites are not allowed (Sec-Fetch-Site: "
                f"{site.decode()})")
        return None

    @staticmethod
    async def _preflight(
        headers: _Headers, allow_origin: bytes, policy: WebPolicy, send: Send
    ) -> None:
        if policy.headers is None:  # "*": the names asked for, back
            requested = (headers.text(b"access-control-request-headers") or "").split(",")
            names = [n.strip() for n in requested[:_MAX_REQUESTED_HEADERS]]
        else:
            names = list(policy.headers)
        answer = [
            *_cors_headers(allow_origin),
            (b"access-control-allow-methods", policy.methods),
            (b"access-control-max-age", b"600"),
            (b"vary", b"Access-Control-Request-Method, Access-Control-Request-Headers"),
            (b"content-length", b"0"),
        ]
        allowed = ", ".join(n for n in names if _TOKEN.fullmatch(n))
        if allowed:
            answer.append((b"access-control-allow-headers", allowed.encode()))
        # Chrome asks before a public page may reach a private address (127.0.0.1).
        if headers.get(b"access-control-request-private-network") == b"true":
            answer.append((b"access-control-allow-private-network", b"true"))
        # 200, not 204: llama-server's answer, which its clients' tests check.
        await send({"type": "http.response.start", "status": 200, "headers": answer})
        await send({"type": "http.response.body", "body": b""})


async def _refuse(
    exc: CorralError, scope: Scope, receive: Receive, send: Send, headers: _Headers
) -> None:
    log.info("request_refused", method=clip(scope["method"]), path=clip(scope["path"]),
             status=exc.status, code=exc.code, host=_shown(headers.host),
             origin=_shown(headers.origin))
    await response_for(exc)(scope, receive, send)


def _cors_headers(allow_origin: bytes | None) -> list[tuple[bytes, bytes]]:
    if allow_origin is None:
        return []
    return [(b"access-control-allow-origin", allow_origin),
            (b"access-control-expose-headers", _EXPOSED), (b"vary", b"Origin")]


def _shown(value: str | None) -> str | None:
    return None if value is None else clip(value)


class _Headers:
    """The few request headers the checks read, from the raw ASGI list."""

    def __init__(self, raw: list[tuple[bytes, bytes]]) -> None:
        self._raw = raw
        self.hosts = [v.decode("latin-1") for k, v in raw if k == b"host"]
        self.host = self.hosts[0] if self.hosts else None
        self.origin = self.text(b"origin")

    def get(self, name: bytes) -> bytes | None:
        return next((v for k, v in self._raw if k == name), None)

    def text(self, name: bytes) -> str | None:
        value = self.get(name)
        return None if value is None else value.decode("latin-1")
