"""corral's own life: draining on SIGTERM and reloading its config under traffic.

Requests that must still be in flight at some moment are held by the test, never timed: an
endless stream of the real llama-server (cut by a drain), its child frozen until the drain has
begun, or the fake whose answers end when the test opens their gate (``gated_fake``).
"""

from __future__ import annotations

import contextlib
import signal
import socket
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
import yaml

from tests.conftest import (
    ENDLESS,
    FAKE_LLAMA_SERVER,
    CorralProcess,
    endless_chat,
    frozen,
    holding_a_slot,
)

pytestmark = pytest.mark.integration

Start = Callable[..., CorralProcess]


def chat(model: str, tokens: int, stream: bool) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": "Hi"}],
            "max_tokens": tokens, "ignore_eos": True, "stream": stream}


def sigterm_during_an_endless_stream(server: CorralProcess) -> tuple[float, str]:
    """SIGTERM corral while model "m" (started with ``ENDLESS``) streams an answer that never
    ends by itself; the seconds corral took to exit (0 asserted), and what the client got."""
    received: list[str] = []
    with ThreadPoolExecutor(1) as pool, httpx.Client(base_url=server.url, timeout=240) as http:
        def stream() -> None:
            with http.stream("POST", "/v1/chat/completions", json=endless_chat("m")) as r:
                for chunk in r.iter_text():
                    received.append(chunk)

        endless = pool.submit(stream)
        server.wait_for(lambda: len(received) > 2)
        began = time.monotonic()
        server.proc.send_signal(signal.SIGTERM)
        assert server.proc.wait(timeout=60) == 0
        took = time.monotonic() - began
        with contextlib.suppress(httpx.HTTPError):
            endless.result(timeout=60)  # the stream was cut: the client sees it end early
    return took, "".join(received)


def gated_fake(smollm2: Path, record: Path, gate: Path) -> dict[str, Any]:
    """The fake llama-server, whose answers end only once the file ``gate`` exists: these tests
    need answers that outlast a drain or queue timeout and then end normally, which the real
    one (its pace set by the machine's load) cannot promise. The fake also records each child
    it was started as (``pid N`` lines in ``record``)."""
    return {"path": str(smollm2), "binary": FAKE_LLAMA_SERVER, "slots": 1, "ctx_per_slot": 256,
            "env": {"FAKE_GATE": str(gate), "FAKE_RECORD": str(record)}}


def children_started(record: Path) -> int:
    return sum(line.startswith("pid ") for line in record.read_text().splitlines())


def stream(url: str, model: str, tokens: int | None, received: list[str]) -> str:
    """A streamed chat request, in a thread; ``received`` fills as chunks arrive.

    ``tokens=None``: an endless one (the model needs ``ENDLESS``), which only a drain ends.
    """
    body = endless_chat(model) if tokens is None else chat(model, tokens, True)
    with httpx.Client(base_url=url, timeout=240) as http:
        with http.stream("POST", "/v1/chat/completions", json=body) as r:
            for chunk in r.iter_text():
                received.append(chunk)
    return "".join(received)


def ask(url: str, model: str) -> httpx.Response:
    with httpx.Client(base_url=url, timeout=240) as http:
        return http.post("/v1/chat/completions", json=chat(model, 2, False))


def busy_then_queued(
    server: CorralProcess, pool: ThreadPoolExecutor, received: list[str]
) -> tuple[Future[str], Future[httpx.Response]]:
    """Model "drop" (a ``gated_fake``) loaded, a stream in its one slot until the gate opens,
    and a request queued behind it."""
    assert server.http.post("/admin/models/drop/load").status_code == 200
    streaming = pool.submit(stream, server.url, "drop", 5, received)
    server.wait_for(lambda: len(received) > 0)
    queued = pool.submit(ask, server.url, "drop")
    server.wait_for(lambda: server.model_status("drop")["queue_depth"] == 1)
    return streaming, queued


