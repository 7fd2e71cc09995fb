#!/usr/bin/env python3
"""corral's own CPU per request and per streamed event, against the fake llama-server.

Less noisy than latency on a shared machine: the CPU seconds corral's process spends on a fixed
load do not grow because another process took the core. Starts the fake-backed corral that
bench/compare.py uses for P2 (20 models configured), then runs ``--rounds`` times: ``--requests``
1-token chat answers, not streamed, one client (P1's shape; with ``--real``, from SmolLM2 on
the real llama-server, and only those), and ``--chunks`` events over
``--streams`` streams (P2's shape), printing corral's CPU per request and per 1000 events.
With ``--profile DIR`` py-spy records corral during each load (needs ptrace: root). With
``--against TREE`` a second corral runs from TREE's sources (e.g. an older commit's, from `git
archive`), and every round measures both, in turn, the order alternating.

    PYTHONPATH=$PWD/src .venv/bin/python bench/corral_cpu.py --rounds 5
    PYTHONPATH=$PWD/src .venv/bin/python bench/corral_cpu.py --rounds 1 --profile /tmp/prof
    git archive 8e32ad0 src | tar -x -C /tmp/before
    PYTHONPATH=$PWD/src .venv/bin/python bench/corral_cpu.py --against /tmp/before
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import contenders
import uvloop
from compare import fake_config, real_config, smollm2
from contenders import Server, start_corral, wait_ready
from loadgen import Connection, percentile
from parts import chat, run_burst

NATIVE = ["--native"] if os.environ.get("PYSPY_NATIVE") else []


def profiler(server: Server, out: Path | None, name: str) -> subprocess.Popen[bytes] | None:
    if out is None:
        return None
    out.mkdir(parents=True, exist_ok=True)
    return subprocess.Popen(
        [str(Path(sys.executable).parent / "py-spy"), "record", "-p", str(server.measured),
         "-r", "1000", *NATIVE, "-f", "raw", "-o", str(out / f"{name}.txt"), "--nonblocking"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def stop(proc: subprocess.Popen[bytes] | None) -> None:
    if proc is not None:
        proc.send_signal(2)  # SIGINT: py-spy writes what it has
        proc.wait(60)


async def one_token(server: Server, requests: int, out: Path | None) -> float:
    conn = Connection("127.0.0.1", server.port, server.headers)
    body = chat(server.model, 1)
    for _ in range(20):  # warm the connection and the child's pool
        await conn.request("POST", "/v1/chat/completions", body)
    spy = profiler(server, out, "p1")
    await asyncio.sleep(0.5 if spy else 0)
    before = server.cpu_seconds()
    for _ in range(requests):
        reply = await conn.request("POST", "/v1/chat/completions", body)
        assert reply.status == 200, reply.body
    used = server.cpu_seconds() - before
    stop(spy)
    await conn.close()
    return used / requests


async def streamed(server: Server, streams: int, chunks: int, out: Path | None) -> float:
    spy = profiler(server, out, "p2")
    await asyncio.sleep(0.5 if spy else 0)
    before = server.cpu_seconds()
    result = await run_burst(server, streams, 1, lambda c, i: (
        "POST", "/v1/chat/completions", chat(server.model, max(1, chunks // streams), True)),
        keep=False)
    used = server.cpu_seconds() - before
    stop(spy)
    assert not result.failures, result.failures[:3]
    return used / sum(reply.events for reply in result.replies) * 1000


async def latencies(servers: list[Server], requests: int) -> dict[str, list[float]]:
    """1-token answers, request by request in turn between the servers: seconds each."""
    conns = [Connection("127.0.0.1", s.port, s.headers) for s in servers]
    seconds: dict[str, list[float]] = {s.name: [] for s in servers}
    for _ in range(requests):
        for server, conn in zip(servers, conns, strict=True):
            reply = await conn.request("POST", "/v1/chat/completions", chat(server.model, 1))
            assert reply.status == 200, reply.body
            seconds[server.name].append(reply.seconds)
    for conn in conns:
        await conn.close()
    return seconds


def ratios(mine: list[float], theirs: list[float]) -> str:
    """Median and range of the per-round ratios (rounds the CPU clock saw as zero left out)."""
    values = sorted(a / b for a, b in zip(mine, theirs, strict=True) if b)
    if not values:
        return "none (too short to measure)"
    return f"{statistics.median(values):.2f} ({values[0]:.2f}..{values[-1]:.2f})"


def start(name: str, streams: int, tree: Path | None, workdir: Path, real: bool) -> Server:
    root = contenders.ROOT
    if tree is not None:
        contenders.ROOT = tree  # corral_env() puts ROOT/src first on PYTHONPATH
    config = (real_config(str(Path(sys.executable).parent / "llama-server"), smollm2(), 1)
              if real else fake_config(smollm2(), streams, 20, True))
    try:
        return start_corral(name, config, workdir)
    finally:
        contenders.ROOT = root


async def main(args: argparse.Namespace) -> None:
    workdir = Path(tempfile.mkdtemp(prefix="corral-cpu-"))
    servers = [start("this-tree", args.streams, None, workdir, args.real)]
    if args.against:
        servers.append(start("against", args.streams, Path(args.against), workdir,
                             args.real))
    per_request: dict[str, list[float]] = {s.name: [] for s in servers}
    per_events: dict[str, list[float]] = {s.name: [] for s in servers}
    try:
        for server in servers:
            wait_ready(server)
        for r in range(args.rounds):
            for server in servers[r % 2:] + servers[:r % 2]:
                out = (None if args.profile is None
                       else Path(args.profile) / f"{server.name}-round{r}")
                per_request[server.name].append(await one_token(server, args.requests, out))
                per_events[server.name].append(
                    0.0 if args.real else await streamed(server, args.streams, args.chunks, out))
                print(f"round {r} {server.name}: {per_request[server.name][-1] * 1e6:.0f} us "
                      f"CPU per 1-token request, {per_events[server.name][-1]:.4f} s per 1000 "
                      f"events ({args.streams} streams)", file=sys.stderr)
        waits = await latencies(servers, args.requests)
        for name, values in waits.items():
            print(f"{name}: 1-token latency, {args.requests} in turn: p50 "
                  f"{percentile(values, 0.5) * 1e3:.3f} ms, "
                  f"p99 {percentile(values, 0.99) * 1e3:.3f} ms")
        for server in servers:
            req, ev = per_request[server.name], per_events[server.name]
            print(f"{server.name}, median of {args.rounds}: {statistics.median(req) * 1e6:.0f} us "
                  f"({min(req) * 1e6:.0f}..{max(req) * 1e6:.0f}) per request; "
                  f"{statistics.median(ev):.4f} s ({min(ev):.4f}..{max(ev):.4f}) per 1000 events")
        if args.against:
            per_req = ratios(*(per_request[s.name] for s in servers))
            per_ev = ratios(*(per_events[s.name] for s in servers))
            print(f"this tree / against, per round: per request {per_req}; per event {per_ev}")
    finally:
        for server in servers:
            server.stop()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--streams", type=int, default=64)
    parser.add_argument("--chunks", type=int, default=20000)
    parser.add_argument("--against", help="a second tree (with src/) to measure in turn")
    parser.add_argument("--real", action="store_true",
                        help="SmolLM2 on the real llama-server (P1 only) instead of the fake")
    parser.add_argument("--profile", help="a folder for py-spy's raw (collapsed) stacks")
    uvloop.run(main(parser.parse_args()))
