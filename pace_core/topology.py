"""NUMA topology of this host and its split into slots. Pure Python, no torch.

A *slot* is the unit one replica owns: a whole NUMA node (default) or an equal slice
of one (``cores_per_slot``). Sources, in order:

1. ``PACE_TOPOLOGY`` (simulation/tests): either an inline list of nodes separated by
   ``;``, each a cpulist (``"0-0;1-1"`` = node 0 has cpu 0, node 1 has cpu 1), or a
   JSON document / path to a JSON file: ``[[0,1,2],[3,4,5]]``,
   ``{"0": "0-31", "1": "32-63"}`` or ``{"nodes": {...}}`` (a path contains ``/`` or
   ends in ``.json``). The override is taken as
   is (not intersected with the CPUs this host really has).
2. sysfs: ``/sys/devices/system/node/node*/cpulist``, restricted to the online CPUs
   (``/sys/devices/system/cpu/online``) and to the CPUs this process may run on
   (``os.sched_getaffinity``: a container's cpuset, ``taskset``). Nodes left without
   CPUs (memory-only/CXL nodes, or outside the cpuset) are dropped.
3. Fallback (no sysfs NUMA info, e.g. macOS or a restricted container): a single
   node 0 holding the allowed CPUs (psutil / os.cpu_count).

Within a node, CPUs are ordered by physical core (SMT siblings next to each other,
read from ``cpu*/topology/thread_siblings_list``) so that a slice made of whole
cores never shares a physical core with another slice.
"""
from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

logger = logging.getLogger(__name__)

TOPOLOGY_ENV = "PACE_TOPOLOGY"
CORES_PER_SLOT_ENV = "PACE_CORES_PER_SLOT"


class TopologyError(ValueError):
    """A topology description (override or sysfs) that cannot be parsed."""


@dataclass(frozen=True)
class NumaNode:
    id: int
    cpus: tuple[int, ...]  # usable CPUs, ordered by physical core


@dataclass(frozen=True)
class Slot:
    index: int  # slot number on this host, 0..n-1
    numa_node: int
    cpus: tuple[int, ...]

    def to_dict(self) -> dict:
        return {"index": self.index, "numa_node": self.numa_node, "cpus": list(self.cpus),
                "cpulist": format_cpulist(self.cpus)}


# ---------------------------------------------------------------- cpulist syntax

_RANGE = re.compile(r"^(\d+)(?:-(\d+)(?::(\d+))?)?$")


def parse_cpulist(text: str) -> list[int]:
    """Parse the kernel's cpulist format (``"0-3,8,10-14:2"``) into sorted CPU ids.
    An empty string means no CPUs."""
    cpus: set[int] = set()
    for part in text.strip().split(","):
        part = part.strip()
        if not part:
            continue
        m = _RANGE.match(part)
        if not m:
            raise TopologyError(f"bad cpulist element {part!r} in {text!r}")
        lo = int(m.group(1))
        hi = int(m.group(2)) if m.group(2) is not None else lo
        step = int(m.group(3)) if m.group(3) is not None else 1
        if hi < lo or step < 1:
            raise TopologyError(f"bad cpulist range {part!r} in {text!r}")
        cpus.update(range(lo, hi + 1, step))
    return sorted(cpus)


def format_cpulist(cpus: Iterable[int]) -> str:
    """Inverse of parse_cpulist: ``[0,1,2,5]`` -> ``"0-2,5"``."""
    s = sorted(set(cpus))
    out: list[str] = []
    i = 0
    while i < len(s):
        j = i
        while j + 1 < len(s) and s[j + 1] == s[j] + 1:
            j += 1
        out.append(str(s[i]) if i == j else f"{s[i]}-{s[j]}")
        i = j + 1
    return ",".join(out)


# ---------------------------------------------------------------- override

def parse_topology_override(value: str) -> list[NumaNode]:
    """Parse a PACE_TOPOLOGY value (inline ``;``-list, JSON text or JSON file path)."""
    value = value.strip()
    if not value:
        raise TopologyError(f"{TOPOLOGY_ENV} is empty")
    if value[0] in "[{":
        return _nodes_from_json(json.loads(value), value)
    if "/" in value or value.endswith(".json"):  # a path (inline lists never have these)
        with open(value) as f:
            return _nodes_from_json(json.load(f), value)
    nodes = [NumaNode(i, tuple(parse_cpulist(part))) for i, part in enumerate(value.split(";"))]
    return _check_override(nodes, value)