def drop_from_config(server: CorralProcess, name: str) -> httpx.Response:
    config = yaml.safe_load(server.config_path.read_text())
    del config["models"][name]
    server.config_path.write_text(yaml.safe_dump(config))
    return server.http.post("/admin/reload")


def model_names(server: CorralProcess) -> list[str]:
    return [m["name"] for m in server.http.get("/admin/models").json()["models"]]


def test_sigterm_lets_five_streams_finish_and_refuses_new_requests(
    corral: Start, smollm2: Path
) -> None:
    # However slow the machine, the drain outlasts the streams (the default is 30 s).
    server = corral({"shutdown_timeout": "5m",
                     "models": {"m": {"path": str(smollm2), "slots": 5, "ctx_per_slot": 512},
                                "other": {"path": str(smollm2), "slots": 1,
                                          "ctx_per_slot": 256}}})
    assert server.http.post("/admin/models/m/load").status_code == 200
    children = server.children()

    with ThreadPoolExecutor(5) as pool:
        # m's child is frozen while corral begins to drain: however fast it answers, all five
        # streams are in flight when SIGTERM comes, and finish during the drain.
        # The checks of the drain run while the child is still frozen too: once it goes on,
        # a fast machine finishes the streams, and corral exits, within milliseconds.
        with frozen(server.model("m")["pid"]):
            streams = [pool.submit(stream, server.url, "m", 16, []) for _ in range(5)]
            server.wait_for(lambda: server.model("m")["in_flight"] == 5)
            server.proc.send_signal(signal.SIGTERM)
            server.wait_for(lambda: server.http.get("/health").status_code == 503)
            assert server.http.get("/health").json() == {"status": "draining"}
            refused = server.http.post("/v1/chat/completions", json=chat("m", 2, False))
            assert refused.status_code == 503
            assert refused.json()["error"]["code"] == "shutting_down"
            assert "retry-after" in refused.headers
            # Operators can watch the drain, but no longer load or reload anything.
            assert server.http.get("/admin/status").status_code == 200
            assert server.http.get("/metrics").status_code == 200
            for path in ("/admin/models/other/load", "/admin/reload"):
                answer = server.http.post(path)
                assert answer.status_code == 503
                assert answer.json()["error"]["code"] == "shutting_down"
        bodies = [s.result() for s in streams]
    assert all(b.rstrip().endswith("data: [DONE]") for b in bodies)
    assert all('"finish_reason":"length"' in b for b in bodies)
    assert server.proc.wait(timeout=60) == 0
    assert all(not c.is_running() for c in children)


def endless(smollm2: Path) -> dict[str, Any]:
    return {"path": str(smollm2), "slots": 1, "ctx_per_slot": 512, "args": ENDLESS}


def test_the_drain_gives_up_after_shutdown_timeout(corral: Start, smollm2: Path) -> None:
    server = corral({"shutdown_timeout": "2s", "models": {"m": endless(smollm2)}})
    assert server.http.post("/admin/models/m/load").status_code == 200
    children = server.children()
    took, received = sigterm_during_an_endless_stream(server)
    assert 2.0 <= took < 28.0  # the default (30 s) would be past the margin
    assert "data: [DONE]" not in received
    assert all(not c.is_running() for c in children)
    assert '"drain_timeout"' in server.log()


def test_requests_still_queued_when_the_drain_gives_up_get_a_503(
    corral: Start, smollm2: Path
) -> None:
    server = corral({"shutdown_timeout": "2s", "models": {"m": endless(smollm2)}})
    assert server.http.post("/admin/models/m/load").status_code == 200
    received: list[str] = []
    with ThreadPoolExecutor(2) as pool:
        streaming = pool.submit(stream, server.url, "m", None, received)
        server.wait_for(lambda: len(received) > 2)
        queued = pool.submit(ask, server.url, "m")
        server.wait_for(lambda: server.model_status("m")["queue_depth"] == 1)
        server.proc.send_signal(signal.SIGTERM)
        answer = queued.result(timeout=60)
        assert answer.status_code == 503, answer.text
        assert answer.json()["error"]["code"] == "shutting_down"
        assert "retry-after" in answer.headers
        assert server.proc.wait(timeout=60) == 0
        with contextlib.suppress(httpx.HTTPError):
            streaming.result(timeout=60)


