"""The parts P1-P6 of bench/compare.py: each runs its rounds, alternating the contenders.

Every part records one figure per contender per round into a ``Results``; compare.py reports
the median over rounds with the spread (lowest and highest round). Within a round the order of
the contenders rotates, so none always runs first (after a pause) or last.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import httpx
from contenders import Server, start_llama, wait_ready
from loadgen import Burst, Connection, burst, percentile

T = TypeVar("T")
Make = Callable[[int, int], tuple[str, str, Any]]


@dataclass
class Figure:
    """One measured quantity: per contender, one value per round."""

    part: str
    name: str
    unit: str
    baseline: str | None  # the contender others are compared with
    added: bool  # compared as a difference (latencies) rather than a ratio (rates)
    rounds: dict[str, list[float]] = field(default_factory=dict)

    def add(self, contender: str, value: float) -> None:
        self.rounds.setdefault(contender, []).append(value)


@dataclass
class Results:
    """Every figure, in the order measured, and every failed request by contender."""

    figures: dict[tuple[str, str], Figure] = field(default_factory=dict)
    failures: dict[str, list[str]] = field(default_factory=dict)

    def figure(self, part: str, name: str, unit: str, baseline: str | None,
               added: bool = False) -> Figure:
        key = (part, name)
        if key not in self.figures:
            self.figures[key] = Figure(part, name, unit, baseline, added)
        return self.figures[key]

    def check(self, server: Server, result: Burst) -> Burst:
        if result.failures:
            self.failures.setdefault(server.name, []).extend(result.failures)
        return result


def rotated(items: list[T], round_: int) -> list[T]:
    shift = round_ % len(items)
    return items[shift:] + items[:shift]


def chat(model: str, tokens: int, stream: bool = False, **extra: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": "Hi"}],
            "max_tokens": tokens, "stream": stream, "temperature": 0, **extra}


async def run_burst(server: Server, clients: int, each: int, make: Make, keep: bool = True,
                    seconds: float | None = None) -> Burst:
    return await burst("127.0.0.1", server.port, server.headers, clients, each, make, keep,
                       seconds)


async def warm(servers: list[Server], requests: int = 3) -> None:
    for server in servers:
        await run_burst(server, 1, requests, lambda c, i, s=server: (
            "POST", "/v1/chat/completions", chat(s.model, 1)))


async def p1_overhead(results: Results, servers: list[Server], rounds: int, requests: int,
                      concurrency: list[int]) -> None:
    """1-token chat answers, not streamed: latency percentiles at each concurrency."""
    for clients in concurrency:
        figures = {q: results.figure("P1", f"{clients} client(s): p{q}", "ms", "direct",
                                     added=True) for q in (50, 95, 99)}
        for r in range(rounds):
            order = rotated(servers, r)
            seconds: dict[str, list[float]] = {s.name: [] for s in order}
            if clients == 1:
                # Request by request, in turn: every contender sees the same moments.
                conns = {s.name: Connection("127.0.0.1", s.port, s.headers) for s in order}
                for _ in range(requests):
                    for s in order:
                        reply = await conns[s.name].request(
                            "POST", "/v1/chat/completions", chat(s.model, 1))
                        if reply.status != 200:
                            results.failures.setdefault(s.name, []).append(
                                f"HTTP {reply.status}")
                        seconds[s.name].append(reply.seconds)
                for conn in conns.values():
                    await conn.close()
            else:
                for s in order:
                    result = results.check(s, await run_burst(
                        s, clients, max(1, requests // clients),
                        lambda c, i, s=s: ("POST", "/v1/chat/completions", chat(s.model, 1))))
                    seconds[s.name] = [reply.seconds for reply in result.replies]
            for name, values in seconds.items():
                for q, fig in figures.items():
                    fig.add(name, percentile(values, q / 100) * 1000)


async def p2_streaming(results: Results, servers: list[Server], rounds: int, chunks: int,
                       streams: list[int], rss: dict[str, list[float]]) -> None:
    """SSE from the fake as fast as it writes: events per second through each contender, and
    the proxy's CPU seconds per 1000 events; the proxy's highest RSS is noted in ``rss``."""
    for count in streams:
        rate = results.figure("P2", f"{count} streams: chunks/s", "/s", "fake")
        cpu = results.figure("P2", f"{count} streams: CPU s per 1000 chunks", "s", None)
        per_stream = max(1, chunks // count)
        for r in range(rounds):
            for s in rotated(servers, r):
                before = s.cpu_seconds()
                sampler = asyncio.create_task(_sample_rss(s, rss))
                result = results.check(s, await run_burst(
                    s, count, 1, lambda c, i, s=s, n=per_stream: (
                        "POST", "/v1/chat/completions", chat(s.model, n, True)),
                    keep=False))
                sampler.cancel()
                events = sum(reply.events for reply in result.replies)
                rate.add(s.name, events / result.seconds)
                if s.measured is not None and events:
                    cpu.add(s.name, (s.cpu_seconds() - before) / events * 1000)


async def _sample_rss(server: Server, into: dict[str, list[float]]) -> None:
    if server.measured is None:
        return
    while True:
        into.setdefault(server.name, []).append(server.rss() / 2**20)
        await asyncio.sleep(0.1)


async def p3_inference(results: Results, servers: list[Server], rounds: int, tokens: int,
                       concurrency: list[int]) -> None:
    """Tokens per second of ``tokens``-token answers (EOS ignored), streamed and not."""
    for stream in (False, True):
        mode = "streamed" if stream else "not streamed"
        for clients in concurrency:
            fig = results.figure("P3", f"{clients} client(s), {mode}: tokens/s", "/s",
                                 "direct")
            each = 2 if clients == 1 else 1
            for r in range(rounds):
                for s in rotated(servers, r):
                    result = results.check(s, await run_burst(
                        s, clients, each, lambda c, i, s=s, streamed=stream: (
                            "POST", "/v1/chat/completions",
                            chat(s.model, tokens, streamed, ignore_eos=True)),
                        keep=not stream))
                    done = sum(_tokens(reply, tokens, stream) for reply in result.replies)
                    fig.add(s.name, done / result.seconds)


def _tokens(reply: Any, asked: int, stream: bool) -> int:
    if stream:  # one event per token, plus a role, a finish and [DONE] event
        return min(asked, reply.events)
    return int(reply.json()["usage"]["completion_tokens"])


async def p4_cold_start(results: Results, corral: Server, router: Server,
                        binary: str, args: list[str], workdir: Any, rounds: int) -> None:
    """Time to the first streamed byte of an unloaded model: corral and the router unload it
    first; by hand is a fresh llama-server started, polled on /health every 10 ms, then asked."""
    fig = results.figure("P4", "cold start: first token", "s", "router")
    for r in range(rounds):
        for who in rotated(["corral", "router", "by hand"], r):
            if who == "corral":
                async with httpx.AsyncClient(base_url=corral.url()) as http:
                    reply = await http.post(f"/admin/models/{corral.model}/unload", timeout=120)
                    reply.raise_for_status()
                fig.add(who, await _first_token(corral, time.perf_counter()))
            elif who == "router":
                await _router_unload(router)
                fig.add(who, await _first_token(router, time.perf_counter()))
            else:
                began = time.perf_counter()
                hand = start_llama("by-hand", binary, args, workdir)
                try:
                    await asyncio.to_thread(wait_ready, hand)
                    fig.add(who, await _first_token(hand, began))
                finally:
                    hand.stop()


async def _first_token(server: Server, began: float) -> float:
    conn = Connection("127.0.0.1", server.port, server.headers)
    try:
        reply = await conn.request("POST", "/v1/chat/completions",
                                   chat(server.model, 1, True), keep=False)
    finally:
        await conn.close()
    if reply.status != 200:
        raise SystemExit(f"{server.name}: cold start answered {reply.status}")
    return time.perf_counter() - began - (reply.seconds - reply.first_byte)


async def _router_unload(router: Server) -> None:
    async with httpx.AsyncClient(base_url=router.url(), timeout=120) as http:
        await http.post("/models/unload", json={"model": router.model})
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            models = (await http.get("/models")).json()["data"]
            status = next(m for m in models if m["id"] == router.model)["status"]["value"]
            if status == "unloaded" and not router.children():
                return
            await asyncio.sleep(0.05)
    raise SystemExit("the router did not unload its model within 120 s")


async def p5_pressure(results: Results, servers: list[Server], models: list[str],
                      rounds: int, seconds: float, clients: int, tokens: int) -> None:
    """Requests alternating between three models with memory for two: completed and failed
    requests, and model loads (new llama-server processes), per minute."""
    base = servers[-1].name
    done = results.figure("P5", "completed per minute", "/min", base)
    failed = results.figure("P5", "failed requests", "", None)
    loads = results.figure("P5", "loads per minute", "/min", base)
    for r in range(rounds):
        for s in rotated(servers, r):
            seen = s.children()
            start = set(seen)
            sampler = asyncio.create_task(_watch_children(s, seen))
            result = await run_burst(s, clients, 0, lambda c, i: (
                "POST", "/v1/chat/completions",
                chat(models[(c + i) % len(models)], tokens)), seconds=seconds)
            sampler.cancel()
            results.check(s, result)
            minutes = result.seconds / 60
            done.add(s.name, len(result.replies) / minutes)
            failed.add(s.name, len(result.failures))
            loads.add(s.name, len(seen - start) / minutes)


async def _watch_children(server: Server, seen: set[int]) -> None:
    while True:
        seen |= await asyncio.to_thread(server.children)
        await asyncio.sleep(0.05)
