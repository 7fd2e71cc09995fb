"""A fleet on loopback: corral nodes (real llama-server), corral's picker, and a real Envoy
configured as a Gateway API implementation configures it for an InferencePool.

Shared by the Envoy test and ``bench/fleet.py``. Every process is started by ``Fleet`` and
ended by ``Fleet.close`` (also on failure: use it as a context manager).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import psutil
import yaml

from corral.config import parse_config
from corral.picker.envoyconfig import gateway_bootstrap
from corral.planreport import build_report
from tests.conftest import ENDLESS, CorralProcess, free_port, launch, wait_until


def smol(smollm2: Path, **extra: Any) -> dict[str, Any]:
    """One SmolLM2 model entry: two small slots, endless generation allowed (``ENDLESS``)."""
    return {"path": str(smollm2), "slots": 2, "ctx_per_slot": 256, "args": ENDLESS, **extra}


def budget_for(smollm2: Path, models: int) -> int:
    """A host memory budget that holds ``models`` SmolLM2 children but not one more."""
    probe = parse_config({"devices": [{"id": "cpu", "memory": "64GiB"}],
                          "reserve": {"ram": 0}, "models": {"m": smol(smollm2)}})
    need = build_report(probe).models[0].plan
    assert need is not None
    return int(need.reservation["cpu"] * (models + 0.5))


class Fleet:
    """Nodes, picker and Envoy; ``url`` is Envoy's listener, ``retry_url`` its second one."""

    def __init__(self, directory: Path, llama_server: str, smollm2: Path,
                 preload: list[list[str]], models: tuple[str, ...] = ("a", "b", "c"),
                 fail_open: bool = True) -> None:
        self.directory = directory
        self.nodes: list[CorralProcess] = []
        self.procs: list[subprocess.Popen[bytes]] = []
        self.logs: list[Path] = []
        budget = budget_for(smollm2, 2)
        try:
            for loaded in preload:
                config = {"devices": [{"id": "cpu", "memory": budget}], "reserve": {"ram": 0},
                          "models": {m: smol(smollm2, preload=m in loaded) for m in models}}
                self.nodes.append(launch(directory, llama_server, config))
            for node in self.nodes:
                node.wait_healthy(120)
            self.endpoints = [f"127.0.0.1:{n.port}" for n in self.nodes]
            self.by_endpoint = dict(zip(self.endpoints, self.nodes, strict=True))
            grpc_port, http_port = free_port(), free_port()
            picker_config = {"listen": {"grpc": {"host": "127.0.0.1", "port": grpc_port},
                                        "http": {"host": "127.0.0.1", "port": http_port}},
                             "pods": self.endpoints, "refresh": "0.25s", "fail_open": fail_open}
            (directory / "picker.yaml").write_text(yaml.safe_dump(picker_config))
            self.picker_url = f"http://127.0.0.1:{http_port}"
            self.picker = self._spawn("picker", [sys.executable, "-m", "corral", "picker", "-c",
                                                 str(directory / "picker.yaml")])
            self.picker_address = f"127.0.0.1:{grpc_port}"
            self.admin = httpx.Client(timeout=10)
            self.envoy_admins: list[str] = []
            wait_until(self._picker_sees_all, 120, 0.1, self._log_tail)
            self.url, self.retry_url, self.envoy = self.start_envoy(fail_open)
            self.http = httpx.Client(base_url=self.url, timeout=240)
            self.retry_http = httpx.Client(base_url=self.retry_url, timeout=240)
        except BaseException:
            self.close()
            raise

    def _spawn(self, name: str, argv: list[str]) -> subprocess.Popen[bytes]:
        log = self.directory / f"{name}-{len(self.procs)}.log"
        self.logs.append(log)
        with log.open("wb") as out:
            proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL)
        self.procs.append(proc)
        return proc

    def start_envoy(self, fail_open: bool) -> tuple[str, str, subprocess.Popen[bytes]]:
        """An Envoy (its listener, its retrying listener, the process), ready."""
        listen, retry, admin = free_port(), free_port(), free_port()
        bootstrap = gateway_bootstrap(
            listen=f"127.0.0.1:{listen}", retry_listen=f"127.0.0.1:{retry}",
            admin=f"127.0.0.1:{admin}", picker=self.picker_address, pods=self.endpoints,
            fail_open=fail_open)
        path = self.directory / f"envoy-{listen}.yaml"
        path.write_text(yaml.safe_dump(bootstrap))
        envoy = str(Path(sys.executable).with_name("envoy"))
        proc = self._spawn("envoy", [envoy, "-c", str(path), "--base-id", str(listen),
                                     "--log-level", "warn", "--concurrency", "2"])

        def ready() -> bool:
            if proc.poll() is not None:
                raise AssertionError(f"envoy exited {proc.returncode}: {self._log_tail()}")
            with contextlib.suppress(httpx.TransportError):
                return self.admin.get(f"http://127.0.0.1:{admin}/ready").status_code == 200
            return False

        wait_until(ready, 60, 0.05, self._log_tail)
        self.envoy_admins.append(f"http://127.0.0.1:{admin}")
        return f"http://127.0.0.1:{listen}", f"http://127.0.0.1:{retry}", proc

    def envoy_counter(self, suffix: str) -> int:
        """A counter of the first Envoy's (``/stats``), summed over the stats it ends."""
        text = self.admin.get(self.envoy_admins[0] + "/stats").text
        return sum(int(value) for name, _, value in
                   (line.partition(": ") for line in text.splitlines())
                   if name.endswith(suffix) and value.strip().isdigit())

    def status(self) -> dict[str, Any]:
        """The picker's fleet view."""
        result: dict[str, Any] = self.admin.get(self.picker_url + "/admin/status").json()
        return result

    def pod(self, endpoint: str) -> dict[str, Any]:
        return next(p for p in self.status()["pods"] if p["endpoint"] == endpoint)

    def _picker_sees_all(self) -> bool:
        if self.picker.poll() is not None:
            raise AssertionError(f"the picker exited {self.picker.returncode}")
        with contextlib.suppress(httpx.TransportError):
            pods = self.status()["pods"]
            return len(pods) == len(self.endpoints) and all(p["up"] for p in pods)
        return False

    def wait_view(self, condition: Callable[[dict[str, Any]], object],
                  timeout: float = 120) -> None:
        """Until the picker's view satisfies ``condition`` (a pod's dict by endpoint)."""
        wait_until(lambda: condition({p["endpoint"]: p for p in self.status()["pods"]}),
                   timeout, 0.05, self._log_tail)

    def kill_node(self, index: int) -> None:
        """SIGKILL a node and its llama-servers: a machine gone, not a drain."""
        node = self.nodes[index]
        children = node.children(None)
        node.proc.kill()
        for child in children:
            with contextlib.suppress(psutil.Error):
                child.kill()
        node.proc.wait()
        # Gone for good (and reaped, where they were handed to this process), before the
        # suite counts what outlived it.
        _, alive = psutil.wait_procs(children, timeout=30)
        assert not alive, alive

    def decisions(self) -> dict[str, int]:
        return {k: v for k, v in self.status()["decisions"].items() if v}

    def _log_tail(self) -> str:
        return "".join(f"\n--- {p.name}:\n{p.read_text(errors='replace')[-3000:]}"
                       for p in self.logs if p.exists())

    def close(self) -> None:
        for proc in reversed(self.procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 20
        for proc in self.procs:
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for node in self.nodes:
            node.close()
        for client in ("admin", "http", "retry_http"):
            if hasattr(self, client):
                getattr(self, client).close()

    def __enter__(self) -> Fleet:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def upstream(response: httpx.Response) -> str:
    """The pod that answered (Envoy's ``x-corral-upstream``)."""
    return response.headers.get("x-corral-upstream", "")


def pid_alive(pid: int) -> bool:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, 0)
        return True
    return False