def test_a_request_waiting_for_a_load_when_the_drain_gives_up_gets_a_503(
    corral: Start, smollm2: Path
) -> None:
    # The fake: a real load cannot be made to outlast the drain on demand.
    loading = {"path": str(smollm2), "binary": FAKE_LLAMA_SERVER, "slots": 1,
               "ctx_per_slot": 256, "env": {"FAKE_MODE": "never_ready"}}
    server = corral({"shutdown_timeout": "1s", "llama_server": {"startup_timeout": "60s"},
                     "models": {"slow": loading}})
    with ThreadPoolExecutor(1) as pool:
        waiting = pool.submit(ask, server.url, "slow")
        server.wait_for(lambda: server.model("slow")["state"] == "starting")
        server.proc.send_signal(signal.SIGTERM)
        answer = waiting.result(timeout=60)
    assert answer.status_code == 503, answer.text
    assert answer.json()["error"]["code"] == "shutting_down"
    assert server.proc.wait(timeout=60) == 0


def test_reload_changes_adds_and_removes_models_without_dropping_requests(
    corral: Start, smollm2: Path
) -> None:
    model = {"path": str(smollm2), "slots": 2, "ctx_per_slot": 512}
    server = corral({"models": {"keep": {**model}, "change": {**model}, "drop": {**model}}})
    for name in ("keep", "change", "drop"):
        assert server.http.post(f"/admin/models/{name}/load").status_code == 200
    keep_pid = server.model("keep")["pid"]
    change_pid = server.model("change")["pid"]
    codes: list[tuple[str, int, float]] = []
    answers: list[tuple[str, str]] = []  # the bodies of the non-200 answers, for a failure
    stop = threading.Event()

    def traffic(name: str) -> None:
        with httpx.Client(base_url=server.url, timeout=240) as http:
            while not stop.is_set():
                r = http.post("/v1/chat/completions", json=chat(name, 6, name != "drop"))
                codes.append((name, r.status_code, time.monotonic()))
                if r.status_code != 200:
                    answers.append((name, r.text))
                if name == "drop" and r.status_code == 404:
                    return  # removed: the 404 names the available models

    threads = [threading.Thread(target=traffic, args=(n,)) for n in ("keep", "change", "drop")]
    for t in threads:
        t.start()
    # Traffic flows to all three before the reload.
    server.wait_for(lambda: {n for n, c, _ in list(codes) if c == 200} == {"keep", "change",
                                                                          "drop"})
    config = yaml.safe_load(server.config_path.read_text())
    config["models"]["change"]["ctx_per_slot"] = 256
    config["models"]["new"] = {**model}
    del config["models"]["drop"]
    server.config_path.write_text(yaml.safe_dump(config))
    server.proc.send_signal(signal.SIGHUP)
    server.wait_for(lambda: "drop" not in [m["name"] for m in
                                           server.http.get("/admin/models").json()["models"]])
    server.wait_for(lambda: server.model("change")["ctx_per_slot"] == 256)
    reloaded = time.monotonic()
    # The changed model serves again, with its new settings, while traffic goes on.
    server.wait_for(lambda: any(n == "change" and c == 200 and t > reloaded
                                for n, c, t in list(codes)))
    stop.set()
    for t in threads:
        t.join()

    assert server.model("keep")["pid"] == keep_pid  # unchanged: untouched
    assert server.model("change")["pid"] != change_pid
    new = server.http.post("/v1/chat/completions", json=chat("new", 2, False))
    assert new.status_code == 200
    gone = server.http.post("/v1/chat/completions", json=chat("drop", 2, False))
    assert gone.status_code == 404
    # Every request was answered; only requests sent after "drop" was removed got 404.
    dropped = [(n, c) for n, c, _ in codes if c != 200 and not (n == "drop" and c == 404)]
    assert dropped == [], (answers, server.log()[-6000:])
    assert {n for n, c, _ in codes if c == 200} == {"keep", "change", "drop"}


