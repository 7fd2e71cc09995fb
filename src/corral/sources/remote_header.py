"""The GGUF headers of a model not downloaded yet, for ``corral plan``: a plan needs the
metadata and tensor sizes at the start of each file, never the weights after them.

A model in the cache (or Ollama's store) is read there. Otherwise the first bytes of each file
(every shard, and the projector) are fetched with ranged requests through huggingface_hub into
a temporary directory, under the files' own names so a split model's shards are found beside
the first, as they would be once downloaded; a header longer than what was fetched is fetched
again with more.
"""

from __future__ import annotations

from pathlib import Path

import huggingface_hub
from huggingface_hub.file_download import http_get
from huggingface_hub.utils import build_hf_headers  # type: ignore[attr-defined]

from corral.config import ModelSpec
from corral.config.sources import HfSource, OllamaSource
from corral.errors import DownloadError
from corral.probe.gguf import read_profile
from corral.sources import hub, ollama_store

_FIRST_READ = 8 * 2**20
_MOST = 256 * 2**20  # no real header is this long: past it the file is not one corral reads


def readable_spec(spec: ModelSpec, workdir: Path) -> ModelSpec:
    """``spec`` with a ``path`` whose GGUF headers can be read (and a ``--mmproj`` projector
    found beside it): the cached files, or header prefixes fetched into ``workdir``.
    DownloadError if the source cannot be reached; ``spec`` itself for a ``path:`` model."""
    source = spec.source
    if source is None:
        return spec
    if isinstance(source, OllamaSource):
        model, projector = ollama_store.find_model(source)
        return _with_files(spec, model.path, projector.path if projector else None)
    assert isinstance(source, HfSource)
    try:
        _, listing, root = hub.cached_files(source, spec.download_dir)
        files = hub.choose_files(source, listing)
        paths = [root / f.name for f in files.all]
        if all(p.is_file() for p in paths):
            return _with_files(spec, paths[0], paths[-1] if files.projector else None)
    except DownloadError:
        pass
    if hub.offline():
        raise DownloadError(source.ref, "HF_HUB_OFFLINE is set and it is not in the cache")
    commit, listing = hub.remote_files(source)
    files = hub.choose_files(source, listing)
    size = _FIRST_READ
    while True:
        for f in files.all:
            _fetch_prefix(source, commit, f, workdir / f.name, size)
        first = workdir / files.shards[0].name
        try:
            read_profile(first)
            if files.projector is not None:
                read_profile(workdir / files.projector.name)
        except ValueError as exc:
            if "truncated" in str(exc) and size < _MOST:
                size *= 4
                continue
            raise
        return _with_files(spec, first, workdir / files.projector.name if files.projector
                           else None)


def _fetch_prefix(source: HfSource, commit: str, file: hub.RemoteFile, dest: Path,
                  size: int) -> None:
    """The first ``size`` bytes of ``file`` (all of a smaller one) into ``dest``."""
    if file.size and dest.is_file() and dest.stat().st_size >= min(size, file.size):
        return
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        url = huggingface_hub.hf_hub_url(source.repo, file.name, revision=commit)
        meta = huggingface_hub.get_hf_file_metadata(url)
        last = min(size, meta.size or size) - 1
        with dest.open("wb") as fh:
            http_get(meta.location, fh, headers={**build_hf_headers(),
                                                 "Range": f"bytes=0-{last}"},
                     expected_size=last + 1, displayed_filename=file.name)
    except DownloadError:
        raise
    except Exception as exc:
        raise hub.hub_error(source, exc) from None


def _with_files(spec: ModelSpec, model: Path, projector: Path | None) -> ModelSpec:
    args = spec.args
    if projector is not None and spec.projector is None:
        args = (*args, "--mmproj", str(projector))
    return spec.model_copy(update={"path": model, "args": args})
