"""A container's memory limit (its cgroup's) bounds the host budget, not the host's RAM.

The parsing is checked on cgroup trees written here (both versions, as containers and hosts lay
them out); the integration test runs corral in a real memory cgroup with a real limit, where the
machine lets this test make one (CI runs as root on cgroup v1).
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from corral.probe.cgroup import CgroupMemory, cgroup_memory
from tests.conftest import CorralProcess

MiB = 2**20


def write(path: Path, **files: str | int) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (path / name.replace("__", ".")).write_text(f"{text}\n")
    return path


def test_v2_limit_and_usage_without_reclaimable_file_pages(tmp_path: Path) -> None:
    write(tmp_path / "kubepods" / "pod1", memory__max=4096 * MiB, memory__current=1000 * MiB,
          memory__stat=f"anon {600 * MiB}\nfile {400 * MiB}\nactive_file {300 * MiB}\n"
                       f"inactive_file {100 * MiB}\nshmem 0")
    found = cgroup_memory(tmp_path, "0::/kubepods/pod1\n")
    assert found is not None
    assert (found.limit, found.free, found.version) == (4096 * MiB, 3496 * MiB, 2)


def test_v2_a_parents_lower_limit_binds_with_what_its_other_children_use(
        tmp_path: Path) -> None:
    # The slice's 2 GiB are shared: a sibling of corral's cgroup uses 1.5 GiB of them.
    write(tmp_path / "a", memory__max=2048 * MiB, memory__current=1546 * MiB)
    write(tmp_path / "a" / "b", memory__max="max", memory__current=10 * MiB)
    found = cgroup_memory(tmp_path, "0::/a/b")
    assert found is not None and (found.limit, found.free) == (2048 * MiB, 502 * MiB)


def test_v2_a_cgroup_without_the_memory_controller_is_bounded_by_its_parent(
        tmp_path: Path) -> None:
    # No memory.* files in corral's own cgroup: its parent does not pass the controller down.
    write(tmp_path / "a", memory__max=1024 * MiB, memory__current=24 * MiB)
    write(tmp_path / "a" / "b", cgroup__procs=1)
    found = cgroup_memory(tmp_path, "0::/a/b")
    assert found is not None and (found.limit, found.free) == (1024 * MiB, 1000 * MiB)


def test_no_limit_anywhere_is_none(tmp_path: Path) -> None:
    write(tmp_path / "a", memory__max="max", memory__current=10 * MiB)
    assert cgroup_memory(tmp_path, "0::/a") is None
    write(tmp_path / "memory" / "x", memory__limit_in_bytes=9223372036854771712,
          memory__usage_in_bytes=5)
    assert cgroup_memory(tmp_path, "4:memory:/x\n0::/") is None


def test_v1_takes_the_hierarchical_counters(tmp_path: Path) -> None:
    write(tmp_path / "memory" / "docker" / "c1", memory__limit_in_bytes=1024 * MiB,
          memory__usage_in_bytes=700 * MiB,
          memory__stat=f"active_file {1 * MiB}\ninactive_file {1 * MiB}\n"
                       f"total_active_file {150 * MiB}\ntotal_inactive_file {50 * MiB}")
    # A hybrid host: the v1 memory controller is the one that enforces.
    found = cgroup_memory(tmp_path, "12:cpu,cpuacct:/docker/c1\n9:memory:/docker/c1\n0::/x")
    assert found is not None and (found.limit, found.free, found.version) == (
        1024 * MiB, 524 * MiB, 1)


def test_a_container_sees_its_own_cgroup_as_the_mount(tmp_path: Path) -> None:
    # Without a cgroup namespace the path names the host's hierarchy, which is not mounted.
    write(tmp_path, memory__max=512 * MiB, memory__current=100 * MiB)
    found = cgroup_memory(tmp_path, "0::/system.slice/docker-abc.scope")
    assert found is not None and (found.limit, found.free) == (512 * MiB, 412 * MiB)


@pytest.mark.parametrize("membership", ["", "garbage", "0::/missing"])
def test_nothing_readable_is_no_limit(tmp_path: Path, membership: str) -> None:
    assert cgroup_memory(tmp_path, membership) is None
    write(tmp_path / "bad", memory__max="lots")
    assert cgroup_memory(tmp_path, "0::/bad") is None


# -- for real ----------------------------------------------------------------------------------


@pytest.fixture
def memory_cgroup() -> Iterator[Callable[[int], Path]]:
    """Make a v1 memory cgroup with a limit; its ``cgroup.procs``. Skips where it cannot."""
    made: list[Path] = []

    def make(limit: int) -> Path:
        mount = Path("/sys/fs/cgroup/memory")
        path = mount / f"corral-test-{os.getpid()}-{len(made)}"
        try:
            path.mkdir()
        except OSError as exc:
            pytest.skip(f"cannot make a memory cgroup here ({exc})")
        made.append(path)
        (path / "memory.limit_in_bytes").write_text(str(limit))
        return path / "cgroup.procs"

    yield make
    for path in made:
        deadline = time.monotonic() + 30
        while True:  # empty once corral and its children have exited
            try:
                path.rmdir()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)


@pytest.mark.integration
def test_corral_in_a_container_plans_within_its_memory_limit(
    memory_cgroup: Callable[[int], Path], corral: Callable[..., CorralProcess], smollm2: Path
) -> None:
    procs = memory_cgroup(800 * MiB)
    # KV alone for 4 x 8192 tokens of SmolLM2: 2 x 30 layers x 32768 x 192 x 2 bytes = 720 MiB.
    models = {"big": {"path": str(smollm2), "slots": 4, "ctx_per_slot": 8192},
              "small": {"path": str(smollm2), "slots": 1, "ctx_per_slot": 256}}
    server = corral({"models": models, "reserve": {"ram": "100MiB"}},
                    prefix=["sh", "-c", f'echo $$ > {procs} && exec "$@"', "sh"])
    (cpu,) = [d for d in server.http.get("/admin/status").json()["devices"]
              if d["device"] == "cpu"]
    assert (cpu["total"], cpu["name"]) == (800 * MiB, "system memory (cgroup v1 limit)")
    big = server.http.post("/admin/models/big/load")
    assert big.status_code == 503, big.text
    message = big.json()["error"]["message"]
    assert "not enough memory for 'big': cpu: needs" in message
    assert "more than these devices can hold even when idle" in message
    assert server.children() == []  # refused before a child was started, not killed after
    answer = server.http.post("/v1/completions", json={"model": "small", "prompt": "Hi",
                                                       "max_tokens": 2})
    assert answer.status_code == 200, answer.text
    (child,) = server.children()
    with contextlib.suppress(FileNotFoundError):
        assert str(child.pid) in procs.read_text().split()  # the child runs under the limit


def test_a_failed_reading_keeps_the_last_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    # The host's RAM in place of a container's limit for one reading would make the ledger
    # count the difference as other programs' use, and stall loads until the next reading.
    from corral.probe import devices

    monkeypatch.setattr(devices, "_cgroup_last", None)
    readings: list[CgroupMemory | None] = [CgroupMemory(64 * MiB, 32 * MiB, 2), None]
    monkeypatch.setattr(devices, "cgroup_memory", lambda: readings.pop(0))
    first, second = devices.discover_devices()[-1], devices.discover_devices()[-1]
    assert (first.total, first.free) == (64 * MiB, 32 * MiB)
    assert (second.total, second.free) == (64 * MiB, 32 * MiB)