def test_an_invalid_config_is_refused_and_the_old_one_keeps_running(
    corral: Start, smollm2: Path
) -> None:
    server = corral({"models": {"m": {"path": str(smollm2), "slots": 1, "ctx_per_slot": 256}}})
    original = server.config_path.read_text()
    server.config_path.write_text(original.replace("slots: 1", "slots: 0"))
    refused = server.http.post("/admin/reload")
    assert refused.status_code == 400
    assert "models.m.slots: must be >= 1, got 0" in refused.json()["error"]["message"]
    server.proc.send_signal(signal.SIGHUP)
    server.wait_for(lambda: "config_reload_rejected" in server.log())
    assert server.http.post("/v1/completions", json={"model": "m", "prompt": "Hi",
                                                     "max_tokens": 2}).status_code == 200
    assert server.model("m")["slots"] == 1
    server.config_path.write_text(original)
    accepted = server.http.post("/admin/reload")
    assert accepted.status_code == 200
    assert accepted.json() == {"reloaded": True, "added": [], "changed": [], "removed": []}


ADMIN_KEY = "reload-admin-secret-0123456789"


def rewrite(server: CorralProcess, change: Callable[[dict[str, Any]], None]) -> str:
    """Change the running corral's config file; return what it said before."""
    original = server.config_path.read_text()
    config = yaml.safe_load(original)
    change(config)
    server.config_path.write_text(yaml.safe_dump(config))
    return original


def test_a_reload_cannot_leave_a_network_bound_corral_without_keys(
    corral: Start, smollm2: Path
) -> None:
    server = corral({
        "listen": {"host": "0.0.0.0"},
        "auth": {"keys": [{"key": ADMIN_KEY, "scopes": ["inference", "admin"]}]},
        "models": {"m": {"path": str(smollm2), "slots": 1, "ctx_per_slot": 256}},
    })
    admin = {"Authorization": f"Bearer {ADMIN_KEY}"}

    def to_loopback_without_keys(config: dict[str, Any]) -> None:
        config["listen"]["host"] = "127.0.0.1"
        del config["auth"]

    rewrite(server, to_loopback_without_keys)
    refused = server.http.post("/admin/reload", headers=admin)
    assert refused.status_code == 400
    error = refused.json()["error"]
    assert error["code"] == "reload_refused"
    assert ("listen.host: needs a restart (running with '0.0.0.0', the file says '127.0.0.1')"
            in error["message"])
    assert ("auth.keys: corral listens on '0.0.0.0', reachable from other machines, and the "
            "file has no auth.keys" in error["message"])
    server.proc.send_signal(signal.SIGHUP)
    server.wait_for(lambda: "config_reload_rejected" in server.log())
    ask = {"model": "m", "prompt": "Hi", "max_tokens": 2}
    assert server.http.post("/v1/completions", json=ask).status_code == 401
    assert server.http.post("/v1/completions", json=ask, headers=admin).status_code == 200


def test_a_reload_that_changes_start_up_settings_is_refused(
    corral: Start, smollm2: Path, tmp_path: Path
) -> None:
    server = corral({"models": {"m": {"path": str(smollm2), "slots": 1, "ctx_per_slot": 256}}})

    def move(config: dict[str, Any]) -> None:
        config["listen"]["port"] += 1
        config["state_file"] = str(tmp_path / "elsewhere.json")
        config["reserve"] = {"gpu": "1GiB"}
        config["models"]["m"]["slots"] = 2  # appliable alone, but not with the rest

    original = rewrite(server, move)
    refused = server.http.post("/admin/reload")
    assert refused.status_code == 400
    message = refused.json()["error"]["message"]
    port = server.port
    assert f"listen.port: needs a restart (running with {port}, the file says {port + 1})" \
        in message
    assert "state_file: needs a restart" in message
    assert "reserve.gpu: needs a restart" in message
    assert server.model("m")["slots"] == 1
    server.config_path.write_text(original)
    assert server.http.post("/admin/reload").status_code == 200


