"""Making a model's files local: fetch (or find in the cache), check the disk, verify.

``Fetch`` is the one interface the rest of corral uses: ``Fetch.start(spec, allow_download)``
begins fetching in a background thread and ``await fetch.result()`` joins it (any number of
waiters share one fetch); ``fetch.progress`` says how far it is at any moment. ``fetch_now``
does the same synchronously (``corral pull``).

For a configured model, go through its ``ManagedModel``: ``model.download()`` starts the
fetch (or joins the one under way) and returns the ``Fetch`` (None when the model has no source
or has its files); poll ``fetch.progress.describe()`` (phase, bytes_done, bytes_total,
percent, error) for a stream of progress, and ``await fetch.result()`` for the end
(``DownloadError`` with ``.reason`` on failure). The model moves ``downloading`` ->
``unloaded`` (or ``failed``) by itself. A name that is not configured (``owner/repo:Q4_K_M``)
becomes a spec with ``corral.pull.targets(None, [name])``; ``Fetch.start(spec, True)``.

A download runs in a daemon thread: huggingface_hub is synchronous, and a thread of the
default executor would hold corral's exit until the download ended. Killed half-way, the
partial file stays and the next fetch resumes it.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import structlog

from corral.config import ModelSpec
from corral.config.sources import HfSource, OllamaSource
from corral.errors import DownloadError
from corral.sources import ollama_store
from corral.sources.verify import verify

log = structlog.get_logger("corral.sources")

Phase = Literal["checking", "downloading", "verifying", "done", "failed"]


@dataclass(frozen=True)
class LocalFiles:
    """A model's verified local files: the model (its first shard) and its projector."""

    model: Path
    projector: Path | None = None


@dataclass
class Progress:
    """How far one fetch is: ``done`` of ``total`` bytes in its current ``phase``
    (downloading, then verifying). Written by the fetching thread, read by anyone."""

    model: str
    source: str
    phase: Phase = "checking"
    done: int = 0
    total: int = 0
    downloaded: int = 0  # bytes this process fetched over the network (for the counter)
    error: str | None = None
    digest: str | None = None  # the model file's SHA-256, once the source has named it
    started: float = field(default_factory=time.time)
    probe: Callable[[], int] | None = field(default=None, repr=False)

    def refresh(self) -> None:
        """Read the partial files again (the download writes them without telling)."""
        probe = self.probe
        if self.phase == "downloading" and probe is not None:
            done = probe()
            if done > self.done:
                self.downloaded += done - self.done
                self.done = done

    @property
    def percent(self) -> int:
        return int(100 * self.done / self.total) if self.total else 0

    @property
    def remaining(self) -> int:
        return max(0, self.total - self.done) if self.phase == "downloading" else 0

    def text(self) -> str:
        """``downloading 43% (58.1 MiB of 135.2 MiB)``."""
        self.refresh()
        if self.phase in ("downloading", "verifying") and self.total:
            from corral.sources import hub

            return (f"{self.phase} {self.percent}% ({hub.human(self.done)} of "
                    f"{hub.human(self.total)})")
        return self.error if self.phase == "failed" and self.error else self.phase

    def describe(self) -> dict[str, Any]:
        """What ``/admin/status`` shows of it."""
        self.refresh()
        return {"source": self.source, "phase": self.phase, "bytes_done": self.done,
                "bytes_total": self.total, "percent": self.percent, "error": self.error,
                "started_at": self.started}


def source_of(spec: ModelSpec) -> str:
    assert spec.source is not None
    return spec.source.ref


def fetch_now(spec: ModelSpec, progress: Progress, *, allow_download: bool) -> LocalFiles:
    """Make ``spec``'s files local and verified, reporting into ``progress``; DownloadError
    with the reason otherwise. A checksum that does not match deletes the file."""
    try:
        files = _fetch(spec, progress, allow_download)
    except DownloadError as exc:
        progress.phase, progress.error = "failed", exc.reason
        log.error("download_failed", model=spec.name, source=progress.source, reason=exc.reason)
        raise
    except Exception as exc:  # a bug or an unforeseen OS error: still this model's failure
        progress.phase = "failed"
        progress.error = f"{type(exc).__name__}: {exc}"
        log.exception("download_failed", model=spec.name, source=progress.source)
        raise DownloadError(progress.source, progress.error) from exc
    progress.phase = "done"
    return files


