"""Probes: the I/O that placement needs (GGUF metadata, devices, memory in use, server logs).

``corral.placement`` stays pure; everything here reads files, drivers or processes and hands
plain values to it.
"""

from __future__ import annotations

from corral.probe.devices import children_memory, discover_devices, process_gpu_memory
from corral.probe.gguf import read_profile
from corral.probe.usage import ReportedMemory, parse_buffer_sizes

__all__ = [
    "ReportedMemory",
    "children_memory",
    "discover_devices",
    "parse_buffer_sizes",
    "process_gpu_memory",
    "read_profile",
]
