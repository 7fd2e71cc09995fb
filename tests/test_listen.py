"""``listen.host`` as a list: a socket on each address, or a clear refusal to start."""

from __future__ import annotations

import socket
from collections.abc import Callable
from pathlib import Path

import pytest

from corral.server import bind_sockets
from tests.conftest import CorralProcess, wait_until


def test_a_socket_on_each_address() -> None:
    sockets = bind_sockets(("127.0.0.1", "::1"), 0)
    try:
        assert [s.family for s in sockets] == [socket.AF_INET, socket.AF_INET6]
        # IPv6 only: "::" and "0.0.0.0" on one port do not collide.
        assert sockets[1].getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY) == 1
    finally:
        for s in sockets:
            s.close()


def test_an_address_in_use_names_itself_and_leaves_nothing_bound() -> None:
    with socket.socket(socket.AF_INET6) as taken:
        taken.bind(("::1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(OSError, match=f"cannot listen on ::1 port {port}"):
            bind_sockets(("127.0.0.1", "::1"), port)
    # The IPv4 socket bound first was closed again: the port is free on 127.0.0.1.
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", port))


def test_corral_exits_when_it_cannot_listen_on_every_address(
    corral: Callable[..., CorralProcess], tmp_path: Path
) -> None:
    # 192.0.2.1 (TEST-NET-1) is no address of this machine.
    server = corral({"listen": {"host": ["127.0.0.1", "192.0.2.1"]},
                     "allow_unauthenticated": True,
                     "models": {"m": {"path": str(tmp_path / "m.gguf")}}}, wait=False)
    wait_until(lambda: server.proc.poll() is not None, timeout=60)
    assert server.proc.returncode == 1
    assert "listen_failed" in server.log()
    assert f"cannot listen on 192.0.2.1 port {server.port}" in server.log()
