"""``corral pull``: fetch (and verify) the files of a config's models, or of one model named on
the command line, before anything serves them.

A progress bar on a terminal, plain lines otherwise (logs, CI); exit 1 if any model failed.
An interrupted pull resumes where it stopped the next time.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable
from typing import TextIO

from corral.config import Config, ModelSpec, parse_config
from corral.errors import ConfigError, DownloadError
from corral.sources.download import LocalFiles, Progress, fetch_now
from corral.sources.hub import human

_TICK = 0.5
_PLAIN_EVERY = 5.0  # seconds between plain progress lines


def targets(config: Config | None, names: list[str]) -> list[ModelSpec]:
    """The models to pull: each name a configured model (or alias), else a source written
    as in a config (``owner/repo:Q4_K_M``, ``ollama:llama3.2:3b``); none: every model of the
    config that has a source. ConfigError for a name that is neither."""
    if not names:
        assert config is not None
        return [s for s in config.models.values() if s.source is not None]
    found = []
    for name in names:
        spec = config.resolve(name) if config is not None else None
        if spec is None:
            model = ({"ollama": name.removeprefix("ollama:")} if name.startswith("ollama:")
                     else {"hf": name})
            try:
                spec = parse_config({"models": {"pull": model}}, source=name).models["pull"]
            except ConfigError as exc:
                raise ConfigError(name, ["not a configured model, nor a source: "
                                         + "; ".join(p.split(": ", 1)[-1]
                                                     for p in exc.problems)]) from None
            spec = spec.model_copy(update={"name": name})
        if spec.source is None:
            print(f"{spec.name}: a local file ({spec.path}), nothing to pull")
            continue
        found.append(spec)
    return found


def pull(specs: list[ModelSpec], out: TextIO = sys.stdout) -> int:
    """Fetch each of ``specs`` in turn, showing progress on ``out``; 0 if all succeeded."""
    failed = 0
    for spec in specs:
        progress = Progress(spec.name, spec.source.ref if spec.source else spec.name)
        result: list[LocalFiles | DownloadError] = []
        thread = threading.Thread(target=_fetch, args=(spec, progress, result.append),
                                  daemon=True)
        thread.start()
        show = _Bar(out, progress) if out.isatty() else _Lines(out, progress)
        while thread.is_alive():
            show.update()
            thread.join(_TICK)
        show.update(final=True)
        outcome = result[0] if result else DownloadError(progress.source, "fetch crashed")
        if isinstance(outcome, DownloadError):
            failed += 1
            print(f"{spec.name}: failed: {outcome.reason}", file=out, flush=True)
        else:
            extra = f" (projector {outcome.projector})" if outcome.projector else ""
            print(f"{spec.name}: ready, verified: {outcome.model}{extra}", file=out, flush=True)
    return 1 if failed else 0


def _fetch(spec: ModelSpec, progress: Progress,
           done: Callable[[LocalFiles | DownloadError], None]) -> None:
    try:
        done(fetch_now(spec, progress, allow_download=True))
    except DownloadError as exc:
        done(exc)


class _Lines:
    """A line when the phase changes, and every few seconds while it lasts."""

    def __init__(self, out: TextIO, progress: Progress) -> None:
        self.out, self.progress = out, progress
        self.phase = ""
        self.last = 0.0

    def update(self, final: bool = False) -> None:
        p = self.progress
        p.refresh()
        now = time.monotonic()
        if p.phase in ("done", "failed"):
            return
        if p.phase != self.phase or now - self.last >= _PLAIN_EVERY:
            self.phase, self.last = p.phase, now
            who = p.model if p.model == p.source else f"{p.model}: {p.source}"
            print(f"{who}: {p.text()}", file=self.out, flush=True)


class _Bar:
    """One line redrawn in place: ``model [#####     ] 43% 1.2 GiB of 2.8 GiB, 12.0 MiB/s``."""

    def __init__(self, out: TextIO, progress: Progress) -> None:
        self.out, self.progress = out, progress
        self.samples: list[tuple[float, int]] = []

    def update(self, final: bool = False) -> None:
        p = self.progress
        p.refresh()
        now = time.monotonic()
        self.samples = [s for s in self.samples if now - s[0] < 10] + [(now, p.done)]
        rate = ""
        if p.phase == "downloading" and len(self.samples) > 1:
            (t0, b0), (t1, b1) = self.samples[0], self.samples[-1]
            if t1 > t0:
                rate = f", {human((b1 - b0) / (t1 - t0))}/s"
        width = 30
        filled = int(width * p.percent / 100)
        bar = "#" * filled + " " * (width - filled)
        line = f"\r{p.model} {p.phase:<11} [{bar}] {p.percent:3d}%"
        if p.total:
            line += f" {human(p.done)} of {human(p.total)}{rate}"
        self.out.write(line.ljust(100))
        if final:
            self.out.write("\n")
        self.out.flush()
