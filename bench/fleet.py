#!/usr/bin/env python3
"""A fleet behind a real Envoy and corral's picker: 3 nodes, 3 models, memory for two per node.

Mixed traffic for --seconds from --clients threads: OpenAI chat (streamed or not) and Ollama
/api/chat, models drawn with skewed weights (a 60 %, b 30 %, c 10 %), so models are placed,
loaded where they fit and crowd nodes. Prints requests per node, per model, decisions by
reason, errors by kind and lost requests (a request no node answered). Everything runs on
127.0.0.1 with the real llama-server and SmolLM2, and stops by itself.

    .venv/bin/python bench/fleet.py --seconds 300 --clients 6

Exit status: 0 when no request was lost.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.conftest import find_llama_server  # noqa: E402
from tests.picker.fleet import Fleet, upstream  # noqa: E402

MODELS = (("a", 0.6), ("b", 0.3), ("c", 0.1))


def one_request(fleet: Fleet, rng: random.Random) -> tuple[str, str, int, float, str]:
    """(model, node, status, seconds, kind) of one request through Envoy."""
    model = rng.choices([m for m, _ in MODELS], [w for _, w in MODELS])[0]
    kind = rng.choice(["chat", "chat-stream", "ollama-stream"])
    tokens = rng.randint(4, 32)
    start = time.monotonic()
    prompt = [{"role": "user", "content": "Say something short."}]
    if kind == "ollama-stream":
        body = {"model": model, "messages": prompt, "stream": True,
                "options": {"num_predict": tokens}}
        path = "/api/chat"
    else:
        body = {"model": model, "messages": prompt, "max_tokens": tokens,
                "stream": kind == "chat-stream"}
        path = "/v1/chat/completions"
    with fleet.retry_http.stream("POST", path, json=body) as response:
        text = response.read()
    status = response.status_code
    if status != 200:
        kind = f"{kind}: {status} {text[:120]!r}"
    return model, upstream(response), status, time.monotonic() - start, kind


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=300)
    parser.add_argument("--clients", type=int, default=6)
    parser.add_argument("--seed", type=int, default=14)
    args = parser.parse_args()
    llama_server = find_llama_server()
    model_file = ROOT / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if llama_server is None or not model_file.exists():
        print("needs llama-server and models/SmolLM2-135M-Instruct.Q4_1.gguf", file=sys.stderr)
        return 2
    per_node: Counter[str] = Counter()
    per_model: Counter[str] = Counter()
    errors: Counter[str] = Counter()
    latencies: list[float] = []
    lock = threading.Lock()
    with tempfile.TemporaryDirectory(prefix="corral-fleet-") as directory, \
            Fleet(Path(directory), llama_server, model_file.resolve(),
                  preload=[[], [], []]) as fleet:
        deadline = time.monotonic() + args.seconds

        def client(seed: int) -> None:
            rng = random.Random(seed)
            while time.monotonic() < deadline:
                model, node, status, seconds, kind = one_request(fleet, rng)
                with lock:
                    if status == 200:
                        per_node[node] += 1
                        per_model[model] += 1
                        latencies.append(seconds)
                    else:
                        errors[kind] += 1

        threads = [threading.Thread(target=client, args=(args.seed + i,))
                   for i in range(args.clients)]
        started = time.monotonic()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        elapsed = time.monotonic() - started
        names = {e: f"node{i} ({e})" for i, e in enumerate(fleet.endpoints)}
        loaded = {names[e]: [m["name"] for m in pod["models"] if m["state"] == "ready"]
                  for e, pod in ((p["endpoint"], p) for p in fleet.status()["pods"])}
        figures = {
            "seconds": round(elapsed, 1), "clients": args.clients,
            "requests": sum(per_node.values()),
            "requests per node": {names.get(n, n or "?"): c for n, c in sorted(per_node.items())},
            "requests per model": dict(sorted(per_model.items())),
            "decisions by reason": fleet.decisions(),
            "loaded at the end": loaded,
            "latency p50 / p95 (s)": [round(statistics.median(latencies), 3),
                                      round(statistics.quantiles(latencies, n=20)[18], 3)]
            if len(latencies) >= 20 else None,
            "errors": dict(errors),
            # Every request went through a node or failed: a failure is a lost request.
            "lost requests": sum(errors.values()),
        }
    print(json.dumps(figures, indent=1))
    return 0 if not errors else 1


if __name__ == "__main__":
    sys.exit(main())
