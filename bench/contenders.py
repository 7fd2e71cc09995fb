"""The servers bench/compare.py measures, each started on loopback by the harness itself.

- ``direct``: llama-server with the arguments corral would give its child (``corral plan``),
  on a TCP port;
- ``corral``: ``corral serve`` from this tree (``PYTHONPATH`` is set to its ``src``);
- ``router``: the same llama-server binary in router mode (``--models-preset``);
- ``nginx``: the Debian nginx as a plain reverse proxy (buffering off, keep-alive upstream);
- ``fake``, ``nginx-fake``, ``corral-fake``: the same with tests/fake_llama_server.py, which
  streams as fast as Python writes, so the proxies are measured rather than the model.
"""

from __future__ import annotations

import ctypes
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psutil
import yaml

ROOT = Path(__file__).resolve().parent.parent
FAKE = ROOT / "tests" / "fake_llama_server.py"
FAKE_KEY = "bench-fake"  # the fake checks a key; direct and nginx clients send it


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def corral_env() -> dict[str, str]:
    """The environment for ``python -m corral``: this tree's sources first."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT / "src"),
                                                      env.get("PYTHONPATH")]))
    # An installed corral has its bytecode compiled (pip does it); without it every start
    # compiles corral's modules again (0.3 s here, P6). Written outside the tree.
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    env["PYTHONPYCACHEPREFIX"] = str(Path(tempfile.gettempdir()) / "corral-bench-pycache")
    return env


def nginx_binary() -> str | None:
    return shutil.which("nginx") or next(
        (p for p in ("/usr/sbin/nginx", "/sbin/nginx") if os.path.exists(p)), None)


@dataclass
class Server:
    """A running contender: where to send requests, and the process that is the proxy."""

    name: str
    port: int
    model: str  # the name requests give in ``model``
    procs: list[subprocess.Popen[bytes]]
    measured: int | None = None  # pid whose CPU time and RSS are reported (corral's)
    headers: dict[str, str] = field(default_factory=dict)
    log: Path | None = None

    def url(self, path: str = "") -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def cpu_seconds(self) -> float:
        if self.measured is None:
            return 0.0
        times = psutil.Process(self.measured).cpu_times()
        return float(times.user + times.system)

    def rss(self) -> int:
        return 0 if self.measured is None else int(psutil.Process(self.measured).memory_info().rss)

    def children(self) -> set[int]:
        """Pids of the llama-server processes under this contender (for counting loads)."""
        pids: set[int] = set()
        for proc in self.procs:
            try:
                for kid in psutil.Process(proc.pid).children(recursive=True):
                    if kid.name() == "llama-server":
                        pids.add(kid.pid)
            except psutil.Error:
                pass
        return pids

    def stop(self) -> None:
        for proc in reversed(self.procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in reversed(self.procs):
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def wait_ready(server: Server, timeout: float = 180.0, path: str = "/health") -> float:
    """Seconds until ``path`` answers 200 (polled every 10 ms); fails if a process exits."""
    started = time.monotonic()
    with httpx.Client(timeout=5, headers=server.headers) as http:
        while time.monotonic() - started < timeout:
            for proc in server.procs:
                if proc.poll() is not None:
                    tail = server.log.read_text()[-3000:] if server.log else ""
                    raise SystemExit(f"{server.name} exited with {proc.returncode}\n{tail}")
            try:
                if http.get(server.url(path)).status_code == 200:
                    return time.monotonic() - started
            except httpx.TransportError:
                pass
            time.sleep(0.01)
    raise SystemExit(f"{server.name} not ready within {timeout} s")


def _die_with_harness() -> None:
    """In the child before exec: SIGTERM when the harness dies, even by SIGKILL (a test's
    timeout), so no server outlives it. Linux only; elsewhere the harness's own clean-up."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def spawn(argv: list[str], log: Path, env: dict[str, str] | None = None
          ) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:
        return subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, env=env,
                                preexec_fn=_die_with_harness)


def plan(config: dict[str, Any], workdir: Path, model: str) -> tuple[list[str], int]:
    """The llama-server argv corral would run for ``model`` and the host bytes it reserves
    for it (``corral plan --json``)."""
    path = workdir / "plan.yaml"
    path.write_text(yaml.safe_dump(config))
    out = subprocess.run([sys.executable, "-m", "corral", "plan", "-c", str(path), "--json"],
                         capture_output=True, text=True, env=corral_env(), check=True).stdout
    entry = next(m for m in json.loads(out)["models"] if m["name"] == model)
    return list(entry["command"]), int(entry["memory"]["cpu"]["total"])


