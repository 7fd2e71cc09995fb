"""SHA-256 checks of model files before any child runs on them.

Hashing a large model takes a while, so a file that passed is remembered (by device, inode,
size and modification time, on disk under corral's cache directory): a restart does not read
40 GB again, and a file changed since is hashed again.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from pathlib import Path

import structlog

from corral.errors import DownloadError

log = structlog.get_logger("corral.sources")
_CHUNK = 4 * 2**20


def _marker_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
    return Path(base) / "corral" / "verified"


def _identity(path: Path) -> str:
    info = path.stat()
    return f"{info.st_dev}:{info.st_ino}:{info.st_size}:{info.st_mtime_ns}"


def sha256_of(path: Path, on_bytes: Callable[[int], None] | None = None) -> str:
    """The SHA-256 of ``path``'s contents, calling ``on_bytes`` with each chunk's length."""
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)
            if on_bytes is not None:
                on_bytes(len(chunk))
    return digest.hexdigest()


def verify(path: Path, expected: str, what: str, *, delete: bool,
           on_bytes: Callable[[int], None] | None = None) -> None:
    """Check that ``path`` hashes to ``expected``; DownloadError if not, after deleting the
    file when ``delete`` (a download of corral's: no child may ever load it)."""
    real = path.resolve()
    marker = _marker_dir() / expected
    try:
        if marker.read_text() == _identity(real):
            return
    except OSError:
        pass
    actual = sha256_of(real, on_bytes)
    if actual != expected:
        deleted = ""
        if delete:
            for victim in {real, path}:
                try:
                    victim.unlink()
                except FileNotFoundError:
                    pass
            deleted = f"; deleted {real}"
        log.error("checksum_mismatch", file=str(real), expected=expected, actual=actual,
                  deleted=delete)
        raise DownloadError(what, f"checksum mismatch for {path.name}: the hub says SHA-256 "
                            f"{expected}, the file has {actual}{deleted}", retry_after=60.0)
    try:
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.write_text(_identity(real))
    except OSError as exc:  # only a speed-up: the next start hashes it again
        log.warning("verified_marker_not_written", file=str(real), error=str(exc))
