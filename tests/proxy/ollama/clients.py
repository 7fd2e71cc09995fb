"""The official ``ollama`` client for the Ollama API's integration tests: one per corral and
key, closed with that corral."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import ollama

from tests.conftest import CorralProcess

ADMIN = {"Authorization": "Bearer admin-key"}
USER = {"Authorization": "Bearer user-key"}

_clients: dict[tuple[int, str], ollama.Client] = {}


def client(server: CorralProcess, headers: dict[str, str] = ADMIN) -> ollama.Client:
    """The official client for ``headers`` (one per key, closed with the server)."""
    key = (server.port, headers.get("Authorization", ""))
    if key not in _clients:
        _clients[key] = ollama.Client(host=server.url, headers=headers, timeout=240)
    return _clients[key]


@contextmanager
def serving(corral: CorralProcess) -> Iterator[CorralProcess]:
    """``corral`` once healthy, its own requests made with the admin key; closed after, with
    the clients made for it."""
    corral.http.headers.update(ADMIN)
    try:
        corral.wait_healthy()
        yield corral
    finally:
        for key in [k for k in _clients if k[0] == corral.port]:
            _clients.pop(key).close()
        corral.close()
