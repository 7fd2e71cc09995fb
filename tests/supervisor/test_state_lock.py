"""One corral per state file: the lock beside it."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from corral.errors import AlreadyRunningError
from corral.supervisor.children import StateFileLock


def test_a_second_holder_is_refused_and_told_who_holds_it(tmp_path: Path) -> None:
    state = tmp_path / "run" / "children.json"
    with StateFileLock(state):
        with pytest.raises(AlreadyRunningError) as refused:
            StateFileLock(state).acquire()
        assert refused.value.owner == os.getpid()
        assert str(state) in str(refused.value)
        assert f"pid {os.getpid()}" in str(refused.value)
    # Released: the next corral may take it.
    with StateFileLock(state):
        pass
