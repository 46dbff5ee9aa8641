"""Placement: everything that puts replicas on NUMA slots, in one module. ``deployments``
and ``cluster`` import these names from here (``cluster`` never imports ``deployments``),
and importing it stays cheap (no torch; :func:`pin_to_slot` imports torch when called).

- Ray names: :data:`SLOT_RESOURCE`, the custom resource a node advertises one unit of
  per slot (``cluster.start_node``) and every replica asks one of (``deployments.app``),
  so that Serve never places more replicas on a host than it has slots; and
  :data:`NODE_ENV`, the environment Ray nodes start with.
- Discovery: :func:`discover_numa_nodes`, :func:`split_slots`, :func:`host_slots`
  (``PACE_TOPOLOGY`` simulates a host, ``PACE_CORES_PER_SLOT`` splits nodes), re-exported
  from :mod:`pace_core.topology`, the pure parsing helper behind them.
- Claims: :func:`claim_slot`, :func:`slot_status`, :func:`slot_dir`.
- Pinning: :func:`pin_to_slot`.

A replica (``deployments/replica.py``) claims a slot with :func:`claim_slot` in its
constructor and holds the claim for as long as it lives; its engine process
(``deployments/engine_process.py``) pins itself to the slot with :func:`pin_to_slot`
before it loads any weights (first touch then places them in the slot's memory), and
so does an engine the replica restarts.

Claiming: the first free slot of this host is taken with OS file locks, one lock file
per CPU (file ``cpu-<n>.lock``), taken with ``fcntl.flock(LOCK_EX | LOCK_NB)``. A slot
is claimed when all of its CPUs' locks are held. The kernel drops the locks when the
process dies (even on SIGKILL), so a crashed replica's slot is free again at once;
there is no central bookkeeping that can go stale. Locking CPUs rather than slot
numbers keeps processes that split the host differently (another ``cores_per_slot``)
from ever sharing a CPU.

The lock directory is private by default: ``/tmp/pace-slots-<uid>``, mode 0700, owned
by the user (it is refused, with a message naming the fix, if it is a symlink or
another user's), so that no other local user can hold the slots or plant links; every
lock file is opened with ``O_NOFOLLOW`` relative to the directory. It depends on the
uid only (not on ``$XDG_RUNTIME_DIR``, which differs between sessions of one user and
vanishes at logout), so all of a user's processes on a host agree on it.
``$PACE_SLOT_DIR`` overrides it: one directory per host or pod, or a directory shared
by several users' servers on one host (create it with the group permissions they need;
a lock file another user created is locked through a read-only descriptor, as
``flock`` allows).

No free slot: :func:`claim_slot` waits up to ``wait_s`` (default ``PACE_SLOT_WAIT_S``
or 10 s, which covers a replacement starting while its predecessor is still exiting)
and then raises :class:`NoFreeSlotError` naming the holders. The replica constructor
fails and Serve retries it later. With the slot resource, Serve never places more
replicas on a host than it has slots, so this only happens when something outside Ray
holds a slot.

Pinning: CPU affinity of every thread of the process, ``torch.set_num_threads``,
``OMP_NUM_THREADS``/``MKL_NUM_THREADS``, and a best-effort ``set_mempolicy`` (MPOL_BIND
to the slot's NUMA node; ``PACE_MEMBIND=preferred`` or ``off``).

``PACE_PIN=0`` (:func:`pinning_enabled` false) disables both: the replica claims no
slot and its engine does not pin itself.
"""
from __future__ import annotations

import ctypes
import errno
import logging
import os
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path

from .topology import (  # noqa: F401 - re-exported: import placement names from here
    CORES_PER_SLOT_ENV,
    TOPOLOGY_ENV,
    NumaNode,
    Slot,
    describe,
    discover_numa_nodes,
    format_cpulist,
    host_slots,
    process_allowed_cpus,
    resolve_cores_per_slot,
    split_slots,
)

logger = logging.getLogger(__name__)

SLOT_RESOURCE = "pace_slot"  # Ray custom resource: one unit per slot on a node

# NODE_ENV belongs in the environment Ray starts from: `python -m cluster.start_node`,
# the KubeRay config and the README's serve command set it (a value already in the
# environment wins): Serve's HTTP proxy streams to the router over gRPC instead of Ray's
# object transport (HTTP TPOT overhead +4..10% instead of +11..12%: README, Serving).
PROXY_GRPC_ENV = "RAY_SERVE_PROXY_USE_GRPC"
# Serve's HTTP proxy loads deployments.proxy, which answers what it refuses before the
# app (unparsable requests, undecodable headers) in OpenAI's error shape
PROXY_CALLBACK_ENV = "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH"
NODE_ENV = {PROXY_GRPC_ENV: "1", PROXY_CALLBACK_ENV: "deployments.proxy.proxy_middlewares"}

