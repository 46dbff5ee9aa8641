"""Deadlines and the engine watchdog (issue 17), end to end over HTTP: a request past
request_timeout_s ends with a 504 (an SSE error event once streaming began) and its
replica serves the next one; an engine that stops progressing (SIGSTOP) fails its
request within engine_step_timeout_s, /health fails, and Serve replaces the replica."""
from __future__ import annotations

import os
import signal
import time

import psutil
import pytest

from helpers import local_serve, sse_events, wait_for

pytestmark = pytest.mark.slow

STEP_TIMEOUT_S = 2.0
REQUEST_TIMEOUT_S = 1.0
HEALTH_CHECK_PERIOD_S = 5  # LLMReplica's health_check_period_s: how late Serve may notice an exited replica


@pytest.fixture(scope="module")
def server(tiny_pair):
    import httpx
    from ray import serve

    from deployments.app import build_app

    target, draft = tiny_pair
    with local_serve("pace-watchdog-test") as port:
        common = {"model": {"model_name_or_path": target, "dtype": "float32",
                            "pard_config": {"model_name_or_path": draft, "num_speculative_tokens": 3}},
                  "num_replicas": 1}
        serve.run(build_app({**common, "engine_step_timeout_s": STEP_TIMEOUT_S, "served_model_name": "stall"}),
                  name="stall", route_prefix="/stall")
        serve.run(build_app({**common, "request_timeout_s": REQUEST_TIMEOUT_S, "served_model_name": "timed"}),
                  name="timed", route_prefix="/timed")
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120) as client:
            yield client


def _replica_info(app: str) -> dict:
    """The app's replica and its engine, asked directly (LLMReplica.info: its request slot)."""
    from ray import serve

    return serve.get_deployment_handle("LLMReplica", app).info.remote().result(timeout_s=60)


def test_request_timeout_ends_the_request_and_its_replica_serves_the_next(server):
    c = server
    before = _replica_info("timed")
    engine = before["engine_pid"]
    body = {"prompt": "x", "max_tokens": 8}
    os.kill(engine, signal.SIGSTOP)
    try:  # the engine stopped: only the deadline can end the request
        r = c.post("/timed/v1/completions", json=body)
    finally:
        os.kill(engine, signal.SIGCONT)
    assert r.status_code == 504 and r.json()["error"]["code"] == "timeout", r.text
    assert "request_timeout_s" in r.json()["error"]["message"]
    assert c.post("/timed/v1/completions", json=body).status_code == 200

    # a handle call: DeadlineExceeded (a TimeoutError) naming the argument
    from ray import serve

    from pace_core import DeadlineExceeded

    os.kill(engine, signal.SIGSTOP)
    try:
        with pytest.raises(DeadlineExceeded, match="request_timeout_s"):
            serve.get_app_handle("timed").generate.remote("x", {"max_new_tokens": 8}).result(timeout_s=30)
    finally:
        os.kill(engine, signal.SIGCONT)

    # streamed: stopped after its first chunk, it ends with a timeout error event, then [DONE]
    with c.stream("POST", "/timed/v1/completions", json={**body, "max_tokens": 480, "ignore_eos": True,
                                                          "stream": True}) as r:
        events = sse_events(r, on_first=lambda: os.kill(engine, signal.SIGSTOP))
    os.kill(engine, signal.SIGCONT)
    assert events[-1] == "[DONE]" and events[-2]["error"]["code"] == "timeout", events[-3:]
    assert c.post("/timed/v1/completions", json=body).status_code == 200
    after = _replica_info("timed")  # as of that last request's Final
    generated = after["tokens_generated"] - before["tokens_generated"]
    assert after["engine_pid"] == engine and generated < 480  # the same engine; the stream stopped early


def test_stalled_engine_fails_its_request_and_health_and_the_replica_is_replaced(server):
    c = server
    before = _replica_info("stall")
    assert c.get("/stall/health").status_code == 200
    body = {"prompt": "x", "max_tokens": 480, "ignore_eos": True, "stream": True}
    stopped = []

    def stop_engine():
        os.kill(before["engine_pid"], signal.SIGSTOP)
        stopped.append(time.monotonic())

    with c.stream("POST", "/stall/v1/completions", json=body) as r:
        events = sse_events(r, on_first=stop_engine)
    t_stop = stopped[0]
    ended = time.monotonic() - t_stop
    assert events[-1] == "[DONE]" and events[-2]["error"]["code"] == "internal_error", events[-3:]
    wait_for(lambda: c.get("/stall/health").status_code == 503, STEP_TIMEOUT_S + HEALTH_CHECK_PERIOD_S + 60,
             "/health to fail", interval=0.2)
    failed_after = time.monotonic() - t_stop
    print(f"\nstream ended {ended:.1f}s after the stop; /health failed {failed_after:.1f}s after it")
    proc = psutil.Process(before["engine_pid"]) if psutil.pid_exists(before["engine_pid"]) else None
    assert proc is None or proc.status() == psutil.STATUS_ZOMBIE  # the stopped engine was killed
    wait_for(lambda: c.get("/stall/health").status_code == 200, 120, "the replacement replica")
    r = c.post("/stall/v1/completions", json={"prompt": "x", "max_tokens": 4})
    assert r.status_code == 200, r.text
    assert _replica_info("stall")["replica_pid"] != before["replica_pid"]
