"""API keys: who may call which endpoints and models.

Keys come from the config (``auth.keys``), each with scopes (``inference``, ``status``,
``admin``; ``admin`` includes ``status``) and an optional model allow-list. A request presents
one as ``Authorization: Bearer KEY`` or ``X-Api-Key: KEY``. With no keys configured everything
is open to clients (web pages are kept out by ``corral.proxy.websafety``; corral refuses to
listen beyond loopback unless told ``allow_unauthenticated``). Keys are printable ASCII (the
config refuses others) and compared as bytes, in constant time, with the header's own bytes;
they are never logged: logs carry the key's ``name``.
"""

from __future__ import annotations

import hmac
from collections.abc import Sequence

from starlette.datastructures import Headers

from corral.config.schema import ResolvedKey
from corral.errors import AuthenticationError, PermissionDeniedError

# The identity of requests when no keys are configured.
OPEN = ResolvedKey(name="anonymous", secret="", scopes=frozenset({"inference", "status", "admin"}),
                   models=None)


class Authenticator:
    """Checks a request's key against the configured ones."""

    def __init__(self, keys: Sequence[ResolvedKey]) -> None:
        self.keys = tuple(keys)
        self._secrets = [(key, key.secret.encode("ascii")) for key in self.keys]

    @property
    def enabled(self) -> bool:
        return bool(self.keys)

    def authenticate(self, headers: Headers, scope: str) -> ResolvedKey:
        """The key the request presents, if it is valid and has ``scope``; else 401/403."""
        if not self.keys:
            return OPEN
        presented = _presented(headers)
        if presented is None:
            raise AuthenticationError(
                "an API key is required (Authorization: Bearer KEY or X-Api-Key: KEY)")
        found = None
        # The header's own bytes (Starlette decodes headers as latin-1); the configured keys
        # are ASCII, so a key matches only when sent as exactly its bytes.
        candidate = presented.encode("latin-1")
        for key, secret in self._secrets:
            # Compare against every key, so the time taken says nothing about which matched.
            if hmac.compare_digest(candidate, secret):
                found = key
        if found is None:
            raise AuthenticationError("the API key is not valid")
        if scope not in found.scopes:
            raise PermissionDeniedError(f"key {found.name!r} does not have the {scope!r} scope")
        return found



def may_use(key: ResolvedKey, model: str) -> bool:
    """Whether ``key`` may use ``model`` (its canonical name). A model it may not use is
    answered as one that does not exist (404), never 403, so a key learns no other names."""
    return key.models is None or model in key.models


def _presented(headers: Headers) -> str | None:
    authorization = headers.get("authorization")
    if authorization:
        scheme, _, value = authorization.partition(" ")
        if scheme.lower() == "bearer" and value.strip():
            return value.strip()
    api_key = headers.get("x-api-key")
    return api_key.strip() if api_key and api_key.strip() else None
