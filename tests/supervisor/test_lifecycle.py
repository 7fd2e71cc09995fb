"""corral's children over their whole life, with the real llama-server."""

from __future__ import annotations

import json
import signal
import subprocess
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psutil
import pytest
import yaml

from corral.probe.host import socket_dir
from tests.conftest import CorralProcess, free_port, frozen

pytestmark = pytest.mark.integration

Start = Callable[..., CorralProcess]


def model(smollm2: Path, **extra: object) -> dict[str, object]:
    return {"path": str(smollm2), "slots": 1, "ctx_per_slot": 512, **extra}


def test_preload_starts_at_startup(corral: Start, smollm2: Path) -> None:
    server = corral({"models": {"eager": model(smollm2, preload=True), "lazy": model(smollm2)}})
    server.wait_for(lambda: server.model("eager")["state"] == "ready")
    assert server.model("lazy")["state"] == "unloaded"
    assert len(server.children()) == 1


def test_sigterm_finishes_requests_stops_children_and_exits_0(
    corral: Start, smollm2: Path
) -> None:
    # However slow the machine, the drain outlasts the answers (the default is 30 s).
    server = corral({"shutdown_timeout": "5m",
                     "models": {"a": model(smollm2, slots=2), "b": model(smollm2)}})
    for name in ("a", "b"):
        assert server.http.post(f"/admin/models/{name}/load").status_code == 200
    children = server.children()
    assert len(children) == 2
    state_file = yaml.safe_load(server.config_path.read_text())["state_file"]
    sockets = socket_dir(Path(state_file))
    assert sorted(p.name for p in sockets.iterdir()) == ["a.sock", "b.sock"]

    def generate(_: int) -> tuple[int, str]:
        body = {"model": "a", "prompt": "Count:", "max_tokens": 8, "ignore_eos": True}
        # A CPU shared with other work (CI) can make a few tokens take a minute: the
        # answer's time is not what this checks.
        response = server.http.post("/v1/completions", json=body, timeout=240)
        return response.status_code, response.json()["choices"][0]["text"]

    with ThreadPoolExecutor(2) as pool:
        # a's child is frozen until corral drains: however fast it answers, both requests are
        # still in flight when SIGTERM comes.
        with frozen(server.model("a")["pid"]):
            results = pool.map(generate, range(2))
            server.wait_for(lambda: server.model("a")["in_flight"] == 2)
            server.proc.send_signal(signal.SIGTERM)
            server.wait_for(lambda: server.http.get("/health").status_code == 503)
        assert server.proc.wait(timeout=240) == 0  # once both answers are done
        finished = list(results)
    assert [code for code, _ in finished] == [200, 200]
    assert all(text for _, text in finished)
    for child in children:
        assert not child.is_running()
    assert not sockets.exists()  # the children's sockets go with them, and their directory
    assert sockets.parent.exists()  # shared by every corral of this user


def test_sigkill_of_corral_takes_the_children_with_it(corral: Start, smollm2: Path) -> None:
    server = corral({"models": {"a": model(smollm2, preload=True)}})
    server.wait_for(lambda: server.model("a")["state"] == "ready")
    children = server.children()
    assert len(children) == 1
    server.proc.kill()
    server.proc.wait()
    _, alive = psutil.wait_procs(children, timeout=30.0)
    assert alive == []