def test_a_reload_applies_the_shutdown_and_header_timeouts(
    corral: Start, smollm2: Path
) -> None:
    server = corral({"shutdown_timeout": "5m", "limits": {"header_timeout": "5m"},
                     "models": {"m": endless(smollm2)}})

    def shorten(config: dict[str, Any]) -> None:
        config["shutdown_timeout"] = "2s"
        config["limits"]["header_timeout"] = "1s"

    rewrite(server, shorten)
    assert server.http.post("/admin/reload").json() == {
        "reloaded": True, "added": [], "changed": [], "removed": []}

    # Headers that never end: the connection is closed after the new header timeout (the old
    # one, 5 minutes, would outlast the socket's own timeout).
    began = time.monotonic()
    with socket.create_connection(("127.0.0.1", server.port), timeout=60) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: localhost\r\n")
        assert sock.recv(1024) == b""
        # Never before the new timeout; far sooner than the old one however busy the machine.
        assert 1.0 <= time.monotonic() - began < 1.0 + 120.0

    # An endless stream is cut by the drain at the new shutdown timeout.
    assert server.http.post("/admin/models/m/load").status_code == 200
    took, received = sigterm_during_an_endless_stream(server)
    assert 2.0 <= took < 2.0 + 120.0  # the old timeout was 5 minutes
    assert "data: [DONE]" not in received


def test_a_reload_applies_health_and_restart_settings_to_running_children(
    corral: Start, smollm2: Path
) -> None:
    # At first a hung child would be tolerated for ~1000 probes; after the reload, two misses
    # kill it, and that one crash gives the model up.
    # Each probe has a second to answer (its interval): a loaded machine must not fail one.
    server = corral({"health": {"interval": 1.0, "failures": 1000},
                     "models": {"m": {"path": str(smollm2), "slots": 1, "ctx_per_slot": 256}}})
    assert server.http.post("/admin/models/m/load").status_code == 200
    (child,) = server.children()

    def stricter(config: dict[str, Any]) -> None:
        config["health"]["failures"] = 2
        config["restart"] = {"max_failures": 1}

    rewrite(server, stricter)
    assert server.http.post("/admin/reload").json() == {
        "reloaded": True, "added": [], "changed": [], "removed": []}
    assert server.model("m")["pid"] == child.pid  # unchanged model: not restarted
    child.send_signal(signal.SIGSTOP)  # hung: alive, but /health never answers
    server.wait_for(lambda: not child.is_running() or child.status() == psutil.STATUS_ZOMBIE)
    server.wait_for(lambda: server.model("m")["given_up"])
    assert server.model("m")["state"] == "given_up"


