"""What the supervisor tells observers (metrics) about models' lives.

The supervisor calls these; it does not know who listens. ``SupervisorEvents`` itself ignores
everything, so a supervisor without metrics needs no special cases.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from corral.supervisor.process import ModelProcess


class SupervisorEvents:
    """Base observer: override what you need. Methods must be quick and never raise."""

    def load_finished(self, model: str, ok: bool, seconds: float, restart: bool) -> None:
        """A load ended: ``ok`` or failed, after ``seconds``; ``restart`` after a crash."""

    def stopped(self, model: str, reason: str) -> None:
        """A child stopped: ``idle``, ``memory``, ``manual``, ``shutdown`` or ``crash``."""

    async def child_stopping(self, model: str, process: ModelProcess) -> None:
        """A ready child is about to be stopped on purpose; it still answers (read its state)."""
