#!/usr/bin/env python3
"""What a request body corral accepts can cost to parse, and what bounding it costs.

corral refuses a body with more JSON values than one per 32 bytes of ``limits.max_body``
(``corral.proxy.body``). For the costliest bodies right under that bound it prints the time
``json.loads`` holds the event loop and the memory it allocates, relative to ``max_body``; then
what counting costs on an ordinary chat body (nothing: it is too short to be counted) and on a
long one.

    .venv/bin/python bench/body_cost.py [--max-body-mib 16]
"""

from __future__ import annotations

import argparse
import json
import time
import timeit
import tracemalloc
from collections.abc import Callable

from corral.proxy.body import VALUE_BYTES, _structural

MiB = 2**20


def worst_bodies(bound: int) -> dict[str, bytes]:
    """Bodies of nearly ``bound`` counted values, each the costliest of its kind per value."""
    def of(items: list[bytes]) -> bytes:
        return b'{"model":"x","x":[' + b",".join(items) + b"]}"

    room = bound - 16
    return {
        "empty arrays": of([b"[]"] * (room // 2)),
        "objects with distinct keys": of([b'{"%d":"%d"}' % (i, i) for i in range(room // 3)]),
        "short strings": of([b'"ab"'] * (room // 1)),
        "token ids": of([b"12345"] * (room // 1)),
    }


def measure(parse: Callable[[], object]) -> tuple[float, int]:
    tracemalloc.start()
    parse()
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    began = time.perf_counter()
    parse()  # timed without tracemalloc, which slows allocation down
    return time.perf_counter() - began, peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--max-body-mib", type=float, default=16)
    args = parser.parse_args()
    max_body = int(args.max_body_mib * MiB)
    bound = max_body // VALUE_BYTES
    print(f"max_body {max_body / MiB:g} MiB: at most {bound} values\n")
    print("| body at the bound | size | parse | parse memory |")
    print("| --- | --- | --- | --- |")
    for name, body in worst_bodies(bound).items():
        assert _structural(body) <= bound
        seconds, peak = measure(lambda body=body: json.loads(body))
        print(f"| {name} | {len(body) / MiB:.1f} MiB | {seconds * 1000:.0f} ms "
              f"| {peak / MiB:.0f} MiB ({peak / max_body:.1f} x max_body) |")
    unbounded = b'{"model":"x","x":[' + b"[]," * ((max_body - 32) // 3) + b"[]]}"
    seconds, peak = measure(lambda: json.loads(unbounded))
    print(f"| empty arrays, max_body long (refused) | {len(unbounded) / MiB:.1f} MiB "
          f"| {seconds * 1000:.0f} ms | {peak / MiB:.0f} MiB ({peak / max_body:.1f} x max_body) |")

    chat = json.dumps({"model": "m", "stream": True, "messages": [
        {"role": "user", "content": "Hello, world: this is a test. " * 330}]}).encode()
    runs = 2000
    parse = timeit.timeit(lambda: json.loads(chat), number=runs) / runs
    print(f"\n{len(chat) / 1000:.0f} kB chat body: parse {parse * 1e6:.0f} us; counted only "
          f"past {bound} bytes, so not at all")
    prose = "Hello, world: this is a test. " * (max_body // 2 // 30)
    long = json.dumps({"model": "m", "messages": [{"role": "user", "content": prose}]}).encode()
    count = timeit.timeit(lambda: _structural(long), number=10) / 10
    print(f"{len(long) / MiB:.1f} MiB body: counting {count * 1000:.1f} ms "
          f"({count / (len(long) / MiB) * 1000:.2f} ms per MiB), "
          f"parse {timeit.timeit(lambda: json.loads(long), number=3) / 3 * 1000:.0f} ms")


if __name__ == "__main__":
    main()