def _nodes_from_json(data, origin: str) -> list[NumaNode]:
    if isinstance(data, dict) and "nodes" in data:
        data = data["nodes"]
    nodes: list[NumaNode] = []
    if isinstance(data, dict):
        items = sorted(((int(k), v) for k, v in data.items()), key=lambda kv: kv[0])
    elif isinstance(data, list):
        items = list(enumerate(data))
    else:
        raise TopologyError(f"{TOPOLOGY_ENV} JSON must be a list or an object: {origin!r}")
    for node_id, cpus in items:
        if isinstance(cpus, str):
            cpus = parse_cpulist(cpus)
        elif isinstance(cpus, list) and all(isinstance(c, int) for c in cpus):
            cpus = sorted(set(cpus))
        else:
            raise TopologyError(f"bad CPU list for node {node_id} in {origin!r}")
        nodes.append(NumaNode(node_id, tuple(cpus)))
    return _check_override(nodes, origin)


def _check_override(nodes: list[NumaNode], origin: str) -> list[NumaNode]:
    seen: set[int] = set()
    for n in nodes:
        if not n.cpus:
            raise TopologyError(f"node {n.id} has no CPUs in {TOPOLOGY_ENV}={origin!r}")
        dup = seen.intersection(n.cpus)
        if dup:
            raise TopologyError(f"CPUs {format_cpulist(dup)} appear in two nodes in {origin!r}")
        seen.update(n.cpus)
    return nodes


# ---------------------------------------------------------------- sysfs

def _read(path: Path) -> str | None:
    try:
        return path.read_text()
    except OSError:
        return None


def _current_allowed_cpus() -> set[int] | None:
    if hasattr(os, "sched_getaffinity"):
        try:
            return set(os.sched_getaffinity(0))
        except OSError:
            pass
    try:
        import psutil

        return set(psutil.Process().cpu_affinity())
    except Exception:  # noqa: BLE001 - not available on this platform
        return None


# Recorded when this module is first imported, i.e. before pin_to_slot pins
# the process: slot discovery must see the host as it was, not the pinned subset.
_ALLOWED_AT_IMPORT = _current_allowed_cpus()


def process_allowed_cpus() -> set[int] | None:
    """CPUs this process may run on (a container's cpuset, ``taskset``), as they were
    before this process pinned itself; None if the OS cannot tell."""
    return set(_ALLOWED_AT_IMPORT) if _ALLOWED_AT_IMPORT is not None else _current_allowed_cpus()


def _core_order(cpus: Sequence[int], cpu_root: Path) -> tuple[int, ...]:
    """Order CPUs so that SMT siblings of one physical core are adjacent, cores by
    their lowest CPU id (0,128,1,129,... on a 2-way SMT EPYC)."""
    group_of: dict[int, int] = {}
    for c in cpus:
        text = _read(cpu_root / f"cpu{c}" / "topology" / "thread_siblings_list")
        sib = parse_cpulist(text) if text else [c]
        group_of[c] = min(sib) if sib else c
    return tuple(sorted(cpus, key=lambda c: (group_of[c], c)))


def read_sysfs_nodes(sysfs_root: str | os.PathLike = "/sys",
                     allowed_cpus: Iterable[int] | None = None) -> list[NumaNode] | None:
    """NUMA nodes with their usable CPUs from a sysfs tree, or None if the tree has no
    NUMA information. ``allowed_cpus`` restricts the CPUs (None: no restriction)."""
    root = Path(sysfs_root)
    node_root = root / "devices" / "system" / "node"
    cpu_root = root / "devices" / "system" / "cpu"
    node_dirs = []
    for p in node_root.glob("node*") if node_root.is_dir() else []:
        m = re.fullmatch(r"node(\d+)", p.name)
        if m and (p / "cpulist").exists():
            node_dirs.append((int(m.group(1)), p))
    if not node_dirs:
        return None
    online_text = _read(cpu_root / "online")
    online = set(parse_cpulist(online_text)) if online_text is not None else None
    allowed = set(allowed_cpus) if allowed_cpus is not None else None
    nodes = []
    for node_id, p in sorted(node_dirs):
        cpus = set(parse_cpulist(_read(p / "cpulist") or ""))
        if online is not None:
            cpus &= online
        if allowed is not None:
            cpus &= allowed
        if cpus:
            nodes.append(NumaNode(node_id, _core_order(sorted(cpus), cpu_root)))
    return nodes


