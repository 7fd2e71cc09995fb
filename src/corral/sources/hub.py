"""Hugging Face as a model source, through ``huggingface_hub``: which files of a repository
make a model (a file, or every shard of a quantization, and a vision projector beside it),
fetching them into the standard cache (or a directory the config names), and where a cached
copy is when nothing may be fetched (``HF_HUB_OFFLINE``, ``download: manual``).

``HF_ENDPOINT``, ``HF_HUB_OFFLINE``, ``HF_HUB_CACHE`` and the token (``HF_TOKEN``) are
huggingface_hub's own settings, read from the environment; corral never logs the token and
never hands it to a child (``Config.secret_env``).
"""

from __future__ import annotations

import os
import re
import shutil
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import huggingface_hub
from filelock import FileLock
from huggingface_hub import constants as hf_constants
from huggingface_hub import errors as hf_errors
from huggingface_hub.file_download import http_get
from huggingface_hub.utils import build_hf_headers  # type: ignore[attr-defined]

from corral.config.sources import HfSource
from corral.errors import DownloadError

_SPLIT = re.compile(r"-(\d{5})-of-(\d{5})\.gguf$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


@dataclass(frozen=True)
class RemoteFile:
    """One file of a repository, with the size and SHA-256 the hub's metadata gives."""

    name: str
    size: int
    sha256: str | None  # None: not an LFS file (the hub gives no SHA-256 for it)


@dataclass(frozen=True)
class ModelFiles:
    """The files that make one model: its shards in order (one for an unsplit model), and
    a multimodal projector if the repository has one."""

    shards: tuple[RemoteFile, ...]
    projector: RemoteFile | None

    @property
    def all(self) -> tuple[RemoteFile, ...]:
        return self.shards + ((self.projector,) if self.projector else ())

    @property
    def size(self) -> int:
        return sum(f.size for f in self.all)


def choose_files(source: HfSource, files: Iterable[RemoteFile]) -> ModelFiles:
    """The files of ``source`` among a repository's ``files``; DownloadError naming the
    choices when there is no match, or more than one.

    With a quantization, the GGUF files whose name carries it (``-Q4_K_M.gguf``, or a folder
    ``Q4_K_M/``); without either, ``Q4_K_M`` if there is one (llama.cpp's default), else the
    repository's only GGUF model.
    """
    files = list(files)
    ggufs = [f for f in files if f.name.lower().endswith(".gguf")]
    projectors = [f for f in ggufs if Path(f.name).name.lower().startswith("mmproj")]
    models = [f for f in ggufs if f not in projectors]
    if source.file is not None:
        chosen = [f for f in files if f.name == source.file]
        if not chosen:
            raise DownloadError(source.ref, f"the repository has no file {source.file!r} "
                                f"(GGUF files: {_names(models)})")
        chosen = _with_shards(chosen[0], models)
    else:
        quant = source.quant or "Q4_K_M"
        chosen = [f for f in models if _has_quant(f.name, quant)]
        if not chosen and source.quant is None and len(models) == 1:
            chosen = models
        if not chosen:
            what = f"quantization {quant!r}" if source.quant else "single GGUF model"
            raise DownloadError(source.ref, f"the repository has no {what} "
                                f"(GGUF files: {_names(models)})")
        firsts = [f for f in chosen if _SPLIT.search(f.name) is None
                  or _SPLIT.search(f.name).group(1) == "00001"]  # type: ignore[union-attr]
        if len(firsts) != 1:
            raise DownloadError(source.ref, f"{quant!r} matches several models "
                                f"({_names(firsts)}); name one with file:")
        chosen = _with_shards(firsts[0], models)
    return ModelFiles(tuple(chosen), _projector(projectors))


def _has_quant(name: str, quant: str) -> bool:
    q = re.escape(quant.lower())
    return re.search(rf"(^|[-_./]){q}([-_./]|$)", name.lower()) is not None


def _with_shards(first: RemoteFile, models: list[RemoteFile]) -> list[RemoteFile]:
    """``first`` and, for a split model (``-00001-of-00003.gguf``), every shard in order."""
    match = _SPLIT.search(first.name)
    if match is None:
        return [first]
    count = int(match.group(2))
    stem = first.name[: match.start()]
    by_name = {f.name: f for f in models}
    shards = []
    for i in range(1, count + 1):
        name = f"{stem}-{i:05d}-of-{count:05d}.gguf"
        if name not in by_name:
            raise DownloadError(first.name, f"split model is missing shard {name!r}")
        shards.append(by_name[name])
    return shards


def _projector(projectors: list[RemoteFile]) -> RemoteFile | None:
    """The vision projector: the only one, else the f16 one (the precision llama.cpp's own
    ``-hf`` prefers), else the first by name."""
    if len(projectors) <= 1:
        return projectors[0] if projectors else None
    f16 = [p for p in projectors if "f16" in p.name.lower()]
    return sorted(f16 or projectors, key=lambda p: p.name)[0]


def _names(files: Iterable[RemoteFile]) -> str:
    names = sorted(f.name for f in files)
    return ", ".join(names[:12]) + (", ..." if len(names) > 12 else "") if names else "none"


# -- the hub ------------------------------------------------------------------------------


def offline() -> bool:
    """Whether huggingface_hub is told to stay offline (``HF_HUB_OFFLINE``)."""
    return bool(hf_constants.HF_HUB_OFFLINE)


def remote_files(source: HfSource) -> tuple[str, list[RemoteFile]]:
    """The commit ``source.revision`` names, and the repository's files with their sizes and
    SHA-256, from the hub's metadata. DownloadError for a missing, gated or private
    repository or revision, and for a hub that cannot be reached."""
    try:
        info = huggingface_hub.HfApi().model_info(
            source.repo, revision=source.revision, files_metadata=True)
    except Exception as exc:
        raise hub_error(source, exc) from None
    files = []
    for sibling in info.siblings or ():
        lfs = sibling.lfs
        files.append(RemoteFile(sibling.rfilename,
                                int(lfs.size if lfs else sibling.size or 0),
                                lfs.sha256 if lfs else None))
    assert info.sha is not None
    return info.sha, files


def hub_error(source: HfSource, exc: BaseException) -> DownloadError:
    """The clear error for what huggingface_hub raised (never quoting a token)."""
    who = source.ref
    if isinstance(exc, hf_errors.GatedRepoError):
        token = "the token in HF_TOKEN has no access" if _token_set() else "set HF_TOKEN"
        return DownloadError(who, f"{source.repo} is a gated repository: {token} (accept its "
                             "terms on the hub with that account)", retry_after=60.0)
    if isinstance(exc, hf_errors.RevisionNotFoundError):
        return DownloadError(who, f"{source.repo} has no revision {source.revision!r}",
                             retry_after=60.0)
    if isinstance(exc, hf_errors.RemoteEntryNotFoundError):
        return DownloadError(who, f"{source.repo} has no such file", retry_after=60.0)
    if isinstance(exc, hf_errors.RepositoryNotFoundError):
        hint = "" if _token_set() else " (set HF_TOKEN if it is private)"
        return DownloadError(who, f"repository {source.repo} not found on "
                             f"{hf_constants.ENDPOINT}{hint}", retry_after=60.0)
    if isinstance(exc, hf_errors.OfflineModeIsEnabled):
        return DownloadError(who, "HF_HUB_OFFLINE is set and the files are not in the cache")
    if isinstance(exc, hf_errors.HfHubHTTPError):
        return DownloadError(who, f"the hub answered: {_first_line(exc)}")
    if isinstance(exc, OSError | hf_errors.LocalEntryNotFoundError):
        return DownloadError(who, f"{type(exc).__name__}: {_first_line(exc)}")
    return DownloadError(who, f"cannot reach {hf_constants.ENDPOINT}: "
                         f"{type(exc).__name__}: {_first_line(exc)}")


def _token_set() -> bool:
    return bool(os.environ.get("HF_TOKEN") or os.environ.get("HUGGING_FACE_HUB_TOKEN"))


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def fetch_file(source: HfSource, commit: str, file: RemoteFile,
               download_dir: str | None) -> Path:
    """Download ``file`` at ``commit`` into the cache (or ``download_dir``) and return its
    local path, resuming whatever an earlier, interrupted run left.

    huggingface_hub does the HTTP (its headers and token, redirects, retries, ranges and
    errors); the files are placed here because its own ``hf_hub_download`` starts every run
    from byte 0 (a partial file is private to one process), and a 40 GB model must not. The
    partial file is shared through a lock (``filelock``, as huggingface_hub locks its cache), so
    two corral processes sharing a cache download it once and never write it together.
    """
    try:
        url = huggingface_hub.hf_hub_url(source.repo, file.name, revision=commit)
        meta = huggingface_hub.get_hf_file_metadata(url)
        etag = meta.etag or file.sha256 or ""
        if not _SHA256.match(etag):
            raise DownloadError(source.ref, f"{file.name}: the hub gives ETag {etag!r}, not a "
                                "SHA-256")
        if download_dir:
            final = Path(download_dir) / file.name
            meta_dir = Path(download_dir) / ".cache" / "huggingface" / "download"
            partial = meta_dir / f"{file.name.replace('/', '_')}.{etag}.incomplete"
        else:
            final = repo_cache(source) / "blobs" / etag
            partial = final.with_name(f"{etag}.incomplete")
        partial.parent.mkdir(parents=True, exist_ok=True)
        final.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(str(partial) + ".lock"):
            if not (final.is_file() and final.stat().st_size == meta.size):
                have = partial.stat().st_size if partial.exists() else 0
                if meta.size is not None and have > meta.size:
                    partial.unlink()
                    have = 0
                with partial.open("ab") as fh:
                    http_get(meta.location, fh, resume_size=have, headers=build_hf_headers(),
                             expected_size=meta.size, displayed_filename=file.name)
                os.replace(partial, final)
    except DownloadError:
        raise
    except Exception as exc:
        raise hub_error(source, exc) from None
    if download_dir:
        _write_local_metadata(Path(download_dir), file.name, meta.commit_hash or commit, etag)
        return final
    return _link_snapshot(source, meta.commit_hash or commit, file.name, final)


def _link_snapshot(source: HfSource, commit: str, name: str, blob: Path) -> Path:
    """The cache's ``snapshots/COMMIT/NAME`` link to ``blob`` and ``refs/REVISION``, as
    huggingface_hub lays them out, so other tools see the file."""
    repo = repo_cache(source)
    link = repo / "snapshots" / commit / name
    link.parent.mkdir(parents=True, exist_ok=True)
    target = os.path.relpath(blob, link.parent)
    if not (link.is_symlink() and os.readlink(link) == target):
        tmp = link.with_name(f".{link.name}.{os.getpid()}.link")
        tmp.unlink(missing_ok=True)
        tmp.symlink_to(target)
        os.replace(tmp, link)
    ref = source.revision or "main"
    if ref != commit:
        (repo / "refs").mkdir(parents=True, exist_ok=True)
        (repo / "refs" / ref).write_text(commit)
    return link


def _write_local_metadata(root: Path, name: str, commit: str, etag: str) -> None:
    """huggingface_hub's record of a file in a download directory (commit, ETag, time)."""
    path = root / ".cache" / "huggingface" / "download" / f"{name}.metadata"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"{commit}\n{etag}\n{time.time()}\n")


