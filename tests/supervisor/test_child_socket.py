"""Only corral can reach its children: each listens on a Unix socket in a directory only
corral's user may enter, and a socket that is not the child's own is never taken for it.

The impostor comes from the fake llama-server (tests/fake_llama_server.py): the real one cannot
be made to let another process listen in its place.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil
import pytest
import yaml

from corral.probe.host import remove_socket_dir
from tests.conftest import FAKE_LLAMA_SERVER, CorralProcess

pytestmark = pytest.mark.integration

Start = Callable[..., CorralProcess]


def load(server: CorralProcess, name: str) -> dict[str, object]:
    assert server.http.post(f"/admin/models/{name}/load").status_code == 200
    return server.model(name)


def test_a_child_listens_on_a_private_socket_and_on_no_tcp_port(
    corral: Start, smollm2: Path
) -> None:
    server = corral({"models": {"m": {"path": str(smollm2), "slots": 1, "ctx_per_slot": 256}}})
    info = load(server, "m")
    sock = Path(str(info["socket"]))
    assert stat.S_ISSOCK(os.stat(sock).st_mode)
    directory = os.stat(sock.parent)
    assert directory.st_uid == os.getuid() and stat.S_IMODE(directory.st_mode) == 0o700
    (child,) = server.children()
    assert "--port" not in child.cmdline() and str(sock) in child.cmdline()
    listening = [c for c in child.net_connections(kind="inet") if c.status == psutil.CONN_LISTEN]
    assert listening == []  # nothing on the network to race for, or to reach around corral
    reply = server.http.post("/v1/completions", json={"model": "m", "prompt": "Hi",
                                                      "max_tokens": 1})
    assert reply.status_code == 200, reply.text


@pytest.mark.skipif(os.getuid() != 0 or shutil.which("setpriv") is None,
                    reason="needs root to act as another user (CI runs as root)")
def test_another_user_can_neither_reach_nor_take_a_childs_socket(
    corral: Start, smollm2: Path
) -> None:
    server = corral({"models": {"m": {"path": str(smollm2), "slots": 1, "ctx_per_slot": 256}}})
    sock = str(load(server, "m")["socket"])
    attempt = (
        "import socket, sys\n"
        "for act in ('connect', 'bind'):\n"
        "    s = socket.socket(socket.AF_UNIX)\n"
        "    path = sys.argv[1] if act == 'connect' else sys.argv[1] + '.impostor'\n"
        "    try:\n"
        "        getattr(s, act)(path)\n"
        "        print(act, 'ok')\n"
        "    except PermissionError:\n"
        "        print(act, 'refused')\n"
    )
    as_nobody = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
    done = subprocess.run([*as_nobody, sys.executable, "-c", attempt, sock],
                          capture_output=True, text=True, timeout=30)
    assert done.stdout.split("\n")[:2] == ["connect refused", "bind refused"], done.stderr


@pytest.fixture
def impostors(tmp_path: Path) -> Iterator[Path]:
    """The fake's record file; every impostor it names is killed after the test."""
    record = tmp_path / "record.txt"
    yield record
    lines = record.read_text().splitlines() if record.exists() else []
    for line in lines:
        if line.startswith("impostor "):
            try:
                os.kill(int(line.split()[1]), signal.SIGKILL)
            except ProcessLookupError:
                pass


def test_a_socket_held_by_another_process_is_never_taken_for_the_child(
    corral: Start, smollm2: Path, impostors: Path
) -> None:
    server = corral({"models": {"m": {
        "path": str(smollm2), "binary": FAKE_LLAMA_SERVER, "slots": 1, "ctx_per_slot": 256,
        "env": {"FAKE_MODE": "impostor", "FAKE_RECORD": str(impostors)}}}})
    reply = server.http.post("/v1/chat/completions", json={
        "model": "m", "messages": [{"role": "user", "content": "secret prompt"}]})
    assert reply.status_code == 503, reply.text
    error = reply.json()["error"]
    assert error["code"] == "model_load_failed"
    impostor = next(int(line.split()[1]) for line in impostors.read_text().splitlines()
                    if line.startswith("impostor "))
    assert f"is held by pid {impostor}, not by the child" in error["message"]
    info = server.model("m")
    assert info["state"] == "failed" and info["pid"] is None
    assert server.children(None) == []  # the child that let it in was stopped


@pytest.mark.parametrize("prepared", ["open to others", "a link"])
def test_corral_refuses_a_socket_directory_someone_prepared(
    tmp_path: Path, smollm2: Path, prepared: str
) -> None:
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    ours = tmp / f"corral-{os.getuid()}"
    if prepared == "a link":
        (tmp_path / "elsewhere").mkdir(mode=0o700)
        ours.symlink_to(tmp_path / "elsewhere")
    else:
        ours.mkdir()
        ours.chmod(0o777)
    config = tmp_path / "corral.yaml"
    config.write_text(yaml.safe_dump({
        "listen": {"port": 0}, "state_file": str(tmp_path / "children.json"),
        "models": {"m": {"path": str(smollm2)}}}))
    env = {k: v for k, v in os.environ.items() if k != "XDG_RUNTIME_DIR"} | {"TMPDIR": str(tmp)}
    done = subprocess.run([sys.executable, "-m", "corral", "serve", "-c", str(config)],
                          env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 1
    assert f"corral: {ours}: the children's socket directory must be a directory of this user" \
        in done.stderr
    assert "Traceback" not in done.stderr


def test_a_socket_directory_is_removed_with_its_sockets_only() -> None:
    # What a clean shutdown does to the directory once its children are gone; anything not a
    # child's socket is not corral's to delete, so it stays, and the directory with it.
    with tempfile.TemporaryDirectory() as base:  # short: a socket's path has 108 bytes
        directory = Path(base) / "d"
        directory.mkdir()
        with socket.socket(socket.AF_UNIX) as listener:
            listener.bind(str(directory / "m.sock"))
        (directory / "notes.txt").write_text("someone's")
        remove_socket_dir(directory)
        assert [p.name for p in directory.iterdir()] == ["notes.txt"]
        (directory / "notes.txt").unlink()
        remove_socket_dir(directory)
        assert not directory.exists() and Path(base).exists()
        remove_socket_dir(directory)  # gone already: nothing to do, no error
