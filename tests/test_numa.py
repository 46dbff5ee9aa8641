"""Slot claiming across processes (flock), pinning of a real process, PACE_PIN=0."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

PACE_CORE = Path(__file__).resolve().parents[1] / "pace_core"

# Runs in a subprocess: claim a slot as a replica does (claim_slot, unless PACE_PIN=0),
# pin to it as its engine process does (pin_to_slot), print the claim as JSON, then hold
# it until stdin closes. pace_core/__init__ (torch, transformers) is skipped unless the
# test needs torch, to keep the subprocesses cheap.
HOLDER = r"""
import json, os, sys, threading, time, types
if os.environ.get("LIGHT_IMPORT") == "1":
    pkg = types.ModuleType("pace_core"); pkg.__path__ = [sys.argv[1]]
    sys.modules["pace_core"] = pkg
# a thread that exists BEFORE pinning: it must be pinned too
ev = threading.Event(); t = threading.Thread(target=ev.wait, daemon=True); t.start()
from pace_core import numa
cps = int(os.environ["CPS"]) if os.environ.get("CPS") else None
claim = out = None
try:
    if numa.pinning_enabled():
        claim = numa.claim_slot(cores_per_slot=cps, wait_s=float(os.environ.get("WAIT", "0")))
except numa.NoFreeSlotError as e:
    print(json.dumps({"error": str(e)}), flush=True); sys.exit(3)
if claim:
    out = {**claim.to_dict(), **numa.pin_to_slot(claim.slot)}
    out["thread_native_id"] = t.native_id
    out["omp"] = os.environ.get("OMP_NUM_THREADS")
    if "torch" in sys.modules:
        out["torch_get_num_threads"] = sys.modules["torch"].get_num_threads()
    out["mempolicy"] = numa.get_mempolicy()
