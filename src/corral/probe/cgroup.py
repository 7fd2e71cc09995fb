"""The memory limit of the cgroup corral runs in (a container's), and what is used under it.

Inside a container, ``/proc/meminfo`` (what psutil reads) describes the whole host, but the
kernel kills the container's processes once its cgroup goes over its limit: a budget taken from
psutil alone would place models the container cannot hold. Both cgroup versions are read; the
limit is the lowest on the path from corral's cgroup up to the root of the mount, since a
parent's limit binds its children too, and what is free is the least left under any limit on
that path (a parent's limit is shared with whatever else runs under it).

Usage counts as psutil's "available" does: file pages (``active_file`` + ``inactive_file``,
the model files llama-server maps among them) can be reclaimed, so they count as free.

Usage::

    memory = cgroup_memory()          # None: no limit (or no cgroup to read)
    if memory is not None:
        total, free = memory.limit, memory.free
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

# cgroup v1 writes "no limit" as the largest page-aligned signed 64-bit value.
_UNLIMITED_V1 = 2**62


@dataclass(frozen=True)
class CgroupMemory:
    """The lowest memory limit over corral's cgroup, and the least free under any limit."""

    limit: int
    free: int
    version: int  # 1 or 2


def cgroup_memory(
    root: Path = Path("/sys/fs/cgroup"), membership: str | None = None
) -> CgroupMemory | None:
    """The memory limit of this process's cgroup and what is used under it; None without one.

    ``membership`` is the text of ``/proc/self/cgroup`` (read when not given); ``root`` the
    cgroup mount. Errors reading either mean no limit is known: corral then goes by psutil.
    """
    try:
        text = membership if membership is not None else Path("/proc/self/cgroup").read_text()
    except OSError:
        return None
    v1_path: str | None = None
    v2_path: str | None = None
    for line in text.splitlines():
        number, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        if number == "0" and controllers == "":
            v2_path = path
        elif "memory" in controllers.split(","):
            v1_path = path
    try:
        # A hybrid host mounts the memory controller on v1: that is the one enforcing.
        if v1_path is not None:
            return _read(root / "memory", v1_path, "memory.limit_in_bytes",
                         "memory.usage_in_bytes", 1)
        if v2_path is not None:
            return _read(root, v2_path, "memory.max", "memory.current", 2)
    except (OSError, ValueError):
        return None
    return None


def _read(mount: Path, path: str, limit_file: str, usage_file: str,
          version: int) -> CgroupMemory | None:
    own = mount / path.lstrip("/")
    if not own.is_dir():
        # A container without its own cgroup namespace sees its cgroup mounted as the root.
        own = mount
    prefix = "total_" if version == 1 else ""  # v1's own counters leave out child cgroups
    limits: list[int] = []
    free: list[int] = []
    # corral's own cgroup may have no memory controller (v2, when its parent does not pass it
    # down): the limits and usage are read where they are.
    for directory in _up_to(own, mount):
        if not (directory / limit_file).exists():
            continue
        limit = _limit((directory / limit_file).read_text())
        if limit is None:
            continue
        usage = int((directory / usage_file).read_text())
        stat = _stat(directory / "memory.stat")
        files = stat.get(f"{prefix}active_file", 0) + stat.get(f"{prefix}inactive_file", 0)
        limits.append(limit)
        free.append(max(0, limit - max(0, usage - files)))
    if not limits:
        return None
    return CgroupMemory(min(limits), min(free), version)


def _up_to(directory: Path, mount: Path) -> list[Path]:
    found = [directory]
    while directory != mount and mount in directory.parents:
        directory = directory.parent
        found.append(directory)
    return found


def _limit(text: str) -> int | None:
    value = text.strip()
    if value == "max":
        return None
    number = int(value)
    return None if number >= _UNLIMITED_V1 else number


def _stat(path: Path) -> dict[str, int]:
    if not path.exists():
        return {}
    values: dict[str, int] = {}
    for line in path.read_text().splitlines():
        key, _, number = line.partition(" ")
        if number.strip().isdigit():
            values[key] = int(number)
    return values
