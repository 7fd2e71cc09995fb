"""Making sure no llama-server outlives corral.

Two layers, because either alone leaks in some case:

- ``child_preexec``: each child asks Linux for SIGKILL when corral dies (``PR_SET_PDEATHSIG``),
  and gets its own process group so a stop reaches everything it started.
- ``ChildRegistry``: a small state file of the children's pids and start times. A corral started
  again reads it and stops whatever a previous run left (for example after a kernel that does not
  honour the parent-death signal, or a child that was reparented in a container).

Reaping is only safe when the recorded children are really leftovers, so ``StateFileLock``
makes one corral at a time own a state file: a second one started with the same file would
otherwise kill the running one's children.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import json
import os
import signal
import sys
from pathlib import Path
from types import TracebackType

import psutil
import structlog

from corral.errors import AlreadyRunningError

log = structlog.get_logger("corral.supervisor")

_PR_SET_PDEATHSIG = 1


def child_preexec(parent_pid: int) -> None:
    """Run in the child between fork and exec: new process group, die with the parent."""
    os.setpgid(0, 0)
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        # The parent may have died between fork and prctl; then nobody would ever signal us.
        if os.getppid() != parent_pid:
            os._exit(1)


def default_state_file(port: int) -> Path:
    """Where a corral listening on ``port`` records its children."""
    base = os.environ.get("XDG_RUNTIME_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "corral"
    )
    return Path(base) / f"corral-{port}.children.json"


class StateFileLock:
    """An exclusive ``flock`` on ``<state file>.lock``, held for the life of a corral.

    Usage::

        with StateFileLock(registry.path):   # AlreadyRunningError if another corral holds it
            ...                              # reap leftovers, serve

    A separate file, because the state file itself is replaced on every write (a lock on the
    old inode would protect nothing). The file is never deleted: unlinking a lock file lets a
    third corral lock a new inode while the second still holds the old one. The kernel drops
    the lock when the process dies, however it dies; the descriptor is not inherited, so a
    child that outlives corral never keeps a new corral from reaping it. The holder writes its
    pid into the file so that a refused corral can name it.
    """

    def __init__(self, state_file: Path) -> None:
        self.state_file = state_file
        self.path = state_file.with_name(state_file.name + ".lock")
        self._fd: int | None = None

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # No O_TRUNC: the pid in it belongs to the holder until the lock is ours.
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = _read_pid(fd)
            os.close(fd)
            raise AlreadyRunningError(str(self.state_file), str(self.path), owner) from None
        except BaseException:
            os.close(fd)
            raise
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the only descriptor drops the flock
            self._fd = None

    def __enter__(self) -> StateFileLock:
        self.acquire()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()


def _read_pid(fd: int) -> int | None:
    try:
        return int(os.pread(fd, 32, 0).decode().strip())
    except (OSError, ValueError):
        return None


class ChildRegistry:
    """The state file of running children: ``{pid: {"create_time", "model"}}``.

    Usage::

        registry = ChildRegistry(path)
        registry.reap_leftovers()          # at start-up
        registry.add(pid, "smollm2")       # after spawning
        registry.remove(pid)               # after it exited
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._entries: dict[int, dict[str, object]] = {}

    def add(self, pid: int, model: str) -> None:
        try:
            created = psutil.Process(pid).create_time()
        except psutil.Error:
            return
        self._entries[pid] = {"create_time": created, "model": model}
        self._write()

    def remove(self, pid: int) -> None:
        if self._entries.pop(pid, None) is not None:
            self._write()

    @property
    def pids(self) -> list[int]:
        """The children started and not yet seen to exit."""
        return list(self._entries)

    def reap_leftovers(self) -> list[int]:
        """Kill the children an earlier corral recorded and that still run; return their pids."""
        try:
            recorded = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return []
        killed = []
        for pid_text, entry in recorded.items() if isinstance(recorded, dict) else ():
            with contextlib.suppress(psutil.Error, ValueError, TypeError, KeyError):
                proc = psutil.Process(int(pid_text))
                # The start time guards against a recycled pid now owned by something else.
                if abs(proc.create_time() - float(entry["create_time"])) > 0.01:
                    continue
                with contextlib.suppress(OSError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.kill()
                proc.wait(timeout=5)
                killed.append(proc.pid)
                log.warning("leftover_child_killed", pid=proc.pid, model=entry.get("model"))
        self._write()
        return killed

    def _write(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps({str(pid): e for pid, e in self._entries.items()}))
        tmp.replace(self.path)