print(json.dumps(out), flush=True)
sys.stdin.read()
"""


@pytest.fixture
def env(tmp_path, monkeypatch):
    e = dict(os.environ)
    e["PACE_SLOT_DIR"] = str(tmp_path / "slots")
    e["LIGHT_IMPORT"] = "1"
    for k in ("PACE_TOPOLOGY", "PACE_CORES_PER_SLOT", "PACE_PIN", "PACE_MEMBIND", "CPS"):
        e.pop(k, None)
    monkeypatch.setenv("PACE_SLOT_DIR", e["PACE_SLOT_DIR"])
    return e


class Holder:
    def __init__(self, env, **extra):
        self.proc = subprocess.Popen(
            [sys.executable, "-c", HOLDER, str(PACE_CORE)], env={**env, **extra},
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def result(self, timeout=60):
        line = self.proc.stdout.readline()
        if not line:
            raise AssertionError(f"holder died: rc={self.proc.wait(timeout)} "
                                 f"stderr={self.proc.stderr.read()[-3000:]}")
        return json.loads(line)

    def stop(self):
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(30)


@pytest.fixture
def holders():
    made = []

    def make(env, **extra):
        h = Holder(env, **extra)
        made.append(h)
        return h
    yield make
    for h in made:
        h.stop()


def test_two_processes_get_different_slots_third_fails_killed_slot_is_freed(env, holders):
    env = {**env, "PACE_TOPOLOGY": "0-0;1-1"}  # simulated: 2 NUMA nodes x 1 core
    a, b = holders(env), holders(env)
    ra, rb = a.result(), b.result()
    assert {ra["slot"], rb["slot"]} == {0, 1}
    assert {tuple(ra["cpus"]), tuple(rb["cpus"])} == {(0,), (1,)}
    assert ra["numa_node"] == ra["slot"] and rb["numa_node"] == rb["slot"]
    # third: a clear error naming the holders, promptly
    c = holders(env)
    rc = c.result()
    assert c.proc.wait(30) == 3
    assert "no free NUMA slot" in rc["error"] and "all 2 slot(s) are held" in rc["error"]
    assert f"pid={a.proc.pid}" in rc["error"] and f"pid={b.proc.pid}" in rc["error"]
    # SIGKILL (no cleanup code runs): the kernel drops the lock, the slot is free again
    a.proc.send_signal(signal.SIGKILL)
    a.proc.wait(30)
    d = holders(env)
    rd = d.result()
    assert rd["slot"] == ra["slot"] and rd["pid"] == d.proc.pid


def test_waiting_claim_gets_slot_when_holder_exits(env, holders):
    env = {**env, "PACE_TOPOLOGY": "0-0"}
    a = holders(env)
    a.result()
    b = holders(env, WAIT="30")  # waits for the slot instead of failing
    time.sleep(1.0)
    assert b.proc.poll() is None
    a.proc.stdin.close()  # a exits normally
    rb = b.result()
    assert rb["slot"] == 0 and rb["pid"] == b.proc.pid


def test_claims_lock_cpus_across_different_splits(env, holders):
    env = {**env, "PACE_TOPOLOGY": "0-1"}
    a = holders(env)  # whole node: cpus 0-1
    assert a.result()["cpus"] == [0, 1]
    b = holders(env, CPS="1")  # 1-core slots overlap a's CPUs
    assert "no free NUMA slot" in b.result()["error"]
    a.stop()
    c, d = holders(env, CPS="1"), holders(env, CPS="1")
    assert sorted([c.result()["cpus"], d.result()["cpus"]]) == [[0], [1]]


def test_pinning_sets_real_affinity_of_all_threads_torch_threads_and_membind(env, holders):
    # the real topology of this host, split into 1-core slots; full import (torch)
    env = {**env, "LIGHT_IMPORT": "0"}
    cpus_here = sorted(os.sched_getaffinity(0))
    a = holders(env, CPS="1")
    r = a.result(timeout=120)
    assert r["cpus"] == [cpus_here[0]] and r["affinity"] == r["cpus"]
    assert r["torch_threads"] == 1 and r["torch_get_num_threads"] == 1
    assert r["omp"] == "1"
    # checked from outside: the main thread and every other thread of the process
    proc = psutil.Process(a.proc.pid)
    assert proc.cpu_affinity() == r["cpus"]
    for t in proc.threads():
        assert os.sched_getaffinity(t.id) == set(r["cpus"]), t
    assert any(t.id == r["thread_native_id"] for t in proc.threads())
    if r["mempolicy"] is not None and r["membind"].startswith("bind"):
        assert r["mempolicy"] == [2, [r["numa_node"]]]  # MPOL_BIND to the slot's node
    # the next process gets the next core (or fails clearly on a 1-core machine)
    if len(cpus_here) > 1:
        rb = holders(env, CPS="1", LIGHT_IMPORT="1").result()
        assert rb["cpus"] == [cpus_here[1]]
        assert psutil.Process(rb["pid"]).cpu_affinity() == [cpus_here[1]]


def test_simulated_cpus_missing_on_host_claim_without_pinning(env, holders):
    r = holders({**env, "PACE_TOPOLOGY": "4000-4001;4002-4003"}).result()
    assert r["slot"] == 0 and r["cpus"] == [4000, 4001]
    assert r["affinity"] is None  # logged and continued
    assert r["membind"].startswith(("failed", "bind", "skipped"))


def test_pin_disabled_claims_nothing(env, holders):
    assert holders({**env, "PACE_PIN": "0"}).result() is None


def test_in_process_claim_release_and_status(env, tmp_path):
    from pace_core import numa

    slots = numa.split_slots(numa.discover_numa_nodes(use_env=False)) or []
    fake = [numa.Slot(0, 0, (900,)), numa.Slot(1, 0, (901,))]
    with numa.claim_slot(fake, wait_s=0) as c1:
        assert c1.slot == fake[0] and c1.held
        d = c1.to_dict()
        assert d["cpulist"] == "900" and d["pid"] == os.getpid() and d["held"]
        c2 = numa.claim_slot(fake, wait_s=0)  # another open file: a separate claim
        assert c2.slot == fake[1]
        with pytest.raises(numa.NoFreeSlotError):
            numa.claim_slot(fake, wait_s=0)
        status = numa.slot_status(fake)
        assert [s["free"] for s in status] == [False, False]
        assert f"pid={os.getpid()}" in status[0]["held_by"][0]
        c2.release()
        c2.release()  # idempotent
        assert [s["free"] for s in numa.slot_status(fake)] == [False, True]
    assert not c1.held
    assert [s["free"] for s in numa.slot_status(fake)] == [True, True]
    assert slots  # the real host has at least one slot
    with pytest.raises(numa.NoFreeSlotError, match="no slot"):
        numa.claim_slot([], wait_s=0)


FAKE = [(0, 0, (900,)), (1, 0, (901,))]


@pytest.fixture
def default_dir(tmp_path, monkeypatch):
    """The default (private) lock directory, relocated under tmp_path."""
    from pace_core import numa

    monkeypatch.delenv("PACE_SLOT_DIR", raising=False)
    monkeypatch.setattr(numa, "DEFAULT_SLOT_DIR", str(tmp_path / "pace-slots-{uid}"))
    return tmp_path / f"pace-slots-{os.geteuid()}"


def test_default_lock_dir_is_private_and_claims_stay_crash_safe(default_dir):
    from pace_core import numa

    fake = [numa.Slot(*s) for s in FAKE]
    with numa.claim_slot(fake, wait_s=0) as claim:
        assert claim.lock_dir == str(default_dir) == str(numa.slot_dir())
        assert os.stat(default_dir).st_mode & 0o777 == 0o700
        assert os.stat(default_dir).st_uid == os.geteuid()
    os.chmod(default_dir, 0o777)  # opened up by someone: closed again at the next claim
    numa.claim_slot(fake, wait_s=0).release()
    assert os.stat(default_dir).st_mode & 0o777 == 0o700


def test_default_lock_dir_refuses_a_symlink_or_another_users_directory(default_dir, tmp_path):
    from pace_core import numa

    fake = [numa.Slot(*s) for s in FAKE]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir(mode=0o700)
    default_dir.symlink_to(elsewhere)
    with pytest.raises(numa.SlotDirError, match="PACE_SLOT_DIR"):
        numa.claim_slot(fake, wait_s=0)
    assert list(elsewhere.iterdir()) == []
    default_dir.unlink()
    if os.geteuid() != 0:
        pytest.skip("chown to another user needs root")
    default_dir.mkdir(mode=0o700)
    os.chown(default_dir, 65534, 65534)
    with pytest.raises(numa.SlotDirError, match="belongs to another user"):
        numa.claim_slot(fake, wait_s=0)


def test_lock_files_are_never_opened_through_a_symlink(env, tmp_path):
    """A lock file planted as a symlink is refused; its target is untouched."""
    import errno

    from pace_core import numa

    lock_dir = Path(env["PACE_SLOT_DIR"])
    lock_dir.mkdir(mode=0o700)
    target = tmp_path / "precious"
    target.write_text("keep me\n")
    (lock_dir / "cpu-900.lock").symlink_to(target)
    with pytest.raises(OSError) as err:
        numa.claim_slot([numa.Slot(*FAKE[0])], wait_s=0)
    assert err.value.errno == errno.ELOOP
    assert target.read_text() == "keep me\n"


def test_shared_lock_dir_other_users_lock_files_are_locked_read_only():
    """PACE_SLOT_DIR shared by two users: the second user cannot write the first one's
    lock file (mode 0644), locks it through a read-only descriptor, and the slot is
    held for both."""
    import shutil
    import tempfile

    if os.geteuid() != 0:
        pytest.skip("needs root to run a process as another user")
    from pace_core import numa

    shared = Path(tempfile.mkdtemp(prefix="pace-shared-slots-", dir="/tmp"))  # reachable by the other user
    os.chmod(shared, 0o1777)  # the shared set-up's choice
    fake = numa.Slot(*FAKE[0])
    numa.claim_slot([fake], wait_s=0, lock_dir=shared).release()  # root's lock file now exists, 0644
    assert os.stat(shared / "cpu-900.lock").st_mode & 0o777 == 0o644
    ready_r, ready_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the other user: a forked child that drops root
        try:
            os.setgid(65534)
            os.setuid(65534)
            claim = numa.claim_slot([fake], wait_s=0, lock_dir=shared)
            os.write(ready_w, b"held" if claim.held else b"none")
            time.sleep(60)
        finally:
            os._exit(0)
    os.close(ready_w)  # the child's error (no write) reads as EOF
    try:
        assert os.read(ready_r, 16) == b"held"
        with pytest.raises(numa.NoFreeSlotError):
            numa.claim_slot([fake], wait_s=0, lock_dir=shared)
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        os.close(ready_r)
    try:
        numa.claim_slot([fake], wait_s=0, lock_dir=shared).release()  # free again once it died
    finally:
        shutil.rmtree(shared)
