"""corral: a supervisor and reverse proxy for llama.cpp llama-server processes."""

from __future__ import annotations

__version__ = "0.1.0"
