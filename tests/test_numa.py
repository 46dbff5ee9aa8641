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

# Runs in a subprocess: claim (and pin) a slot, print the claim as JSON, then hold it
# until stdin closes. pace_core/__init__ (torch, transformers) is skipped unless the
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
try:
    claim = numa.claim_slot_and_pin(cps, wait_s=float(os.environ.get("WAIT", "0")))
except numa.NoFreeSlotError as e:
    print(json.dumps({"error": str(e)}), flush=True); sys.exit(3)
out = claim.to_dict() if claim else None
if claim:
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


def test_pin_disabled_returns_none(env, holders):
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