SLOT_DIR_ENV = "PACE_SLOT_DIR"
PIN_ENV = "PACE_PIN"
MEMBIND_ENV = "PACE_MEMBIND"
WAIT_ENV = "PACE_SLOT_WAIT_S"
DEFAULT_SLOT_DIR = "/tmp/pace-slots-{uid}"
DEFAULT_WAIT_S = 10.0

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None


class NoFreeSlotError(RuntimeError):
    """Every slot on this host is held by another process."""


class SlotDirError(RuntimeError):
    """The default lock directory is not safe to use (a symlink, or another user's)."""


def pinning_enabled() -> bool:
    return os.environ.get(PIN_ENV, "1").strip().lower() not in ("0", "false", "no", "off")


def slot_dir() -> Path:
    return Path(os.environ.get(SLOT_DIR_ENV) or DEFAULT_SLOT_DIR.format(uid=os.geteuid()))


def _open_dir(directory: Path, create: bool = True) -> int | None:
    """A descriptor of the lock directory (None if it does not exist and ``create`` is
    false). A missing directory is created with mode 0700. The default directory must
    be a real directory owned by this user, and is made private (0700) if it is not."""
    default = directory == Path(DEFAULT_SLOT_DIR.format(uid=os.geteuid()))
    if create:
        directory.mkdir(mode=0o700, parents=not default, exist_ok=True)
    flags = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC | (os.O_NOFOLLOW if default else 0)
    try:
        fd = os.open(directory, flags)
    except FileNotFoundError:
        if create:
            raise
        return None
    except OSError as err:
        raise SlotDirError(f"the slot lock directory {directory} cannot be used ({err.strerror}; a symlink is "
                           f"refused): remove it, or set {SLOT_DIR_ENV} to a directory of your own") from None
    if default:
        st = os.fstat(fd)
        if st.st_uid != os.geteuid():
            os.close(fd)
            raise SlotDirError(f"the slot lock directory {directory} belongs to another user (uid {st.st_uid}), who "
                               f"could hold or release this user's slots: remove it, or set {SLOT_DIR_ENV} to a "
                               "directory of your own")
        if st.st_mode & 0o077:
            os.fchmod(fd, 0o700)
    return fd


def _lock_name(cpu: int) -> str:
    return f"cpu-{cpu}.lock"


def _open_lock(dir_fd: int, cpu: int) -> tuple[int, bool]:
    """The CPU's lock file (created if missing, never through a symlink) and whether it
    is writable: in a shared directory, another user's lock file is opened read-only,
    which is enough for flock."""
    flags = os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        return os.open(_lock_name(cpu), flags | os.O_RDWR, 0o644, dir_fd=dir_fd), True
    except PermissionError:
        return os.open(_lock_name(cpu), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd), False


def _try_lock(fd: int) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except OSError as e:
        if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            return False
        raise


