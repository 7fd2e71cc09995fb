"""Compare corral's memory estimate with what the real llama-server allocates.

For each case, start llama-server (127.0.0.1 only, ``--fit off``, ``--log-verbosity 4``,
explicit ``-np N -c N*ctx``), read the buffer sizes it prints while loading, stop it, and put
them beside ``corral.placement.estimate.estimate_memory`` for the same settings. The models are
SmolLM2-135M (the real file) and three synthetic GGUFs written by ``synthetic_models.py``
(K != V heads with a sliding-window pattern array, Gemma-3 sliding window, Qwen3-MoE experts).

    .venv/bin/python bench/estimate_accuracy.py            # writes docs/benchmarks.md
    .venv/bin/python bench/estimate_accuracy.py --print    # table on stdout only

Only the CPU backend is measured (this machine has no GPU); the overhead terms (CUDA context,
process, prompt cache) are left out of both columns because no buffer line reports them.
Every server is killed before the next starts, also on errors; each run is bounded in time.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from corral.placement.estimate import (
    DeviceEstimate,
    MemoryEstimate,
    checkpoint_bytes,
    estimate_memory,
)
from corral.probe.gguf import read_profile
from corral.probe.usage import ReportedMemory, parse_buffer_sizes

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

from synthetic_models import MODELS, write_all  # noqa: E402

MiB = 1 << 20
SMOLLM2 = ROOT / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
START = "<!-- estimate-accuracy:start -->"
END = "<!-- estimate-accuracy:end -->"
RUN_TIMEOUT = 90.0
# Loaded (every buffer has been printed by then) or given up.
READY = re.compile(r"llama_server: model loaded|listening on http|failed to load|exiting due to")


@dataclass(frozen=True)
class Case:
    model: str  # "smollm2" or a synthetic model name
    slots: int
    ctx: int
    type_k: str = "f16"
    type_v: str = "f16"
    flash_attn: bool = True
    ubatch: int = 512  # -ub (-b is 2048, or the micro-batch when larger)
    kv_unified: bool = False
    swa_full: bool = False
    draft: str | None = None  # a draft model (-md), by the same names as ``model``
    checkpoints: int = 0  # --ctx-checkpoints, measured by sending a long prompt once loaded

    def label(self) -> str:
        cache = self.type_k if self.type_k == self.type_v else f"{self.type_k}/{self.type_v}"
        extras = [text for on, text in (
            (not self.flash_attn, "no FA"), (self.ubatch != 512, f"-ub {self.ubatch}"),
            (self.kv_unified, "unified KV"), (self.swa_full, "full SWA"),
            (self.draft is not None, f"draft {self.draft}"),
            (self.checkpoints > 0, f"{self.checkpoints} checkpoints"),
        ) if on]
        return ", ".join([f"{self.slots} x {self.ctx}", cache, *extras])

    @property
    def batch(self) -> int:
        return max(2048, self.ubatch)


CASES = [
    Case("smollm2", 1, 2048),
    Case("smollm2", 4, 2048),
    Case("smollm2", 8, 1024),
    Case("smollm2", 16, 512),
    Case("smollm2", 64, 256),  # 64 logits rows outgrow the FFN activations
    Case("smollm2", 2, 4096, "q8_0", "q8_0"),
    Case("smollm2", 4, 2048, "q4_0", "q4_0"),
    Case("smollm2", 1, 8192, "f16", "q8_0"),
    Case("smollm2", 2, 2048, flash_attn=False),
    Case("kv_split", 1, 2048),
    Case("kv_split", 2, 4096),
    Case("kv_split", 4, 1024, "q8_0", "q8_0"),
    Case("swa", 1, 256),
    Case("swa", 2, 4096),
    Case("swa", 4, 1024, "q8_0", "q8_0"),
    Case("swa", 1, 8192),
    Case("moe", 1, 2048),
    Case("moe", 4, 2048),
    Case("moe", 2, 1024, "q4_0", "q4_0"),
    # Tuning settings (README, configuration reference), each against the same server flags.
    Case("smollm2", 2, 2048, ubatch=128),
    Case("smollm2", 2, 2048, ubatch=2048),
    Case("swa", 2, 4096, ubatch=128),
    Case("moe", 1, 4096, ubatch=2048),
    Case("swa", 2, 2048, flash_attn=False),
    Case("moe", 2, 1024, flash_attn=False),
    Case("smollm2", 4, 1024, kv_unified=True),
    Case("swa", 4, 2048, kv_unified=True),
    Case("swa", 2, 4096, swa_full=True),
    Case("smollm2", 2, 2048, draft="smollm2"),
    Case("smollm2", 1, 4096, "q8_0", "q8_0", draft="smollm2"),
    Case("swa", 1, 2048, checkpoints=2),
]
# A prompt of about 1500 tokens (the synthetic vocabulary is byte-level): long enough for two
# checkpoints to be created while it is processed.
CHECKPOINT_PROMPT = "abcdefghij " * 136
CHECKPOINT = re.compile(r"created context checkpoint \d+ of \d+ .*size = ([\d.]+) MiB")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def find_llama_server() -> str:
    explicit = os.environ.get("CORRAL_LLAMA_SERVER")
    beside = Path(sys.executable).parent / "llama-server"
    return explicit or (str(beside) if beside.exists() else "llama-server")


def server_args(case: Case, model: Path, port: int, draft: Path | None = None) -> list[str]:
    return [
        "-m", str(model), "--host", "127.0.0.1", "--port", str(port), "--fit", "off",
        "--log-verbosity", "4", "-t", "1", "--no-warmup", "--no-webui", "--cache-ram", "0",
        "-np", str(case.slots), "-c", str(case.slots * case.ctx),
        "--cache-type-k", case.type_k, "--cache-type-v", case.type_v,
        "-fa", "on" if case.flash_attn else "off", "-b", str(case.batch), "-ub", str(case.ubatch),
        *(["--kv-unified"] if case.kv_unified else []),
        *(["--swa-full"] if case.swa_full else []),
        *(["--model-draft", str(draft), "--cache-type-k-draft", case.type_k,
           "--cache-type-v-draft", case.type_v] if draft is not None else []),
        "--ctx-checkpoints", str(case.checkpoints),
    ]


def measure(binary: str, case: Case, model: Path, draft: Path | None
            ) -> tuple[ReportedMemory, int, list[str]]:
    """Start llama-server for ``case``, collect its log until it is loaded (and, for a case
    with checkpoints, until it has processed a long prompt), then kill it. Returns the buffers,
    the bytes of the checkpoints it kept, and the log."""
    port = free_port()
    cmd = [binary, *server_args(case, model, port, draft)]
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True,
    )
    lines: list[str] = []
    assert proc.stdout is not None
    reader = threading.Thread(target=lambda: lines.extend(proc.stdout or ()), daemon=True)
    reader.start()

    def wait_for(done: Callable[[], bool]) -> None:
        deadline = time.monotonic() + RUN_TIMEOUT
        while not done() and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.05)

    try:
        wait_for(lambda: any(READY.search(line) for line in list(lines)))
        kept = 0
        if case.checkpoints:
            body = json.dumps({"prompt": CHECKPOINT_PROMPT, "n_predict": 1}).encode()
            request = urllib.request.Request(f"http://127.0.0.1:{port}/completion", data=body,
                                             headers={"Content-Type": "application/json"})
            with urllib.request.urlopen(request, timeout=RUN_TIMEOUT * 4) as reply:
                reply.read()

            def created() -> list[float]:
                return [float(m.group(1)) for line in list(lines)
                        if (m := CHECKPOINT.search(line))]
            wait_for(lambda: len(created()) >= case.checkpoints)
            kept = round(sum(created()[-case.checkpoints:]) * MiB)
    finally:
        # The server runs in its own session: kill its whole process group, then reap it.
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(timeout=30)
        reader.join(timeout=30)
        proc.stdout.close()
    return parse_buffer_sizes(lines), kept, lines


def estimate(case: Case, model: Path, draft: Path | None) -> MemoryEstimate:
    """The estimate for ``case``; a draft model's terms are added to the model's, term by term
    (the planner keeps them apart as ``draft``), to compare with the buffer lines of both."""
    def one(path: Path) -> MemoryEstimate:
        return estimate_memory(
            read_profile(path), slots=case.slots, ctx_per_slot=case.ctx,
            cache_type_k=case.type_k, cache_type_v=case.type_v, flash_attn=case.flash_attn,
            n_batch=case.batch, n_ubatch=case.ubatch, kv_unified=case.kv_unified,
            swa_full=case.swa_full, gpu_overhead=0, host_overhead=0,
        )
    est = one(model)
    if draft is None:
        return est
    extra = one(draft).on("cpu")
    mine = est.on("cpu")
    summed = DeviceEstimate("cpu", *(getattr(mine, f) + getattr(extra, f) for f in (
        "weights", "kv_cache", "recurrent_state", "output", "compute", "overhead")))
    return replace(est, devices=(summed,))


def mib(n: int) -> str:
    return f"{n / MiB:.2f}"


def row(case: Case, rep: ReportedMemory, kept: int, est: MemoryEstimate, planned: int
        ) -> tuple[str, float]:
    """One table row; ``kept`` / ``planned``: the checkpoints' bytes, reported and estimated."""
    e = est.on("cpu")
    pairs = [
        (rep.component("weights"), e.weights),
        (rep.component("kv_cache") + rep.component("recurrent_state"), e.kv_cache +
         e.recurrent_state),
        (rep.component("output"), e.output),
        (rep.component("compute"), e.compute),
    ]
    total, estimated = rep.total() + kept, e.total + planned
    error = (estimated - total) / total * 100
    cells = " | ".join(f"{mib(r)} / {mib(x)}" for r, x in pairs)
    checkpoints = f"{mib(kept)} / {mib(planned)}" if case.checkpoints else "-"
    return (f"| {case.model} | {case.label()} | {cells} | {checkpoints} | "
            f"{mib(total)} / {mib(estimated)} | {error:+.2f}% |"), error


