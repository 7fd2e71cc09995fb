"""The host I/O that ``corral plan`` and ``corral serve`` share: model files, devices into a
ledger, the llama-server binary, and where corral keeps its children's state and sockets.

Both commands call these, so they decide alike; neither needs the supervisor for it.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import shutil
import stat
import sys
from pathlib import Path

import structlog

from corral.config import Config, ModelSpec
from corral.errors import UnsafeDirectoryError
from corral.placement.devices import Device
from corral.placement.ledger import Ledger, corral_usage
from corral.placement.profile import ModelProfile
from corral.placement.requests import declared_devices
from corral.probe.devices import binary_gpus, discover_devices, read_usage
from corral.probe.gguf import read_profile, tensor_bytes

log = structlog.get_logger("corral.probe")

GGUF_MAGIC = b"GGUF"
_READ_ATTEMPTS = 3


def read_model(spec: ModelSpec) -> tuple[ModelProfile, int]:
    """The model's profile and its ``--mmproj`` projector's bytes (0 without one).

    Raises ``OSError`` or ``ValueError`` only: a file the reader did not foresee is this
    model's problem (a 503, a row in ``corral plan``), never a crash.
    """
    if spec.path is None:
        assert spec.source is not None
        raise ValueError(f"{spec.source.ref}: its files are not downloaded yet")
    try:
        profile = read_profile(spec.path)
        return profile, 0 if spec.projector is None else tensor_bytes(spec.projector)
    except (OSError, ValueError):
        raise
    except Exception as exc:
        raise ValueError(f"{spec.path}: {type(exc).__name__}: {exc}") from exc


def read_draft(spec: ModelSpec) -> ModelProfile | None:
    """The profile of the model's draft model (``draft.path``), or None without one. Raises
    as ``read_model`` does, the message naming the draft file."""
    if spec.draft is None:
        return None
    try:
        return read_profile(spec.draft.path)
    except OSError as exc:
        raise OSError(f"draft model {spec.draft.path}: {exc.strerror or exc}") from exc
    except Exception as exc:
        raise ValueError(f"draft model {spec.draft.path}: {exc}") from exc


def check_model_files(config: Config) -> list[str]:
    """Problems with the model files themselves (each model's and its draft model's): missing,
    unreadable, not GGUF, or a GGUF header that cannot be read (the weights after it are
    llama-server's to judge)."""
    # hf:/ollama: files have no path until fetched: they are checked (and verified) then.
    files = [(f"models.{name}.path", spec.path) for name, spec in config.models.items()
             if spec.path is not None]
    files += [(f"models.{name}.draft.path", Path(spec.draft.path))
              for name, spec in config.models.items() if spec.draft is not None]
    problems = []
    for where, path in files:
        try:
            with path.open("rb") as fh:
                magic = fh.read(4)
        except FileNotFoundError:
            problems.append(f"{where}: file does not exist, got {str(path)!r}")
            continue
        except OSError as exc:
            problems.append(f"{where}: cannot read {str(path)!r}: {exc.strerror or exc}")
            continue
        if magic != GGUF_MAGIC:
            problems.append(f"{where}: not a GGUF file (bad magic {magic!r}), got {str(path)!r}")
            continue
        reason = _gguf_header_problem(str(path))
        if reason is not None:
            problems.append(f"{where}: not a readable GGUF file ({reason}), got {str(path)!r}")
    return problems


def _gguf_header_problem(path: str) -> str | None:
    """Why the GGUF model at ``path`` cannot be placed, or None if it can.

    The right magic is not enough: corral reads the header and builds the model's profile to
    place it, and a file it cannot profile fails every load, so ``corral check`` does the same.
    """
    try:
        read_profile(path)
    except OSError as exc:
        return f"cannot read it: {exc.strerror or exc}"
    except ValueError as exc:
        return str(exc).removeprefix(f"{os.path.abspath(path)}: ")
    return None


def resolve_binary(binary: str) -> str | None:
    """The executable ``binary`` names: a path, or a name looked up in PATH and beside python."""
    if os.sep in binary:
        return binary if os.access(binary, os.X_OK) else None
    found = shutil.which(binary)
    if found is None:
        # `make` installs llama-server into the virtual environment's bin, which is not always
        # on PATH (for example when corral is started as .venv/bin/corral).
        candidate = os.path.join(os.path.dirname(sys.executable), binary)
        found = candidate if os.access(candidate, os.X_OK) else None
    return found


def make_ledger(config: Config) -> Ledger:
    """The ledger of this host: declared devices, or NVML GPUs and system RAM.

    Discovered GPUs count only if llama-server can use them: a build without CUDA would ignore
    the layers planned for them and put everything in host memory.
    """
    devices: list[Device] | None = declared_devices(config)
    if devices is None:
        devices = discover_devices()
        if any(d.kind == "gpu" for d in devices):
            binary = resolve_binary(config.file.llama_server.binary)
            if binary is not None and binary_gpus(binary) == 0:
                log.warning("gpus_not_usable", binary=binary,
                            gpus=[d.id for d in devices if d.kind == "gpu"],
                            reason="llama-server lists no CUDA device (built without CUDA?): "
                                   "models are placed in host memory")
                devices = [d for d in devices if d.kind != "gpu"]
    reserve = config.file.reserve
    return Ledger(devices, reserve_gpu=int(reserve.gpu), reserve_ram=int(reserve.ram))


async def refresh_external(ledger: Ledger) -> None:
    """Read the devices again and record in ``ledger`` what other programs use on each.

    Other programs' use is what is neither free nor corral's: total - free - what corral's
    children use, each child counted with what it uses now up to its reservation, or its whole
    reservation where nothing measures it (see ``corral_usage``).

    The reservations are taken as the reading begins: one made while the reading runs (it
    takes time off the event loop) belongs to a load whose child has mostly not started yet, so
    none of it is in use; where the reading did measure that child, it counts with what was
    measured, as any other (its memory is corral's, not another program's). One dropped
    meanwhile belongs to a child that exited at some moment of
    the reading, before or after the device was sampled; that reading is taken again (up to
    ``_READ_ATTEMPTS`` times, then the last values stay), as either guess could be wrong by
    the whole child.
    """
    for _ in range(_READ_ATTEMPTS):
        held = ledger.reservations()
        try:
            devices, measured = await asyncio.to_thread(read_usage)
        except Exception as exc:  # a failed reading keeps the last values rather than fail
            log.warning("device_reading_failed", error=str(exc))
            return
        if set(held) <= set(ledger.owners):
            break
    else:
        return
    for owner, amounts in ledger.reservations().items():
        if owner not in held and owner in measured:
            held[owner] = amounts
    used = corral_usage(held, measured)
    known = {d.id for d in ledger.devices}
    for device in devices:
        if device.id in known:
            ledger.observe(device, used.get(device.id, 0))


def _runtime_base() -> Path:
    return Path(os.environ.get("XDG_RUNTIME_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "corral"))


def state_file_path(config: Config) -> Path:
    """Where corral records its children: ``state_file``, or one per port in
    ``$XDG_RUNTIME_DIR`` (else ``${XDG_CACHE_HOME:-~/.cache}/corral``)."""
    given = config.file.state_file
    if given:
        return Path(given)
    return _runtime_base() / f"corral-{config.file.listen.port}.children.json"


def socket_dir(state_file: Path) -> Path:
    """The directory of the children's Unix sockets for the corral that owns ``state_file``.

    One per state file (whose lock makes one corral at a time its owner), and short: a Unix
    socket path must fit in 108 bytes. ``$XDG_RUNTIME_DIR`` is private to its user already;
    without it, a directory of corral's own under the system's temporary directory.
    """
    digest = hashlib.sha256(str(state_file.absolute()).encode()).hexdigest()[:12]
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    base = Path(runtime) / "corral" if runtime else Path(
        os.environ.get("TMPDIR") or "/tmp") / f"corral-{os.getuid()}"
    return base / digest


def child_socket(directory: Path, model: str) -> Path:
    """The socket ``model``'s child listens on, inside ``directory``."""
    safe = "".join(c if c.isalnum() or c in "._-" else "_" for c in model)[:48]
    return directory / f"{safe}.sock"


def remove_socket_dir(directory: Path) -> None:
    """Remove ``directory`` and the sockets in it, once no child listens there any more.

    Anything else found in it stays, and so does the directory then: it is not corral's to
    delete. The parent is shared by every corral of this user and stays too.
    """
    with contextlib.suppress(OSError):
        for entry in directory.iterdir():
            if entry.suffix == ".sock" and stat.S_ISSOCK(entry.lstat().st_mode):
                entry.unlink()
        directory.rmdir()


def prepare_socket_dir(directory: Path) -> Path:
    """Create ``directory`` (and its parent) for this user alone, or refuse one that is not.

    Only corral's user may enter it, so no other local user can bind a socket where a child is
    about to listen, or connect to a child around corral. Refuses a path
    that another user owns, that is a link, or that others may enter: someone prepared it.
    Raises ``UnsafeDirectoryError`` then.
    """
    for path in (directory.parent, directory):
        try:
            path.mkdir(mode=0o700)
        except FileExistsError:
            pass
        info = os.lstat(path)
        if (not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid()
                or stat.S_IMODE(info.st_mode) & 0o077):
            kind = "a directory" if stat.S_ISDIR(info.st_mode) else "not a directory"
            raise UnsafeDirectoryError(
                f"{path}: the children's socket directory must be a directory of this user "
                f"(uid {os.getuid()}) that nobody else may enter; it is {kind} owned by uid "
                f"{info.st_uid} with mode {stat.S_IMODE(info.st_mode):o} (remove it, or set "
                "XDG_RUNTIME_DIR to a private directory)")
    return directory
