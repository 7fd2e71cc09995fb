"""Which Host names and origins ``WebPolicy`` accepts (the checks of ``WebGuard``)."""

from __future__ import annotations

from typing import Any

import pytest

from corral.config import parse_config
from corral.proxy.websafety import WebPolicy


def policy(listen: str = "127.0.0.1", **extra: Any) -> WebPolicy:
    config = parse_config({"models": {"m": {"path": "m.gguf"}}, "listen": {"host": listen},
                           "allow_unauthenticated": True, **extra})
    return WebPolicy.of(config.file)


@pytest.mark.parametrize("host", [
    "127.0.0.1:8080", "127.0.0.1", "localhost:8080", "LOCALHOST", "localhost.:8080",
    "[::1]:8080", "[::1]", "192.168.1.5:18080", "[fe80::1]:80",
])
def test_addresses_and_localhost_are_always_accepted(host: str) -> None:
    assert policy().host_allowed(host)


@pytest.mark.parametrize("host", [
    "rebind.example:8080", "rebind.example", "localhost.example:8080", "127.0.0.1.nip.io",
    "[::1", "[::1]x", "[::1]:http", "localhost:http", "", ":8080", "[rebind.example]:80",
])
def test_names_not_configured_are_refused(host: str) -> None:
    assert not policy().host_allowed(host)


def test_configured_names_domains_and_the_listen_name() -> None:
    named = policy(allowed_hosts=["corral", ".example.com"])
    for host in ("corral:8080", "CORRAL", "example.com", "api.example.com:443"):
        assert named.host_allowed(host), host
    for host in ("corral.evil:8080", "badexample.com", "example.com.evil"):
        assert not named.host_allowed(host), host
    assert policy("gpu-box").host_allowed("gpu-box:8080")
    assert policy(allowed_hosts=["*"]).host_allowed("anything.example")


def test_origins() -> None:
    strict = policy(cors={"allow_origins": ["http://localhost:3000"]})
    assert strict.origin_allowed("http://localhost:3000", "127.0.0.1:8080")
    assert not strict.origin_allowed("http://localhost:3001", "127.0.0.1:8080")
    assert not strict.origin_allowed("null", "127.0.0.1:8080")
    # corral's own origin: the Host the request was sent to.
    assert strict.origin_allowed("http://127.0.0.1:8080", "127.0.0.1:8080")
    assert not strict.origin_allowed("http://127.0.0.1:8080", None)
    assert policy(cors={"allow_origins": ["*"]}).origin_allowed("https://x.example", None)
