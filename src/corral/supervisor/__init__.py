"""Child processes: start, health, stop, restart, all in one asyncio loop."""

from __future__ import annotations

from corral.supervisor.model import Lease, ManagedModel
from corral.supervisor.process import ModelProcess
from corral.supervisor.state import ModelState
from corral.supervisor.supervisor import Supervisor

__all__ = ["Lease", "ManagedModel", "ModelProcess", "ModelState", "Supervisor"]