def test_leftovers_of_an_earlier_run_are_stopped_at_startup(
    corral: Start, smollm2: Path, llama_server: str, tmp_path: Path
) -> None:
    # A llama-server with no parent-death signal, as if an earlier corral had been killed on a
    # system that does not deliver it, recorded in that corral's state file.
    orphan = subprocess.Popen(
        [llama_server, "-m", str(smollm2), "--port", str(free_port()), "-c", "512"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    try:
        state_file = tmp_path / "state.json"
        created = psutil.Process(orphan.pid).create_time()
        state_file.write_text(json.dumps(
            {str(orphan.pid): {"create_time": created, "model": "a"}}))
        corral({"models": {"a": model(smollm2)}, "state_file": str(state_file)})
        assert orphan.wait(timeout=60) == -signal.SIGKILL
        assert json.loads(state_file.read_text()) == {}
    finally:
        if orphan.poll() is None:
            orphan.kill()
            orphan.wait()


def test_a_second_corral_with_the_same_state_file_leaves_the_first_ones_children_alone(
    corral: Start, smollm2: Path, tmp_path: Path
) -> None:
    state_file = tmp_path / "state.json"
    config = {"models": {"a": model(smollm2, preload=True)}, "state_file": str(state_file)}
    first = corral(config)
    first.wait_for(lambda: first.model("a")["state"] == "ready")
    pid = first.model("a")["pid"]

    second = corral(config, wait=False)  # another port, the same state file
    assert second.proc.wait(timeout=60) == 1
    message = second.log()
    assert f"another corral (pid {first.proc.pid}) is running with the state file " \
           f"{state_file}" in message
    assert f"{state_file}.lock" in message
    assert psutil.pid_exists(pid)
    assert first.model("a")["pid"] == pid
    answer = first.http.post("/v1/completions", json={"model": "a", "prompt": "Hi",
                                                      "max_tokens": 2})
    assert answer.status_code == 200

    # The lock goes with the process: once the first corral stopped, the file is free again.
    assert first.stop() == 0
    corral(config)


def test_state_file_ignores_a_recycled_pid(corral: Start, smollm2: Path, tmp_path: Path) -> None:
    bystander = subprocess.Popen(["sleep", "30"])
    try:
        state_file = tmp_path / "state.json"
        state_file.write_text(json.dumps({str(bystander.pid): {"create_time": 1.0,
                                                               "model": "a"}}))
        corral({"models": {"a": model(smollm2)}, "state_file": str(state_file)})
        assert bystander.poll() is None
    finally:
        bystander.kill()
        bystander.wait()


def test_a_crashed_child_is_reported_and_loaded_again(corral: Start, smollm2: Path) -> None:
    server = corral({"models": {"a": model(smollm2)}})
    assert server.http.post("/admin/models/a/load").status_code == 200
    (child,) = server.children()
    child.kill()
    server.wait_for(lambda: server.model("a")["state"] == "crashed")
    info = server.model("a")
    assert "exited unexpectedly" in info["last_error"]
    assert info["last_stop_reason"] == "crash"
    server.wait_for(
        lambda: server.http.post("/v1/completions", json={
            "model": "a", "prompt": "Hi", "max_tokens": 2}).status_code == 200,
    )
    assert server.model("a")["loads"] == 2
    assert len(server.children()) == 1


def test_child_output_becomes_log_events(corral: Start, smollm2: Path) -> None:
    server = corral({"models": {"a": model(smollm2)}, "log_level": "debug"})
    assert server.http.post("/admin/models/a/load").status_code == 200
    events = [json.loads(line) for line in server.log().splitlines() if line.startswith("{")]
    pid = server.model("a")["pid"]
    lines = [e for e in events if e["event"] == "child_output"]
    assert lines and all(e["model"] == "a" and e["pid"] == pid for e in lines)
    assert any("server is listening" in e["line"] or "model loaded" in e["line"] for e in lines)


def test_the_last_200_lines_a_model_printed_are_kept_and_shown(
    corral: Start, smollm2: Path, tmp_path: Path
) -> None:
    # A stand-in binary: the real llama-server cannot be made to print 500 numbered lines and
    # exit on demand. Its output must come through as it does for llama-server.
    noisy = tmp_path / "noisy-server"
    noisy.write_text("#!/bin/sh\nfor i in $(seq 1 500); do echo \"line $i\"; done\nexit 3\n")
    noisy.chmod(0o755)
    server = corral({"log_level": "debug",
                     "models": {"noisy": model(smollm2, binary=str(noisy)),
                                "fine": model(smollm2)}})
    failed = server.http.post("/admin/models/noisy/load")
    assert failed.status_code == 503
    assert "exited with code 3" in failed.json()["error"]["message"]
    assert "line 500" in failed.json()["error"]["message"]
    logs = server.http.get("/admin/models/noisy/logs")
    assert logs.status_code == 200
    assert logs.json()["lines"] == [f"line {i}" for i in range(301, 501)]
    # Each line is also a structured event tagged with the model (at debug level).
    events = [json.loads(line) for line in server.log().splitlines() if '"line 42"' in line]
    assert [(e["event"], e["model"]) for e in events] == [("child_output", "noisy")]
    assert server.http.get("/admin/models/fine/logs").json()["lines"] == []
    assert server.http.get("/admin/models/nope/logs").status_code == 404