def test_a_model_removed_and_added_back_before_it_stopped_keeps_serving(
    corral: Start, smollm2: Path
) -> None:
    server = corral({"models": {"m": endless(smollm2), "other": endless(smollm2)}})
    assert server.http.post("/admin/models/m/load").status_code == 200
    pid = server.model("m")["pid"]
    original = yaml.safe_load(server.config_path.read_text())
    without = {**original, "models": {"other": original["models"]["other"]}}

    # A request in flight across both reloads (it never ends by itself): the removed model
    # waits for it before it stops, and is put back meanwhile.
    with holding_a_slot(server, "m"):
        server.config_path.write_text(yaml.safe_dump(without))
        removed = server.http.post("/admin/reload")
        assert removed.json() == {"reloaded": True, "added": [], "changed": [], "removed": ["m"]}
        server.config_path.write_text(yaml.safe_dump(original))
        back = server.http.post("/admin/reload")
        assert back.json() == {"reloaded": True, "added": ["m"], "changed": [], "removed": []}
        assert server.model("m")["in_flight"] == 1  # still served, not cut
    # Once its request has ended, nothing of the removal is left to stop and forget it.
    server.wait_for(lambda: server.model("m")["in_flight"] == 0)
    server.keeps(lambda: server.model("m")["pid"] == pid and server.model("m")["state"] == "ready",
                 seconds=1.0)

    # It kept its child, serves, and the next reload finds everything in place.
    assert server.http.post("/v1/chat/completions", json=chat("m", 2, False)).status_code == 200
    again = server.http.post("/admin/reload")
    assert again.status_code == 200, again.text
    assert again.json() == {"reloaded": True, "added": [], "changed": [], "removed": []}


def test_a_removed_model_serves_what_waits_for_it_then_never_starts_again(
    corral: Start, smollm2: Path, tmp_path: Path
) -> None:
    record, gate = tmp_path / "drop.txt", tmp_path / "gate"
    server = corral({"shutdown_timeout": "1s",
                     "models": {"drop": gated_fake(smollm2, record, gate),
                                "other": gated_fake(smollm2, tmp_path / "other.txt", gate)}})
    received: list[str] = []
    with ThreadPoolExecutor(2) as pool:
        # Its one slot is taken until the gate opens, so `queued` waits.
        streaming, queued = busy_then_queued(server, pool, received)
        removed = drop_from_config(server, "drop")
        assert removed.json()["removed"] == ["drop"]
        # Past shutdown_timeout (time is the point here), neither is cut nor refused.
        server.keeps(lambda: not streaming.done() and not queued.done(), seconds=1.0 + 1.0)
        gate.touch()
        assert streaming.result().rstrip().endswith("data: [DONE]")
        assert queued.result().status_code == 200
    server.wait_for(lambda: "drop" not in model_names(server))
    # Served by the child it had; none was started for it after the removal, none is left.
    assert children_started(record) == 1
    assert server.children(None) == []
    assert ask(server.url, "drop").status_code == 404


def test_a_request_still_queued_when_a_removed_models_drain_ends_gets_503(
    corral: Start, smollm2: Path, tmp_path: Path
) -> None:
    record, gate = tmp_path / "drop.txt", tmp_path / "gate"  # never opened
    # generation_timeout: long enough that a busy machine's delays cannot pass for a second
    # wait, short enough against the queue timeout (60 s).
    server = corral({"shutdown_timeout": "1s", "upstream": {"generation_timeout": "15s"},
                     "models": {"drop": gated_fake(smollm2, record, gate),
                                "other": gated_fake(smollm2, tmp_path / "other.txt", gate)}})
    received: list[str] = []
    with ThreadPoolExecutor(2) as pool:
        # A stream that would never end: longer than a removed model waits (generation_timeout).
        streaming, queued = busy_then_queued(server, pool, received)
        removed_at = time.monotonic()
        assert drop_from_config(server, "drop").json()["removed"] == ["drop"]
        reply = queued.result()
        waited = time.monotonic() - removed_at
        try:
            streaming.result()  # cut once the drain is over
        except httpx.HTTPError:
            pass
        cut = time.monotonic() - removed_at
    assert reply.status_code == 503, reply.text
    assert int(reply.headers["retry-after"]) >= 1
    error = reply.json()["error"]
    assert error["code"] == "model_unavailable"
    assert "removed from the configuration" in error["message"]
    assert 15.0 <= waited < 55.0  # at the end of the drain, not at its queue timeout (60s)
    # generation_timeout bounds the whole retire: the stop does not wait another 15 s.
    assert cut - waited < 10.0, (waited, cut)
    server.wait_for(lambda: "drop" not in model_names(server))
    assert children_started(record) == 1
    assert server.children(None) == []
    # Forgotten by the proxy too: its queue's series leave /metrics.
    server.wait_for(lambda: 'corral_queue_depth{model="drop"}' not in
                    server.http.get("/metrics").text)


