"""End to end with the real application (deployments.app:build_app, tiny random models):
a simulated 2-slot topology (2 NUMA nodes x 1 core) on this 2-core machine, one Ray
node advertising 2 units of the slot resource. Replica pinning is checked from outside
(psutil on the replica processes); a third replica stays pending while the service
answers; a killed replica's slot goes to its replacement; autoscaling rises to the slot
bound and falls back."""
from __future__ import annotations

import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor

import psutil
import pytest

from helpers import two_slot_serve, wait_for  # noqa: E402

pytestmark = pytest.mark.slow

APP = "pace-e2e"


@pytest.fixture
def serve_two_slots(tmp_path, monkeypatch):
    yield from two_slot_serve(tmp_path, monkeypatch, "pace-e2e-test")


def deploy(tiny_pair, **args):
    from ray.serve.api import _run

    from deployments.app import build_app
    from deployments.args import AppArgs

    target, draft = tiny_pair
    model = {"model_name_or_path": str(target), "dtype": "float32",
             "pard_config": {"model_name_or_path": str(draft), "num_speculative_tokens": 4}}
    app_args = AppArgs(model=model, served_model_name="tiny", cores_per_slot=None, **args)
    return _run(build_app(app_args), name=APP, route_prefix=None, _blocking=False)


def replica_states():
    from ray import serve

    app = serve.status().applications.get(APP)
    if not app or "LLMReplica" not in app.deployments:
        return {}
    return {str(k): v for k, v in app.deployments["LLMReplica"].replica_states.items()}


def replica_infos(n_calls=8):
    """engine pid -> info() of the running replicas reached by n concurrent calls."""
    from ray import serve

    h = serve.get_deployment_handle("LLMReplica", app_name=APP)
    responses = [h.info.remote() for _ in range(n_calls)]
    return {r["engine_pid"]: r for r in (resp.result(timeout_s=120) for resp in responses)}


def infos_of(n):
    def pred():
        i = replica_infos()
        return i if len(i) == n and None not in i else None  # None: a replica whose engine is (re)starting
    return pred


def check_pinned(info):
    cpus = info["slot"]["cpus"]
    assert len(cpus) == 1
    proc = psutil.Process(info["engine_pid"])  # from outside: the process's real affinity
    assert proc.cpu_affinity() == cpus, info
    for t in proc.threads():
        assert os.sched_getaffinity(t.id) == set(cpus), (t, info)
    assert info["torch_threads"] == 1 and info["cpu_affinity"] == cpus


def generate(handle, n=8):
    out = handle.generate.remote("def fib(n):", {"max_new_tokens": n}).result(timeout_s=120)
    assert out["token_ids"], out
    return out


def test_replicas_pinned_third_pending_killed_slot_reclaimed(serve_two_slots, tiny_pair):
    handle = deploy(tiny_pair, num_replicas=3)
    wait_for(lambda: replica_states().get("RUNNING") == 2, 240, "2 running replicas")
    infos = wait_for(infos_of(2), 60, "both replicas to answer")
    assert sorted(i["slot"]["cpus"][0] for i in infos.values()) == [0, 1]
    for info in infos.values():
        check_pinned(info)
    # the third has no slot: pending, while the service keeps answering
    time.sleep(2)
    states = replica_states()
    assert states.get("RUNNING") == 2 and sum(states.values()) == 3, states
    generate(handle)

    victim_pid, victim = next(iter(infos.items()))
    os.kill(victim_pid, signal.SIGKILL)

    def replaced():
        i = replica_infos()
        return i if len(i) == 2 and victim_pid not in i and None not in i else None  # None: engine (re)starting

    new = wait_for(replaced, 240, "a replacement on the freed slot", interval=1)
    (new_pid,) = set(new) - set(infos)
    assert new[new_pid]["slot"]["cpus"] == victim["slot"]["cpus"]
    check_pinned(new[new_pid])
    generate(handle)


def test_autoscaling_to_slot_bound_and_back(serve_two_slots, tiny_pair):
    autoscaling = {"min_replicas": 1, "max_replicas": 3, "target_ongoing_requests": 1,
                   "upscale_delay_s": 0.5, "downscale_delay_s": 2, "metrics_interval_s": 0.5,
                   "look_back_period_s": 1}
    handle = deploy(tiny_pair, autoscaling=autoscaling, max_queued_requests=32)
    wait_for(lambda: replica_states().get("RUNNING") == 1, 240, "1 running replica")
    peak = {}
    deadline = time.monotonic() + 240
    with ThreadPoolExecutor(4) as pool:  # sustained load: 4 requests in flight
        while time.monotonic() < deadline:
            list(pool.map(lambda _: generate(handle, 64), range(4)))
            peak = replica_states()
            if peak.get("RUNNING") == 2:
                break
    assert peak.get("RUNNING") == 2, peak  # the 2 slots bound it; the 3rd would be pending
    infos = wait_for(infos_of(2), 60, "both replicas to answer")
    for info in infos.values():
        check_pinned(info)
    wait_for(lambda: replica_states() == {"RUNNING": 1}, 180, "scale down to 1 replica")