def _fetch(spec: ModelSpec, progress: Progress, allow_download: bool) -> LocalFiles:
    # Imported here: huggingface_hub takes a third of a second to import, and `corral serve`
    # should listen without it when no model needs a download.
    from corral.sources import hub

    source = spec.source
    if isinstance(source, OllamaSource):
        model, projector = ollama_store.find_model(source)
        blobs = [model] + ([projector] if projector else [])
        _verify_all(progress, [(b.path, b.sha256) for b in blobs], source.ref, delete=False)
        return LocalFiles(model.path, projector.path if projector else None)
    assert isinstance(source, HfSource)
    directory = spec.download_dir
    if not allow_download or hub.offline():
        try:
            commit, listing, root = hub.cached_files(source, directory)
            files = hub.choose_files(source, listing)
        except DownloadError as exc:
            why = "HF_HUB_OFFLINE is set" if hub.offline() else "download: manual"
            raise DownloadError(source.ref, f"not in the cache ({why}; run corral pull): "
                                f"{exc.reason}", retry_after=60.0) from None
        for f in files.all:
            if f.sha256 is None:
                raise DownloadError(source.ref, f"{f.name}: no checksum recorded in the cache")
        local = [(root / f.name, f.sha256 or "") for f in files.all]
        _verify_all(progress, local, source.ref, delete=True)
        return LocalFiles(local[0][0], local[-1][0] if files.projector else None)
    commit, listing = hub.remote_files(source)
    files = hub.choose_files(source, listing)
    for f in files.all:
        if f.sha256 is None:
            raise DownloadError(source.ref, f"{f.name}: the hub gives no SHA-256 for it (not "
                                "an LFS file), so it cannot be verified")
    hub.check_space(source, files, directory)
    progress.total = files.size
    progress.digest = files.all[0].sha256
    progress.probe = lambda: sum(hub.partial_bytes(source, f, directory) for f in files.all)
    progress.done = progress.probe()
    progress.phase = "downloading"
    log.info("download_started", model=spec.name, source=source.ref, commit=commit,
             files=[f.name for f in files.all], bytes_total=files.size, bytes_present=progress.done)
    paths = [hub.fetch_file(source, commit, f, directory) for f in files.all]
    progress.refresh()
    progress.probe = None
    local = [(p, f.sha256 or "") for p, f in zip(paths, files.all, strict=True)]
    _verify_all(progress, local, source.ref, delete=True)
    log.info("download_finished", model=spec.name, source=source.ref, path=str(paths[0]))
    return LocalFiles(paths[0], paths[-1] if files.projector else None)


def _verify_all(progress: Progress, files: list[tuple[Path, str]], what: str,
                *, delete: bool) -> None:
    progress.phase, progress.done = "verifying", 0
    progress.total = sum(p.stat().st_size for p, _ in files if p.exists())

    def count(n: int) -> None:
        progress.done += n

    for path, sha in files:
        if not path.is_file():
            raise DownloadError(what, f"{path} is missing")
        verify(path, sha, what, delete=delete, on_bytes=count)


class Fetch:
    """One fetch of a model's files, started once and joined by anyone who needs them."""

    def __init__(self, spec: ModelSpec, allow_download: bool) -> None:
        self.spec = spec
        self.progress = Progress(spec.name, source_of(spec))
        self._future: asyncio.Future[LocalFiles] = asyncio.get_running_loop().create_future()
        # Read by whoever waits; nobody waiting is no reason for asyncio to complain.
        self._future.add_done_callback(lambda f: f.cancelled() or f.exception())
        self._allow = allow_download

    @classmethod
    def start(cls, spec: ModelSpec, allow_download: bool) -> Fetch:
        """Begin fetching ``spec``'s files in the background (call from the event loop)."""
        fetch = cls(spec, allow_download)
        loop = asyncio.get_running_loop()
        threading.Thread(target=fetch._run, args=(loop,), name=f"fetch-{spec.name}",
                         daemon=True).start()
        return fetch

    def _run(self, loop: asyncio.AbstractEventLoop) -> None:
        files: LocalFiles | None = None
        error: DownloadError | None = None
        try:
            files = fetch_now(self.spec, self.progress, allow_download=self._allow)
        except DownloadError as exc:
            error = exc
        with contextlib.suppress(RuntimeError):  # the loop closed: corral is exiting
            loop.call_soon_threadsafe(self._settle, files, error)

    def _settle(self, files: LocalFiles | None, error: DownloadError | None) -> None:
        if self._future.done():
            return
        if error is not None:
            self._future.set_exception(error)
        else:
            assert files is not None
            self._future.set_result(files)

    @property
    def done(self) -> bool:
        return self._future.done()

    async def result(self) -> LocalFiles:
        """The verified files; DownloadError if the fetch failed. Cancelling the caller
        leaves the fetch running for the others."""
        return await asyncio.shield(self._future)