# -- the local copy ------------------------------------------------------------------------


def cache_root(download_dir: str | None) -> Path:
    """Where ``source``'s files land: ``download_dir``, or huggingface_hub's cache."""
    return Path(download_dir) if download_dir else Path(hf_constants.HF_HUB_CACHE)


def repo_cache(source: HfSource) -> Path:
    return Path(hf_constants.HF_HUB_CACHE) / ("models--" + source.repo.replace("/", "--"))


def partial_bytes(source: HfSource, file: RemoteFile, download_dir: str | None) -> int:
    """How much of ``file`` a download has written so far (its ``.incomplete`` file), or all
    of it once it is in place."""
    if file.sha256 is None:
        return 0
    if download_dir:
        done = Path(download_dir) / file.name
        partial_dir = Path(download_dir) / ".cache" / "huggingface" / "download"
    else:
        done = repo_cache(source) / "blobs" / file.sha256
        partial_dir = done.parent
    try:
        return done.stat().st_size
    except OSError:
        pass
    best = 0
    for partial in partial_dir.glob(f"*{file.sha256}*.incomplete"):
        try:
            best = max(best, partial.stat().st_size)
        except OSError:
            continue
    return best


def cached_files(source: HfSource, download_dir: str | None) -> tuple[str, list[RemoteFile],
                                                                       Path]:
    """What a cached copy of ``source``'s repository holds, when nothing may be fetched:
    ``(commit, files, directory)``, each file's SHA-256 as recorded at download time (the
    cache's blob name, or the ETag in a download directory's metadata). DownloadError if
    there is none."""
    if download_dir:
        root = Path(download_dir)
        meta = root / ".cache" / "huggingface" / "download"
        files = []
        for path in sorted(meta.rglob("*.metadata")) if meta.is_dir() else ():
            name = str(path.relative_to(meta))[: -len(".metadata")]
            lines = path.read_text(errors="replace").splitlines()
            local = root / name
            if len(lines) >= 2 and local.is_file():
                etag = lines[1].strip()
                files.append(RemoteFile(name, local.stat().st_size,
                                        etag if _SHA256.match(etag) else None))
        commit = "local"
        if not files:
            raise DownloadError(source.ref, f"nothing downloaded in {root}")
        return commit, files, root
    repo = repo_cache(source)
    ref = source.revision or "main"
    commit = ref
    ref_file = repo / "refs" / ref
    if ref_file.is_file():
        commit = ref_file.read_text().strip()
    snapshot = repo / "snapshots" / commit
    if not snapshot.is_dir():
        raise DownloadError(source.ref, f"not in the cache {hf_constants.HF_HUB_CACHE}")
    files = []
    for path in sorted(snapshot.rglob("*")):
        if path.is_file():
            blob = path.resolve().name
            files.append(RemoteFile(str(path.relative_to(snapshot)), path.stat().st_size,
                                    blob if _SHA256.match(blob) else None))
    return commit, files, snapshot


def free_space(directory: Path) -> int:
    """Bytes free for an unprivileged writer on the file system of ``directory`` (or of its
    nearest existing parent)."""
    path = directory
    while not path.exists() and path != path.parent:
        path = path.parent
    return shutil.disk_usage(path).free


def check_space(source: HfSource, files: ModelFiles, download_dir: str | None) -> None:
    """Refuse at once a download larger than the free space, naming both sizes."""
    needed = sum(max(0, f.size - partial_bytes(source, f, download_dir)) for f in files.all)
    root = cache_root(download_dir)
    have = free_space(root)
    if needed > have:
        raise DownloadError(source.ref, f"needs {human(needed)} more on {root} but only "
                            f"{human(have)} is free", retry_after=60.0)


def human(size: float) -> str:
    """``1.5 GiB``."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(size) < 1024 or unit == "TiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")
