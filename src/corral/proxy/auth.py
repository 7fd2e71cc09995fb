"""API keys: who may call which endpoints and models.

Keys come from the config (``auth.keys``), each with scopes (``inference``, ``admin``) and an
optional model allow-list. A request presents one as ``Authorization: Bearer KEY`` or
``X-Api-Key: KEY``. With no keys configured everything is open (corral then refuses to listen
beyond loopback unless told ``allow_unauthenticated``). Keys are compared in constant time and
never logged: logs carry the key's ``name``.
"""

from __future__ import annotations

import hmac
from collections.abc import Sequence

from starlette.datastructures import Headers

from corral.config.schema import ResolvedKey
from corral.errors import AuthenticationError, PermissionDeniedError

# The identity of requests when no keys are configured.
OPEN = ResolvedKey(name="anonymous", secret="", scopes=frozenset({"inference", "admin"}),
                   models=None)


class Authenticator:
    """Checks a request's key against the configured ones."""

    def __init__(self, keys: Sequence[ResolvedKey]) -> None:
        self.keys = tuple(keys)
        self._secrets = [(key, key.secret.encode()) for key in self.keys]

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
        candidate = presented.encode()
        for key, secret in self._secrets:
            # Compare against every key, so the time taken says nothing about which matched.
            if hmac.compare_digest(candidate, secret):
                found = key
        if found is None:
            raise AuthenticationError("the API key is not valid")
        if scope not in found.scopes:
            raise PermissionDeniedError(f"key {found.name!r} does not have the {scope!r} scope")
        return found

    @staticmethod
    def authorize_model(key: ResolvedKey, model: str) -> None:
        """403 unless ``key`` may use ``model`` (its canonical name)."""
        if key.models is not None and model not in key.models:
            raise PermissionDeniedError(f"key {key.name!r} may not use model {model!r}")


def _presented(headers: Headers) -> str | None:
    authorization = headers.get("authorization")
    if authorization:
        scheme, _, value = authorization.partition(" ")
        if scheme.lower() == "bearer" and value.strip():
            return value.strip()
    api_key = headers.get("x-api-key")
    return api_key.strip() if api_key and api_key.strip() else None