def direct_args(command: list[str]) -> list[str]:
    """corral's child argv without what only corral's child has (socket, alias, key)."""
    args: list[str] = []
    skip = False
    for arg in command[1:]:
        if skip:
            skip = False
        elif arg in ("--host", "--alias", "--api-key", "--port"):
            skip = True
        else:
            args.append(arg)
    return args


def start_llama(name: str, binary: str, args: list[str], workdir: Path) -> Server:
    port = free_port()
    log = workdir / f"{name}.log"
    proc = spawn([binary, *args, "--host", "127.0.0.1", "--port", str(port)], log)
    return Server(name, port, "smollm2", [proc], log=log)


def start_corral(name: str, config: dict[str, Any], workdir: Path) -> Server:
    port = free_port()
    config = {**config, "listen": {"host": "127.0.0.1", "port": port},
              "state_file": str(workdir / f"{name}.children.json"), "log_level": "warning"}
    path = workdir / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    log = workdir / f"{name}.log"
    proc = spawn([sys.executable, "-m", "corral", "serve", "-c", str(path)], log, corral_env())
    model = next(iter(config["models"]))
    return Server(name, port, model, [proc], measured=proc.pid, log=log)


def preset(models: dict[str, str], args: list[str], load: bool) -> str:
    """A --models-preset INI: one section per model, ``args`` as ``key = value`` lines."""
    lines = ["version = 1", "", "[*]"]
    i = 0
    while i < len(args):
        key = args[i].lstrip("-")
        if key in ("m", "model", "metrics", "no-webui", "log-verbosity"):
            i += 1 if key in ("metrics", "no-webui") else 2
            continue
        has_value = i + 1 < len(args) and not args[i + 1].startswith("--")
        lines.append(f"{key} = {args[i + 1] if has_value else 'true'}")
        i += 2 if has_value else 1
    for name, path in models.items():
        lines += ["", f"[{name}]", f"model = {path}",
                  f"load-on-startup = {'true' if load else 'false'}"]
    return "\n".join(lines) + "\n"


def start_router(name: str, binary: str, models: dict[str, str], args: list[str],
                 workdir: Path, models_max: int | None = None, load: bool = True) -> Server:
    port = free_port()
    ini = workdir / f"{name}.ini"
    ini.write_text(preset(models, args, load))
    argv = [binary, "--models-preset", str(ini), "--host", "127.0.0.1", "--port", str(port),
            "--no-webui"]
    if models_max is not None:
        argv += ["--models-max", str(models_max)]
    log = workdir / f"{name}.log"
    return Server(name, port, next(iter(models)), [spawn(argv, log)], log=log)


NGINX_CONF = """\
worker_processes 1;
{user}
pid {dir}/nginx.pid;
error_log {dir}/nginx-error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {dir}/body;
    proxy_temp_path {dir}/proxy;
    client_max_body_size 16m;
    client_body_buffer_size 1m;
    keepalive_requests 100000;
    upstream backend {{
        server 127.0.0.1:{upstream};
        keepalive 64;
        # llama-server closes a connection idle for 5 s; one nginx reused at that moment would
        # answer a POST with 502 (not retried): forget idle ones sooner, as corral does.
        keepalive_timeout 2s;
    }}
    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass http://backend;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;
            proxy_request_buffering off;
            proxy_read_timeout 600s;
        }}
    }}
}}
"""


def start_nginx(name: str, upstream: Server, workdir: Path) -> Server:
    binary = nginx_binary()
    if binary is None:
        raise SystemExit("nginx not found: run scripts/install-system-deps (Debian nginx-light)")
    port = free_port()
    home = workdir / name
    home.mkdir()
    conf = home / "nginx.conf"
    # As root, the workers would run as nobody, who cannot use a private temporary directory.
    user = "user root;" if os.geteuid() == 0 else ""
    conf.write_text(NGINX_CONF.format(user=user, dir=home, upstream=upstream.port, port=port))
    log = workdir / f"{name}.log"
    proc = spawn([binary, "-c", str(conf), "-p", str(home), "-g", "daemon off;"], log)
    return Server(name, port, upstream.model, [proc], headers=dict(upstream.headers), log=log)


def start_fake(name: str, workdir: Path) -> Server:
    port = free_port()
    log = workdir / f"{name}.log"
    env = {**os.environ, "FAKE_MODE": "ok", "LLAMA_API_KEY": FAKE_KEY}
    proc = spawn([sys.executable, str(FAKE), "--host", "127.0.0.1", "--port", str(port)],
                 log, env)
    return Server(name, port, "fake", [proc], headers={"Authorization": f"Bearer {FAKE_KEY}"},
                  log=log)