def test_a_reload_lets_streams_longer_than_shutdown_timeout_finish(
    corral: Start, smollm2: Path, tmp_path: Path
) -> None:
    changed, dropped, gate = tmp_path / "change.txt", tmp_path / "drop.txt", tmp_path / "gate"
    server = corral({"shutdown_timeout": "1s",
                     "models": {"change": gated_fake(smollm2, changed, gate),
                                "drop": gated_fake(smollm2, dropped, gate)}})
    for name in ("change", "drop"):
        assert server.http.post(f"/admin/models/{name}/load").status_code == 200
    old_pid = server.model("change")["pid"]
    received: dict[str, list[str]] = {"change": [], "drop": []}
    with ThreadPoolExecutor(2) as pool:
        # Each runs until the gate opens.
        streams = {n: pool.submit(stream, server.url, n, 5, r) for n, r in received.items()}
        server.wait_for(lambda: all(received.values()))
        config = yaml.safe_load(server.config_path.read_text())
        config["models"]["change"]["ttl"] = "5m"
        del config["models"]["drop"]
        server.config_path.write_text(yaml.safe_dump(config))
        reload = server.http.post("/admin/reload").json()
        assert (reload["changed"], reload["removed"]) == (["change"], ["drop"])
        # Past shutdown_timeout (time is the point here), both still run.
        server.keeps(lambda: not any(s.done() for s in streams.values()), seconds=1.0 + 1.0)
        gate.touch()
        bodies = {n: s.result() for n, s in streams.items()}
    assert bodies["change"].rstrip().endswith("data: [DONE]")
    assert bodies["drop"].rstrip().endswith("data: [DONE]")
    # Then the changed model restarted with its new settings, and the removed one is gone.
    server.wait_for(lambda: server.model("change")["pid"] not in (None, old_pid))
    assert server.model("change")["ttl_seconds"] == 300
    assert ask(server.url, "change").status_code == 200
    server.wait_for(lambda: "drop" not in model_names(server))
    assert (children_started(changed), children_started(dropped)) == (2, 1)


def test_a_request_for_a_model_restarting_for_a_reload_waits_at_most_its_queue_timeout(
    corral: Start, smollm2: Path, tmp_path: Path
) -> None:
    gate = tmp_path / "gate"
    # Two slots: the second request is admitted at once, and waits for the model itself.
    model = {**gated_fake(smollm2, tmp_path / "change.txt", gate), "slots": 2,
             "queue": {"timeout": "1s"}}
    server = corral({"shutdown_timeout": "1s", "models": {"change": model}})
    assert server.http.post("/admin/models/change/load").status_code == 200
    received: list[str] = []
    with ThreadPoolExecutor(1) as pool:
        # Until the gate opens: the reload's restart waits for it.
        streaming = pool.submit(stream, server.url, "change", 5, received)
        server.wait_for(lambda: len(received) > 0)
        config = yaml.safe_load(server.config_path.read_text())
        config["models"]["change"]["ttl"] = "5m"
        server.config_path.write_text(yaml.safe_dump(config))
        assert server.http.post("/admin/reload").json()["changed"] == ["change"]
        began = time.monotonic()
        reply = ask(server.url, "change")
        took = time.monotonic() - began
        assert not streaming.done()  # the stream still runs: the answer did not wait for it
        gate.touch()
        assert streaming.result().rstrip().endswith("data: [DONE]")
    assert reply.status_code == 503, reply.text
    assert reply.json()["error"]["code"] == "model_unavailable"
    assert "retry-after" in reply.headers
    assert 1.0 <= took < 46.0  # its queue timeout, not the default (60 s)
