"""NUMA slots: discovery, crash-safe claiming and pinning (placeholder interface).

Being implemented (issue 5). The deployments call ``claim_slot_and_pin`` in the
replica constructor BEFORE loading weights; it returns the claimed slot, or None when
pinning is not possible/configured.
"""
from __future__ import annotations

from dataclasses import dataclass

SLOT_RESOURCE = "pace_slot"  # Ray custom resource: one unit per slot on a node


@dataclass(frozen=True)
class Slot:
    index: int  # slot number on this host
    numa_node: int
    cpus: tuple[int, ...]


def claim_slot_and_pin(cores_per_slot: int | None = None):
    """Claim a free slot on this host, pin this process to it, return the claim (with
    ``.slot``) or None. Placeholder: pins nothing yet."""
    return None
