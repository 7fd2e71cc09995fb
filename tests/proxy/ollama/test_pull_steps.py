"""Ollama's pull lines from a download's progress: each step once, in order, whatever the
polls saw (``corral.proxy.ollama.pull``; the stream itself: test_ollama_pull)."""

from __future__ import annotations

import re

import pytest

from corral.proxy.ollama.pull import _Steps
from corral.sources.download import Phase, Progress


@pytest.mark.parametrize("seen, lines", [
    # Every phase seen by a poll.
    (["checking", "downloading", "downloading", "verifying", "done"],
     ["pulling manifest", "pulling 50", "pulling 100", "verifying sha256 digest",
      "writing manifest"]),
    # A fast download: straight from checking to done between two polls.
    (["checking", "done"],
     ["pulling manifest", "pulling 100", "verifying sha256 digest", "writing manifest"]),
])
def test_steps_are_sent_once_each_and_in_order(seen: list[Phase], lines: list[str]) -> None:
    progress = Progress("m", "hf", total=100, digest="ab" * 32)
    steps = _Steps(progress)
    sent: list[str] = []
    for phase in seen:
        progress.phase = phase
        if phase == "downloading":
            progress.done = min(100, progress.done + 50)
        for line in steps.advance(3 if phase == "done" else None):
            sent.append(line["status"] + (f" {line['completed']}" if "completed" in line
                                          else ""))
    assert [re.sub(r"pulling a[ab]+ ", "pulling ", s) for s in sent] == lines
