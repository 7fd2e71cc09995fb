#!/usr/bin/env python3
"""What holding requests to the slot count costs llama.cpp itself, without corral.

corral never gives a child more requests than it has slots; the rest wait in corral's queue,
where they can be seen. Plain llama-server (and a proxy in front of it) takes them all and
queues them inside, where its loop starts every waiting task in the same batch. This runs one
llama-server (the arguments corral would give it, 4 slots) and, alternating in each round, 16
clients of 1-token answers sent straight to it, and the same 16 clients sharing 4 permits in
the client: corral's admission rule with none of corral's code. The difference between the two
is the part of corral's added latency at 16 clients (P1 in docs/benchmarks.md) that comes from
the rule and not from the proxy.

    PYTHONPATH=$PWD/src .venv/bin/python bench/admission_cost.py --rounds 5
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import statistics
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

import uvloop
from compare import real_config, smollm2
from contenders import direct_args, plan, start_llama, wait_ready
from loadgen import Connection, percentile
from parts import chat


async def clients(port: int, count: int, each: int, permits: int | None) -> list[float]:
    """Latencies of ``count`` clients sending ``each`` requests in turn, each timed from the
    moment it wanted to send (permit wait included, as corral's queue wait is)."""
    gate = asyncio.Semaphore(permits) if permits else None
    seconds: list[float] = []

    async def client() -> None:
        conn = Connection("127.0.0.1", port, {})
        try:
            for _ in range(each):
                began = time.perf_counter()
                if gate is not None:
                    await gate.acquire()
                try:
                    reply = await conn.request("POST", "/v1/chat/completions",
                                               chat("smollm2", 1))
                finally:
                    if gate is not None:
                        gate.release()
                if reply.status != 200:
                    raise SystemExit(f"HTTP {reply.status}: {reply.body[:200]!r}")
                seconds.append(time.perf_counter() - began)
        finally:
            await conn.close()

    await asyncio.gather(*(client() for _ in range(count)))
    return seconds


async def measure(port: int, rounds: int, count: int, each: int, permits: int) -> None:
    await clients(port, 16, 3, None)  # warm: the first burst is slow
    p50s: dict[str, list[float]] = {"straight": [], "held": []}
    for r in range(rounds):
        order = [("straight", None), ("held", permits)]
        for name, gate in order if r % 2 == 0 else order[::-1]:
            values = await clients(port, count, each, gate)
            p50s[name].append(percentile(values, 0.5) * 1000)
            print(f"round {r} {name}: p50 {p50s[name][-1]:.1f} ms, "
                  f"p95 {percentile(values, 0.95) * 1000:.1f} ms")
    added = [h - s for h, s in zip(p50s["held"], p50s["straight"], strict=True)]
    print(f"{count} clients, p50 straight {statistics.median(p50s['straight']):.1f} ms, "
          f"held to {permits} {statistics.median(p50s['held']):.1f} ms: "
          f"added {statistics.median(added):+.1f} ms ({min(added):+.1f}..{max(added):+.1f})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--each", type=int, default=3, help="requests per client per round")
    parser.add_argument("--binary", default=str(Path(sys.executable).parent / "llama-server"))
    args = parser.parse_args()
    with ExitStack() as stack:
        workdir = Path(tempfile.mkdtemp(prefix="corral-admission-"))
        stack.callback(shutil.rmtree, workdir, True)
        config = real_config(args.binary, smollm2(), 1)
        command, _ = plan(config, workdir, "smollm2")
        server = start_llama("direct", args.binary, direct_args(command), workdir)
        stack.callback(server.stop)
        wait_ready(server)
        slots = config["models"]["smollm2"]["slots"]
        uvloop.run(measure(server.port, args.rounds, args.clients, args.each, slots))


if __name__ == "__main__":
    main()