def table(binary: str, models_dir: Path, cases: Sequence[Case]) -> tuple[list[str], float]:
    paths = {"smollm2": SMOLLM2, **write_all(models_dir, list(MODELS))}
    lines = [
        "| model | slots x ctx, cache | weights | KV cache | output | compute | checkpoints "
        "| total | error |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    worst = 0.0
    for case in cases:
        draft = None if case.draft is None else paths[case.draft]
        rep, kept, log = measure(binary, case, paths[case.model], draft)
        if rep.total() == 0 or (case.checkpoints and not kept):
            raise RuntimeError(f"{case}: llama-server printed no buffer sizes or "
                               f"checkpoints:\n{''.join(log)}")
        planned = case.checkpoints * case.slots * checkpoint_bytes(
            read_profile(paths[case.model]), case.ctx, case.type_k, case.type_v,
            case.flash_attn) if case.checkpoints else 0
        text, error = row(case, rep, kept, estimate(case, paths[case.model], draft), planned)
        print(text, flush=True)
        lines.append(text)
        worst = max(worst, abs(error))
    return lines, worst


def write_table(doc: Path, body: str) -> None:
    """Replace what lies between the START and END markers of ``doc`` with ``body``."""
    text = doc.read_text()
    start, end = text.find(START), text.find(END)
    if start < 0 or end < start:
        raise SystemExit(f"{doc}: markers {START} ... {END} not found")
    doc.write_text(text[: start + len(START)] + "\n" + body + "\n" + text[end:])


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks.md")
    parser.add_argument(
        "--models", type=Path, default=Path.home() / ".cache" / "corral" / "bench-models",
        help="where the synthetic GGUFs are written (reused when present)",
    )
    parser.add_argument("--print", action="store_true", help="do not write --out")
    parser.add_argument("--only", type=int, nargs="*", help="run these cases (0-based), --print")
    args = parser.parse_args(argv)
    binary = find_llama_server()
    cases = CASES if args.only is None else [CASES[i] for i in args.only]
    args.print = args.print or args.only is not None
    lines, worst = table(binary, args.models, cases)
    print(f"worst total error: {worst:.2f}%")
    if not args.print:
        stamp = f"Largest total error: {worst:.2f}% (measured {time.strftime('%Y-%m-%d')})."
        write_table(args.out, "\n".join(lines) + "\n\n" + stamp)
    return 0 if worst <= 5.0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
