"""Slot claiming and pinning under Ray Serve, with a minimal stand-in replica (no model):
a simulated 2-slot topology (2 NUMA nodes x 1 core) on this machine, a Ray node with
2 units of the slot resource, replicas that ask for one slot each and claim it with
claim_slot in their constructor as the real replica does, then pin themselves with
pin_to_slot (what the real replica's engine process does; the stand-in has none).
Checked from outside: the replica processes' real CPU affinity (psutil)."""
from __future__ import annotations

import asyncio
import os
import signal
import time

import psutil
import pytest

from helpers import two_slot_serve, wait_for  # noqa: E402

pytestmark = pytest.mark.slow

APP = "pinning"


@pytest.fixture
def ray_two_slots(tmp_path, monkeypatch):
    yield from two_slot_serve(tmp_path, monkeypatch, "pace-pinning-test")


def make_app(**options):
    from ray import serve

    from pace_core.numa import SLOT_RESOURCE

    @serve.deployment(ray_actor_options={"num_cpus": 0, "resources": {SLOT_RESOURCE: 1}},
                      max_ongoing_requests=1, health_check_period_s=1,
                      graceful_shutdown_timeout_s=1, **options)
    class PinnedReplica:
        def __init__(self):
            from pace_core.numa import claim_slot, pin_to_slot

            self.claim = claim_slot()  # held for the replica's life
            self.pinned = pin_to_slot(self.claim.slot)  # before any weights would be loaded

        async def info(self, hold_s: float = 0.0):
            import torch

            await asyncio.sleep(hold_s)
            return {**self.claim.to_dict(), **self.pinned, "pid": os.getpid(),
                    "torch_get_num_threads": torch.get_num_threads()}

    return PinnedReplica.bind()


def replica_infos(handle, n_calls=6, hold_s=0.4):
    """Concurrent calls; with max_ongoing_requests=1 they spread over the replicas."""
    responses = [handle.info.remote(hold_s) for _ in range(n_calls)]
    return {r["pid"]: r for r in (resp.result(timeout_s=120) for resp in responses)}


def replica_states():
    from ray import serve

    app = serve.status().applications.get(APP)
    if not app:
        return {}
    (dep,) = app.deployments.values()
    return {str(k): v for k, v in dep.replica_states.items()}


def check_pinned_from_outside(info):
    proc = psutil.Process(info["pid"])
    assert proc.cpu_affinity() == info["cpus"], info
    for t in proc.threads():  # every thread, not just the constructor's
        assert os.sched_getaffinity(t.id) == set(info["cpus"]), (t, info)
    assert info["torch_get_num_threads"] == len(info["cpus"]) == 1


def test_two_pinned_replicas_third_pending_killed_slot_reclaimed(ray_two_slots):
    from ray import serve
    from ray.serve.api import _run

    handle = _run(make_app(num_replicas=3), name=APP, route_prefix=None, _blocking=False)
    wait_for(lambda: replica_states().get("RUNNING") == 2, 180, "2 running replicas")
    def both():
        i = replica_infos(handle)
        return i if len(i) == 2 else None

    infos = wait_for(both, 60, "calls to reach both replicas")
    assert sorted(i["slot"] for i in infos.values()) == [0, 1]
    assert sorted(tuple(i["cpus"]) for i in infos.values()) == [(0,), (1,)]
    for info in infos.values():
        check_pinned_from_outside(info)
    # the third replica has no slot: pending, and the service still answers
    time.sleep(2)
    states = replica_states()
    assert states.get("RUNNING") == 2 and sum(states.values()) == 3, states
    assert len(replica_infos(handle, n_calls=4)) == 2

    # SIGKILL one replica: its slot is free at once and a new replica claims it
    victim_pid, victim = next(iter(infos.items()))
    os.kill(victim_pid, signal.SIGKILL)

    def replaced():
        i = replica_infos(handle, n_calls=4, hold_s=0.3)
        return i if len(i) == 2 and victim_pid not in i else None

    new_infos = wait_for(replaced, 180, "a replacement replica on the freed slot", interval=1)
    (new_pid,) = set(new_infos) - set(infos)
    assert new_infos[new_pid]["slot"] == victim["slot"]
    assert new_infos[new_pid]["cpus"] == victim["cpus"]
    check_pinned_from_outside(new_infos[new_pid])
    assert wait_for(lambda: replica_states().get("RUNNING") == 2, 60, "2 running again")
    serve.delete(APP)


def test_autoscaling_rises_to_the_slot_bound_and_falls_back(ray_two_slots):
    from ray.serve.api import _run

    autoscaling = {"min_replicas": 1, "max_replicas": 3, "target_ongoing_requests": 1,
                   "upscale_delay_s": 0.5, "downscale_delay_s": 2, "metrics_interval_s": 0.5,
                   "look_back_period_s": 1}
    handle = _run(make_app(autoscaling_config=autoscaling), name=APP, route_prefix=None,
                  _blocking=False)
    wait_for(lambda: replica_states().get("RUNNING") == 1, 180, "1 running replica")
    stop = time.monotonic() + 240
    peak = {}
    # sustained load: 4 requests in flight, each held 1 s
    while time.monotonic() < stop:
        pending = [handle.info.remote(1.0) for _ in range(4)]
        for p in pending:
            p.result(timeout_s=120)
        peak = replica_states()
        if peak.get("RUNNING") == 2:
            break
    assert peak.get("RUNNING") == 2, peak  # bounded by the 2 slots
    infos = replica_infos(handle, n_calls=4, hold_s=0.5)
    assert sorted(i["slot"] for i in infos.values()) == [0, 1]
    # load stops: back to min_replicas, and the freed slot is released
    wait_for(lambda: replica_states() == {"RUNNING": 1}, 120, "scale down to 1 replica")
