"""The ingress with two Router replicas (app argument router_replicas): the bound on
queued requests holds over both, and losing one router replica loses only the requests
it was relaying. Tiny models, a private Ray, HTTP on 127.0.0.1."""
from __future__ import annotations

import os
import signal
import threading

import httpx
import psutil
import pytest
from helpers import engine_pids, local_serve, wait_for

APP = "pair"
MAX_QUEUED = 4  # over 2 routers: each admits 1 running + 2 waiting


@pytest.fixture(scope="module")
def pair(tiny_pair):
    """(url, handle) of an app with 2 router replicas, 2 replicas and a queue bound of 4."""
    from ray import serve

    from deployments.app import build_app

    target, draft = tiny_pair
    with local_serve("pace-router-replicas-test") as port:
        model = {"model_name_or_path": target, "dtype": "float32",
                 "pard_config": {"model_name_or_path": draft, "num_speculative_tokens": 3}}
        handle = serve.run(build_app({"model": model, "num_replicas": 2, "router_replicas": 2,
                                      "max_queued_requests": MAX_QUEUED}), name=APP, route_prefix="/")
        yield f"http://127.0.0.1:{port}", handle


def router_pids() -> list[int]:
    """The app's Router replica processes (Ray names them ray::ServeReplica:<app>:Router)."""
    pids = []
    for p in psutil.Process().children(recursive=True):
        try:
            if f"ServeReplica:{APP}:Router" in " ".join(p.cmdline()) and p.status() != psutil.STATUS_ZOMBIE:
                pids.append(p.pid)
        except psutil.Error:
            pass
    return sorted(pids)


def post_in_background(url: str, n: int) -> tuple[list[threading.Thread], list]:
    """``n`` unary completions sent at once, each in a thread: (threads, [status or the exception])."""
    results: list = []

    def one():
        try:
            results.append(httpx.post(f"{url}/v1/completions", json={"prompt": "x", "max_tokens": 8}, timeout=120)
                           .status_code)
        except httpx.HTTPError as err:
            results.append(err)

    threads = [threading.Thread(target=one, daemon=True) for _ in range(n)]
    for t in threads:
        t.start()
    return threads, results


def test_two_routers_keep_the_queue_bound_and_serve_what_they_admit(pair):
    """The engines stopped (SIGSTOP), 12 requests at once: the two routers together admit
    at most 2 running + 4 waiting (each its half), refuse the rest with 503 at once, and
    the admitted ones are served once the engines go on."""
    url, handle = pair
    assert len(router_pids()) == 2
    engines = engine_pids()
    for pid in engines:
        os.kill(pid, signal.SIGSTOP)
    try:
        threads, results = post_in_background(url, 12)
        # refused at once, with the engines stopped: at least all beyond 2 running + 4 waiting
        wait_for(lambda: sum(1 for r in results if r == 503) >= 12 - 2 - MAX_QUEUED, 60, "the refusals")
        assert not any(r == 200 for r in results)
    finally:
        for pid in engines:
            os.kill(pid, signal.SIGCONT)
    for t in threads:
        t.join(120)
    admitted = results.count(200)
    assert admitted <= 2 + MAX_QUEUED and results.count(503) == 12 - admitted, results  # the others all served
    assert httpx.post(f"{url}/v1/completions", json={"prompt": "x", "max_tokens": 2}, timeout=60).status_code == 200


def test_losing_a_router_replica_loses_only_the_requests_it_relayed(pair):
    """The engines stopped, 4 requests sent one after another (Serve's proxy spreads them
    over the two routers); one router process is killed: its requests fail, every one of
    the other router's is served once the engines go on, and new requests are served
    (Serve replaces the dead router)."""
    import time

    url, handle = pair
    routers = router_pids()
    engines = engine_pids()
    for pid in engines:
        os.kill(pid, signal.SIGSTOP)
    threads, results = [], []
    try:
        for _ in range(4):
            t, r = post_in_background(url, 1)
            threads += t
            results.append(r)
            time.sleep(0.3)  # paces the sends, so that the proxy sees each router's count
        victim = routers[0]
        os.kill(victim, signal.SIGKILL)
        wait_for(lambda: any(r and r[0] != 200 for r in results), 60, "the dead router's requests to fail")
    finally:
        for pid in engines:
            os.kill(pid, signal.SIGCONT)
    for t in threads:
        t.join(120)
    statuses = [r[0] for r in results]
    served = statuses.count(200)
    assert 1 <= served <= 3 and len(statuses) == 4, statuses  # the live router's all served, the dead one's failed
    wait_for(lambda: len(router_pids()) == 2 and victim not in router_pids(), 120, "Serve's new router")
    assert httpx.post(f"{url}/v1/completions", json={"prompt": "x", "max_tokens": 2}, timeout=60).status_code == 200