def _read_holder(dir_fd: int, cpu: int) -> str:
    try:
        fd = os.open(_lock_name(cpu), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
    except OSError:
        return "?"
    try:
        return os.read(fd, 512).decode(errors="replace").strip() or "?"
    finally:
        os.close(fd)


@dataclass
class SlotClaim:
    """A held slot. The locks are released by :meth:`release` or when the process
    exits; releasing does not undo the pinning."""

    slot: Slot
    lock_dir: str
    pid: int
    hostname: str
    affinity: list[int] | None = None     # CPUs the process was pinned to (None: not pinned)
    torch_threads: int | None = None
    membind: str = "not attempted"
    _fds: list[int] = field(default_factory=list, repr=False)

    @property
    def held(self) -> bool:
        return bool(self._fds)

    def release(self) -> None:
        fds, self._fds = self._fds, []
        for fd in fds:
            try:
                fcntl.flock(fd, fcntl.LOCK_UN)
            finally:
                os.close(fd)
        if fds:
            logger.info("released slot %d (cpus %s)", self.slot.index,
                        format_cpulist(self.slot.cpus))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release()

    def to_dict(self) -> dict:
        return {
            "slot": self.slot.index,
            "numa_node": self.slot.numa_node,
            "cpus": list(self.slot.cpus),
            "cpulist": format_cpulist(self.slot.cpus),
            "affinity": self.affinity,
            "torch_threads": self.torch_threads,
            "membind": self.membind,
            "pid": self.pid,
            "hostname": self.hostname,
            "lock_dir": self.lock_dir,
            "held": self.held,
        }


def _lock_slot(slot: Slot, dir_fd: int) -> list[int] | None:
    """Lock every CPU of ``slot``; return the fds, or None (nothing held) if any CPU
    is taken."""
    fds: list[int] = []
    writable: list[int] = []
    try:
        for cpu in slot.cpus:
            fd, can_write = _open_lock(dir_fd, cpu)
            if not _try_lock(fd):
                os.close(fd)
                raise BlockingIOError
            fds.append(fd)
            if can_write:
                writable.append(fd)
    except BlockingIOError:
        for fd in fds:
            os.close(fd)  # closing drops the lock
        return None
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise
    info = f"pid={os.getpid()} host={platform.node()} slot={slot.index} cpus={format_cpulist(slot.cpus)}\n"
    for fd in writable:  # who holds it, for NoFreeSlotError and slot_status
        os.ftruncate(fd, 0)
        os.pwrite(fd, info.encode(), 0)
    return fds


def claim_slot(slots: list[Slot] | None = None, cores_per_slot: int | None = None,
               wait_s: float | None = None, lock_dir: str | os.PathLike | None = None) -> SlotClaim:
    """Claim the first free slot (locks only, no pinning). Raises NoFreeSlotError
    after ``wait_s`` seconds (default ``PACE_SLOT_WAIT_S`` or 10) without one."""
    if fcntl is None:  # pragma: no cover
        raise NoFreeSlotError("slot claiming needs fcntl (POSIX)")
    if slots is None:
        slots = host_slots(cores_per_slot)
    if not slots:
        raise NoFreeSlotError(f"this host has no slot (cores_per_slot={cores_per_slot}); "
                              f"nodes: {discover_numa_nodes()}")
    if wait_s is None:
        wait_s = float(os.environ.get(WAIT_ENV, DEFAULT_WAIT_S))
    directory = Path(lock_dir) if lock_dir is not None else slot_dir()
    dir_fd = _open_dir(directory)
    try:
        deadline = time.monotonic() + max(0.0, wait_s)
        while True:
            for slot in slots:
                fds = _lock_slot(slot, dir_fd)
                if fds is not None:
                    return SlotClaim(slot=slot, lock_dir=str(directory), pid=os.getpid(),
                                     hostname=platform.node(), _fds=fds)
            if time.monotonic() >= deadline:
                break
            time.sleep(0.2)
        holders = "; ".join(
            f"slot {s.index} (cpus {format_cpulist(s.cpus)}): "
            + ", ".join(sorted({_read_holder(dir_fd, c) for c in s.cpus}))
            for s in slots)
    finally:
        os.close(dir_fd)
    raise NoFreeSlotError(
        f"no free NUMA slot on {platform.node()} after {wait_s:g}s: all {len(slots)} slot(s) "
        f"are held ({holders}). Lock dir: {directory}. Each replica needs one slot; "
        f"start fewer replicas, add nodes, or use a smaller cores_per_slot.")


def slot_status(slots: list[Slot] | None = None, cores_per_slot: int | None = None,
                lock_dir: str | os.PathLike | None = None) -> list[dict]:
    """Which slots of this host are held, and by whom (probes the locks)."""
    slots = host_slots(cores_per_slot) if slots is None else slots
    directory = Path(lock_dir) if lock_dir is not None else slot_dir()
    dir_fd = _open_dir(directory, create=False)
    if dir_fd is None:  # no lock directory yet: nothing was ever claimed
        return [{**s.to_dict(), "free": True, "held_by": []} for s in slots]
    out = []
    try:
        for s in slots:
            held_by = []
            for cpu in s.cpus:
                try:
                    fd = os.open(_lock_name(cpu), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
                except FileNotFoundError:
                    continue
                try:
                    if _try_lock(fd):
                        fcntl.flock(fd, fcntl.LOCK_UN)
                    else:
                        held_by.append(_read_holder(dir_fd, cpu))
                finally:
                    os.close(fd)
            out.append({**s.to_dict(), "free": not held_by, "held_by": sorted(set(held_by))})
    finally:
        os.close(dir_fd)
    return out


# ---------------------------------------------------------------- pinning

def set_process_affinity(cpus) -> list[int]:
    """Pin every thread of this process (sched_setaffinity on each /proc/self/task
    entry: os.sched_setaffinity(0) alone only moves the calling thread, and a Serve
    replica's constructor does not run on the main thread). Returns the new affinity
    of the main thread."""
    cpus = set(cpus)
    tids = []
    try:
        tids = [int(t) for t in os.listdir("/proc/self/task")]
    except OSError:
        pass
    os.sched_setaffinity(0, cpus)  # calling thread first: raises if cpus are invalid
    for tid in tids:
        try:
            os.sched_setaffinity(tid, cpus)
        except (ProcessLookupError, PermissionError):
            pass  # thread exited meanwhile
    return sorted(os.sched_getaffinity(os.getpid()))


_MPOL = {"preferred": 1, "bind": 2}
_SYS_SET_MEMPOLICY = {"x86_64": 238, "aarch64": 237, "ppc64le": 261, "s390x": 270}
_SYS_GET_MEMPOLICY = {"x86_64": 239, "aarch64": 236, "ppc64le": 260, "s390x": 269}


def set_mempolicy(numa_node: int, mode: str = "bind") -> str:
    """Best-effort memory policy for the calling thread (and threads it creates later),
    via the raw set_mempolicy syscall (no libnuma needed). Returns a status string;
    never raises."""
    mode = mode.strip().lower()
    if mode in ("off", "0", "none", ""):
        return "off"
    if mode not in _MPOL:
        return f"skipped: unknown {MEMBIND_ENV}={mode!r}"
    nr = _SYS_SET_MEMPOLICY.get(platform.machine())
    if nr is None or not hasattr(ctypes, "CDLL"):
        return f"skipped: no set_mempolicy syscall number for {platform.machine()}"
    nbits = 8 * ctypes.sizeof(ctypes.c_ulong)
    words = numa_node // nbits + 1
    mask = (ctypes.c_ulong * words)()
    mask[numa_node // nbits] = 1 << (numa_node % nbits)
    libc = ctypes.CDLL(None, use_errno=True)
    rc = libc.syscall(ctypes.c_long(nr), ctypes.c_int(_MPOL[mode]), mask,
                      ctypes.c_ulong(words * nbits + 1))
    if rc != 0:
        err = ctypes.get_errno()
        return f"failed: {mode} node {numa_node}: {os.strerror(err)}"
    return f"{mode} node {numa_node}"


def get_mempolicy() -> tuple[int, list[int]] | None:
    """(mode, nodes) of the calling thread's memory policy, or None if unavailable."""
    nr = _SYS_GET_MEMPOLICY.get(platform.machine())
    if nr is None:
        return None
    nbits = 8 * ctypes.sizeof(ctypes.c_ulong)
    words = 16
    mode = ctypes.c_int(-1)
    mask = (ctypes.c_ulong * words)()
    libc = ctypes.CDLL(None, use_errno=True)
    rc = libc.syscall(ctypes.c_long(nr), ctypes.byref(mode), mask,
                      ctypes.c_ulong(words * nbits), ctypes.c_ulong(0), ctypes.c_ulong(0))
    if rc != 0:
        return None
    nodes = [w * nbits + b for w in range(words) for b in range(nbits) if mask[w] >> b & 1]
    return mode.value, nodes


def pin_to_slot(slot: Slot) -> dict:
    """Pin this process to ``slot``: affinity, torch/OMP threads, memory policy.
    Each step is best effort and reported in the returned dict."""
    n = len(slot.cpus)
    result: dict = {"affinity": None, "torch_threads": None, "membind": "not attempted"}
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[var] = str(n)
    if hasattr(os, "sched_setaffinity"):
        try:
            result["affinity"] = set_process_affinity(slot.cpus)
        except (OSError, ValueError) as e:
            logger.warning("cannot pin to cpus %s (%s); simulated topology? continuing unpinned",
                           format_cpulist(slot.cpus), e)
    else:
        logger.warning("sched_setaffinity is not available on this OS; not pinning CPUs")
    try:
        import torch

        torch.set_num_threads(n)
        result["torch_threads"] = torch.get_num_threads()
    except ImportError:
        pass
    result["membind"] = set_mempolicy(slot.numa_node, os.environ.get(MEMBIND_ENV, "bind"))
    if result["membind"].startswith(("failed", "skipped")):
        logger.warning("memory binding %s; continuing (first-touch still places memory "
                       "near the pinned CPUs)", result["membind"])
    return result

