"""Where a model's files come from when the config names no ``path``: a Hugging Face
repository (``hf: owner/repo:Q4_K_M``) or a model in Ollama's local store
(``ollama: llama3.2:3b``).

Pure parsing: the references are checked for shape here; finding, fetching and verifying the
files is ``corral.sources``'s I/O.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_REPO = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")
_QUANT = re.compile(r"^[A-Za-z0-9_.-]+$")
_OLLAMA = re.compile(r"^[a-z0-9][a-z0-9._/-]*(:[A-Za-z0-9._-]+)?$")


@dataclass(frozen=True)
class HfSource:
    """A GGUF model in a Hugging Face repository: one ``file``, or the files of a
    ``quant`` (``Q4_K_M``: all the shards of a split model), at ``revision``."""

    repo: str
    file: str | None = None
    quant: str | None = None
    revision: str | None = None  # None: the repository's default branch

    @property
    def ref(self) -> str:
        """The model as llama.cpp and Ollama write it: ``owner/repo:Q4_K_M``."""
        tail = f":{self.quant}" if self.quant else f"/{self.file}" if self.file else ""
        return f"{self.repo}{tail}" + (f"@{self.revision}" if self.revision else "")


@dataclass(frozen=True)
class OllamaSource:
    """A model pulled by Ollama, by its name (``llama3.2:3b``; the tag defaults to latest)."""

    name: str

    @property
    def ref(self) -> str:
        return f"ollama:{self.name}"


Source = HfSource | OllamaSource


def parse_hf(value: str, file: str | None = None, revision: str | None = None) -> HfSource:
    """``owner/repo`` or ``owner/repo:QUANT``, with an optional ``file``; ValueError if bad."""
    repo, _, quant = value.strip().partition(":")
    if not _REPO.match(repo):
        raise ValueError("must be a Hugging Face repository, owner/name or owner/name:QUANT "
                         "(e.g. bartowski/Llama-3.2-3B-Instruct-GGUF:Q4_K_M)")
    if quant and not _QUANT.match(quant):
        raise ValueError(f"the quantization after ':' must be a name like Q4_K_M, got {quant!r}")
    if quant and file:
        raise ValueError("give either a quantization (repo:Q4_K_M) or file, not both")
    if file is not None and (not file.strip() or file.startswith("/") or ".." in file.split("/")):
        raise ValueError(f"file must be a path inside the repository, got {file!r}")
    if revision is not None and not revision.strip():
        raise ValueError("revision must not be empty")
    return HfSource(repo=repo, file=file, quant=quant or None, revision=revision)


def parse_ollama(value: str) -> OllamaSource:
    """An Ollama model name, ``name[:tag]`` (``library/`` and a registry host are allowed)."""
    name = value.strip()
    if not _OLLAMA.match(name):
        raise ValueError("must be an Ollama model name such as llama3.2:3b")
    return OllamaSource(name)
