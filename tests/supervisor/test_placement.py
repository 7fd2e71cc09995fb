"""Memory-aware placement in the running corral, with the real llama-server and SmolLM2.

The host budget is declared (``devices: [{id: cpu, memory: ...}]``) so that exactly one SmolLM2
child fits; every decision is then checked against what corral did and what ``corral plan``
said it would do.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from corral.config import parse_config
from corral.planreport import build_report
from tests.conftest import ENDLESS, FAKE_LLAMA_SERVER, CorralProcess, holding_a_slot

pytestmark = pytest.mark.integration

Start = Callable[..., CorralProcess]
MiB = 2**20


def model(smollm2: Path, **extra: Any) -> dict[str, Any]:
    return {"path": str(smollm2), "slots": 1, "ctx_per_slot": 512, "queue": {"timeout": "2s"},
            **extra}


def one_fits(smollm2: Path, **models: dict[str, Any]) -> dict[str, Any]:
    """A config whose host budget holds one SmolLM2 child (1 slot x 512) but not two."""
    probe = parse_config({"devices": [{"id": "cpu", "memory": "64GiB"}],
                          "reserve": {"ram": 0}, "models": {"m": model(smollm2)}})
    need = build_report(probe).models[0].plan
    assert need is not None
    budget = int(need.reservation["cpu"] * 1.5)
    return {"devices": [{"id": "cpu", "memory": budget}], "reserve": {"ram": 0},
            "models": models}


def ask(server: CorralProcess, name: str, tokens: int = 2) -> int:
    body = {"model": name, "prompt": "Hi", "max_tokens": tokens, "ignore_eos": True}
    # Generous: a loaded two-core machine can take a minute for a few hundred tokens.
    return server.http.post("/v1/completions", json=body, timeout=300).status_code


def test_an_idle_model_is_evicted_to_make_room(corral: Start, smollm2: Path) -> None:
    server = corral(one_fits(smollm2, a=model(smollm2), b=model(smollm2)))
    assert ask(server, "a") == 200
    assert ask(server, "b") == 200
    a, b = server.model("a"), server.model("b")
    assert a["state"] == "unloaded" and a["last_stop_reason"] == "memory"
    assert b["state"] == "ready" and len(server.children()) == 1
    metrics = server.http.get("/metrics").text
    assert 'corral_model_evictions_total{model="a",reason="memory"} 1.0' in metrics
    assert "model_evicting" in server.log()
    cpu = next(d for d in server.http.get("/admin/status").json()["devices"]
               if d["device"] == "cpu")
    assert cpu["holders"] == {"b": b["memory"]["estimated"]["cpu"]}
    # What llama-server reported allocating stays within the estimate.
    assert 0 < b["memory"]["actual"]["cpu"] <= b["memory"]["estimated"]["cpu"]


def test_busy_and_pinned_models_are_never_evicted(corral: Start, smollm2: Path) -> None:
    server = corral(one_fits(smollm2, a=model(smollm2, args=ENDLESS), b=model(smollm2),
                             p=model(smollm2, pinned=True)))
    assert server.http.post("/admin/models/a/load").status_code == 200
    # a stays busy until the test is done with b: b waits its 2 s queue timeout for memory.
    with holding_a_slot(server, "a"):
        refused = server.http.post("/v1/completions", json={"model": "b", "prompt": "Hi"})
        assert server.model("a")["in_flight"] == 1
    server.wait_for(lambda: server.model("a")["in_flight"] == 0)  # corral saw the client leave
    assert refused.status_code == 503
    message = refused.json()["error"]["message"]
    assert "not enough memory" in message and "held by a" in message
    assert server.model("a")["state"] == "ready"

    # Now a is idle: loading the pinned model evicts it; nothing can evict the pinned one.
    assert ask(server, "p") == 200
    assert server.model("a")["last_stop_reason"] == "memory"

    def refused_for_p() -> bool:
        refused = server.http.post("/v1/completions", json={"model": "b", "prompt": "Hi"})
        assert refused.status_code == 503, refused.text
        return "held by p" in refused.json()["error"]["message"]

    # Within the back-off of b's failed load (up to 1 s) a request hears that failure again;
    # the next load finds p in the way.
    server.wait_for(refused_for_p)
    assert server.model("p")["state"] == "ready"


def test_a_load_waits_for_a_busy_model_to_finish_then_takes_its_place(
    corral: Start, smollm2: Path
) -> None:
    server = corral(one_fits(smollm2, a=model(smollm2, args=ENDLESS),
                             b=model(smollm2, queue={"timeout": "300s"})))
    assert server.http.post("/admin/models/a/load").status_code == 200
    with ThreadPoolExecutor(1) as pool:
        with holding_a_slot(server, "a"):
            waiting = pool.submit(ask, server, "b")
            # b waits (a is busy, so not evictable) and is seen waiting, not refused.
            server.wait_for(lambda: server.model_status("b")["queue_depth"] == 1)
            # Its load has begun but waits for memory: no process is started for it yet.
            assert not waiting.done() and server.model("b")["pid"] is None
            assert len(server.children()) == 1
        # a's request has ended: a is idle, and b takes its place.
        assert waiting.result() == 200
    assert server.model("a")["state"] == "unloaded"
    assert server.model("a")["last_stop_reason"] == "memory"
    assert server.model("b")["state"] == "ready" and len(server.children()) == 1


def test_a_model_that_can_never_fit_is_refused_at_once(corral: Start, smollm2: Path) -> None:
    config = one_fits(smollm2, big=model(smollm2, slots=64, ctx_per_slot=8192))
    server = corral(config)
    response = server.http.post("/v1/completions", json={"model": "big", "prompt": "Hi"})
    assert response.status_code == 503
    message = response.json()["error"]["message"]
    assert "cpu: needs" in message and "even when idle" in message
    assert server.children() == []


def test_corral_plan_and_the_server_decide_alike(
    corral: Start, smollm2: Path, tmp_path: Path, llama_server: str
) -> None:
    config = {"devices": [{"id": "cpu", "memory": "3GiB"}], "reserve": {"ram": "512MiB"},
              "llama_server": {"binary": llama_server},
              "state_file": str(tmp_path / "children.json"),  # so the sockets match too
              "models": {"auto": {"path": str(smollm2), "slots": "auto", "max_slots": 6,
                                  "ctx_per_slot": "auto", "cache_type_k": "q8_0",
                                  "cache_type_v": "q8_0", "preload": True}}}
    path = tmp_path / "plan.yaml"
    path.write_text(yaml.safe_dump(config))
    result = subprocess.run([sys.executable, "-m", "corral", "plan", "-c", str(path), "--json"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    planned = json.loads(result.stdout)["models"][0]
    assert planned["slots"] == 6  # as many as max_slots allows ...
    assert planned["ctx_per_slot"] == 8192  # ... each with the whole trained context

    server = corral(config)
    server.wait_for(lambda: server.model("auto")["state"] == "ready")
    running = server.model("auto")
    assert running["slots"] == planned["slots"]
    assert running["ctx_per_slot"] == planned["ctx_per_slot"]  # as the child reports it
    assert running["gpu_layers"] == planned["gpu_layers"] == 0
    assert running["memory"]["estimated"] == {d: m["total"] for d, m in
                                              planned["memory"].items()}
    slots = server.http.get("/slots", params={"model": "auto"}).json()
    assert [s["n_ctx"] for s in slots] == [8192] * 6
    argv = server.children()[0].cmdline()
    for flag in ("--fit", "off", "--cache-type-k", "q8_0", "-np", "6", "-c", str(6 * 8192)):
        assert flag in argv
    assert argv == planned["command"]  # the very command `corral plan` printed


def test_the_command_corral_plan_prints_runs_the_model_as_planned(
    smollm2: Path, tmp_path: Path, llama_server: str
) -> None:
    config = {"devices": [{"id": "cpu", "memory": "3GiB"}], "reserve": {"ram": "512MiB"},
              "llama_server": {"binary": llama_server},
              "state_file": str(tmp_path / "children.json"),
              "models": {"m": {"path": str(smollm2), "slots": 2, "ctx_per_slot": 512}}}
    path = tmp_path / "plan.yaml"
    path.write_text(yaml.safe_dump(config))
    result = subprocess.run([sys.executable, "-m", "corral", "plan", "-c", str(path), "--json"],
                            capture_output=True, text=True, timeout=60, check=True)
    planned = json.loads(result.stdout)["models"][0]
    text = subprocess.run([sys.executable, "-m", "corral", "plan", "-c", str(path)],
                          capture_output=True, text=True, timeout=60, check=True).stdout
    assert shlex.join(planned["command"]) in text  # the text form shows the same command
    socket = Path(planned["socket"])
    socket.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    # Run outside corral exactly as printed: its variables on top of this environment.
    child = subprocess.Popen(planned["command"], env={**os.environ, **planned["env"]},
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        with httpx.Client(transport=httpx.HTTPTransport(uds=str(socket)),
                          base_url="http://llama-server", timeout=30) as http:
            deadline = time.monotonic() + 120
            while True:
                assert child.poll() is None, "the planned command exited"
                assert time.monotonic() < deadline, "not ready in time"
                with contextlib.suppress(httpx.TransportError):
                    if http.get("/health").status_code == 200:
                        break
                time.sleep(0.1)
            slots = http.get("/slots").json()
            assert [s["n_ctx"] for s in slots] == [512, 512]  # the planned slots and context
            reply = http.post("/completion", json={"prompt": "Hi", "n_predict": 1})
            assert reply.status_code == 200 and "content" in reply.json()
    finally:
        child.kill()
        child.wait()


def test_corral_plan_fails_when_preloaded_models_do_not_fit(
    smollm2: Path, tmp_path: Path
) -> None:
    config = one_fits(smollm2, a=model(smollm2, preload=True), b=model(smollm2, pinned=True),
                      c=model(smollm2))
    path = tmp_path / "plan.yaml"
    path.write_text(yaml.safe_dump(config))
    result = subprocess.run([sys.executable, "-m", "corral", "plan", "-c", str(path)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert "resident together: a" in result.stdout
    assert "PROBLEM: preloaded/pinned models do not all fit: b" in result.stdout


def test_actual_memory_and_rss_are_shown_and_an_overrun_is_logged(
    corral: Start, smollm2: Path
) -> None:
    # Every flag that changes the real llama-server's memory is either part of the estimate (a
    # draft model, tensor overrides: tuning settings) or refused in `args`, so the child that
    # overruns is the fake, printing the buffer line llama-server prints, with 1 GiB of weights
    # where the estimate has 92 MiB.
    server = corral({"models": {
        "plain": model(smollm2),
        "overrun": model(smollm2, binary=FAKE_LLAMA_SERVER, env={"FAKE_MODEL_MIB": "1024"}),
    }})
    for name in ("plain", "overrun"):
        assert server.http.post(f"/admin/models/{name}/load").status_code == 200
    plain, overrun = server.model("plain")["memory"], server.model("overrun")["memory"]
    assert plain["rss"] > 50 * MiB and overrun["rss"] > 0
    assert plain["actual"]["cpu"] <= plain["estimated"]["cpu"] * 1.1
    assert overrun["actual"]["cpu"] == 1024 * MiB > overrun["estimated"]["cpu"] * 1.1
    warnings = [json.loads(line) for line in server.log().splitlines()
                if '"memory_above_estimate"' in line]
    assert [(w["model"], w["device"], w["actual"]) for w in warnings] == [
        ("overrun", "cpu", 1024 * MiB)]
