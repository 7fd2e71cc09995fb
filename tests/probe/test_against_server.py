"""The estimate against the real llama-server: the KV cache exact, the total within 1%."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

from corral.placement.estimate import estimate_memory
from corral.probe.gguf import read_profile
from corral.probe.usage import parse_buffer_sizes

MiB = 1 << 20
READY = re.compile(r"llama_server: model loaded|listening on http|failed to load|exiting due to")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def startup_log(binary: str, model: Path, args: list[str], timeout: float = 60.0) -> list[str]:
    """llama-server's output up to "model loaded"; the server is killed whatever happens."""
    proc = subprocess.Popen(
        [binary, "-m", str(model), "--host", "127.0.0.1", "--port", str(free_port()),
         "--log-verbosity", "4", "-t", "1", "--no-warmup", "--no-webui", *args],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )
    lines: list[str] = []
    deadline = time.monotonic() + timeout
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)
            if READY.search(line) or time.monotonic() > deadline:
                break
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        if proc.stdout is not None:
            proc.stdout.close()
    return lines


@pytest.mark.integration
def test_smollm2_estimate_matches_llama_server(llama_server: str, smollm2: Path) -> None:
    est = estimate_memory(read_profile(smollm2), slots=3, ctx_per_slot=1024,
                          cache_type_k="q8_0", cache_type_v="f16",
                          gpu_overhead=0, host_overhead=0).on("cpu")
    log = startup_log(llama_server, smollm2, ["--fit", "off", "-np", "3", "-c", "3072",
                                              "--cache-type-k", "q8_0", "--cache-type-v", "f16",
                                              "--cache-ram", "0"])
    rep = parse_buffer_sizes(log)
    assert rep.total() > 0, "".join(log)
    # KV lines carry two decimals of MiB: equal to within their rounding
    assert abs(rep.get("cpu", "kv_cache") - est.kv_cache) <= 0.005 * MiB
    assert abs(rep.get("cpu", "output") - est.output) <= 0.005 * MiB
    assert abs(rep.get("cpu", "weights") - est.weights) <= 0.005 * MiB
    assert abs(rep.total() - est.total) <= 0.01 * rep.total()