def discover_numa_nodes(sysfs_root: str | os.PathLike | None = None,
                        allowed_cpus: Iterable[int] | None = None,
                        use_env: bool = True) -> list[NumaNode]:
    """This host's NUMA nodes and usable CPUs (see the module docstring for sources).

    ``sysfs_root`` (tests): read that tree instead of /sys; then ``allowed_cpus`` is
    applied only if given. With the real /sys, ``allowed_cpus`` defaults to this
    process's affinity."""
    if use_env and os.environ.get(TOPOLOGY_ENV):
        return parse_topology_override(os.environ[TOPOLOGY_ENV])
    if sysfs_root is None:
        sysfs_root = "/sys"
        if allowed_cpus is None:
            allowed_cpus = process_allowed_cpus()
    nodes = read_sysfs_nodes(sysfs_root, allowed_cpus)
    if nodes:
        return nodes
    if nodes is not None:
        logger.warning("sysfs NUMA nodes at %s have no usable CPUs; falling back", sysfs_root)
    if allowed_cpus is not None:
        cpus = sorted(set(allowed_cpus))
    else:
        cpus = sorted(process_allowed_cpus() or ())
    if not cpus:
        try:
            import psutil

            n = psutil.cpu_count(logical=True) or 1
        except Exception:  # noqa: BLE001
            n = os.cpu_count() or 1
        cpus = list(range(n))
    return [NumaNode(0, tuple(cpus))]


# ---------------------------------------------------------------- slots

def resolve_cores_per_slot(cores_per_slot: int | None) -> int | None:
    """The explicit argument, else ``PACE_CORES_PER_SLOT`` (unset/0/"" = whole node)."""
    if cores_per_slot is None:
        env = os.environ.get(CORES_PER_SLOT_ENV, "").strip()
        cores_per_slot = int(env) if env else None
    if cores_per_slot is not None and cores_per_slot <= 0:
        return None
    return cores_per_slot


def split_slots(nodes: Sequence[NumaNode], cores_per_slot: int | None = None) -> list[Slot]:
    """Slots of this host: one per node, or ``len(node.cpus) // cores_per_slot`` equal
    slices of each node (consecutive in core order; leftover CPUs stay unused, a node
    smaller than ``cores_per_slot`` gives no slot). Indices are numbered 0..n-1 in node
    order."""
    slots: list[Slot] = []
    for node in nodes:
        cpus = node.cpus
        if cores_per_slot is None:
            chunks = [cpus] if cpus else []
        else:
            n = len(cpus) // cores_per_slot
            chunks = [cpus[i * cores_per_slot:(i + 1) * cores_per_slot] for i in range(n)]
            if len(cpus) % cores_per_slot:
                logger.info("NUMA node %d: %d CPU(s) left unused (cores_per_slot=%d)",
                            node.id, len(cpus) % cores_per_slot, cores_per_slot)
        for chunk in chunks:
            slots.append(Slot(len(slots), node.id, tuple(chunk)))
    return slots


def host_slots(cores_per_slot: int | None = None, sysfs_root=None,
               allowed_cpus: Iterable[int] | None = None) -> list[Slot]:
    """discover_numa_nodes + split_slots, with ``PACE_CORES_PER_SLOT`` as default."""
    return split_slots(discover_numa_nodes(sysfs_root, allowed_cpus),
                       resolve_cores_per_slot(cores_per_slot))


def describe(nodes: Sequence[NumaNode], slots: Sequence[Slot]) -> str:
    lines = [f"{len(nodes)} NUMA node(s), {len(slots)} slot(s)"]
    for n in nodes:
        lines.append(f"  node {n.id}: cpus {format_cpulist(n.cpus)} ({len(n.cpus)})")
    for s in slots:
        lines.append(f"  slot {s.index}: node {s.numa_node}, cpus {format_cpulist(s.cpus)}")
    return "\n".join(lines)
