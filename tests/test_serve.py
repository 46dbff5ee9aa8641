"""Ray Serve end to end with tiny models: a real Ray, Serve on 127.0.0.1, HTTP through
httpx and the openai client, and Python handle calls."""
from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import time
from pathlib import Path

import pytest
from helpers import DROPPED, dropping_tokenizer, engine_pids, local_serve, sse_events, wait_for

from pace_core import Final, RequestError, Usage

ROOT = Path(__file__).resolve().parent.parent
API_KEY = "sk-test-key"


def deploy_config(applications: list[dict], timeout: float = 120) -> dict:
    """Deploy apps from a config, as `serve deploy` / `serve run config.yaml` do (Serve
    builds them in its controller and logs their arguments); wait until each is RUNNING
    or failed; returns {name: (status, message)}."""
    from ray import serve
    from ray.serve.context import _get_global_client
    from ray.serve.schema import ServeDeploySchema

    _get_global_client().deploy_apps(ServeDeploySchema(applications=applications))
    names = [a["name"] for a in applications]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        apps = serve.status().applications
        done = {n: (apps[n].status, apps[n].message) for n in names if n in apps
                and apps[n].status in ("RUNNING", "DEPLOY_FAILED")}
        if len(done) == len(names):
            return done
        time.sleep(0.5)
    raise AssertionError(f"apps {names} not deployed after {timeout}s: {serve.status().applications}")


@pytest.fixture(scope="module")
def server(tiny_pair, tmp_path_factory):
    """App "pace" (2 replicas, queue bound 8) at /; app "one" (1 replica, its API key in
    a file) at /one, deployed from a config as `serve deploy` does."""
    import httpx
    from ray import serve

    from deployments.app import build_app

    from pace_core.numa import NODE_ENV

    target, draft = tiny_pair
    key_file = tmp_path_factory.mktemp("secrets") / "api_key"
    key_file.write_text(API_KEY + "\n")
    # Ray started as the README's serve command starts it (NODE_ENV): Serve's proxy loads deployments.proxy
    with local_serve("pace-serve-test", env=NODE_ENV) as port:
        common = {"model": {"model_name_or_path": target, "dtype": "float32",
                            "pard_config": {"model_name_or_path": draft, "num_speculative_tokens": 3}}}
        handle = serve.run(build_app({**common, "num_replicas": 2, "max_queued_requests": 8}), name="pace",
                           route_prefix="/")
        # app "one"'s tokenizer drops one character (helpers.DROPPED), so a prompt can encode to no token
        tokenizer = dropping_tokenizer(target, tmp_path_factory.mktemp("tokenizer"))
        one = {"name": "one", "route_prefix": "/one", "import_path": "deployments.app:build_app",
               "args": {"model": {**common["model"], "tokenizer_name_or_path": tokenizer}, "num_replicas": 1,
                        "api_key_file": str(key_file), "served_model_name": "one"}}
        assert deploy_config([one]) == {"one": ("RUNNING", "")}
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120) as client:
            yield {"client": client, "handle": handle, "port": port, "url": f"http://127.0.0.1:{port}"}


@pytest.fixture(scope="module")
def engine(tiny_pair):
    from pace_core import LLMModel, PardSpecDecodeConfig

    target, draft = tiny_pair
    return LLMModel(target, dtype="float32", pard_config=PardSpecDecodeConfig(model_name_or_path=draft, num_speculative_tokens=3))


def test_models_health_metrics(server):
    c = server["client"]
    assert c.get("/health").json() == {"status": "ok"}
    models = c.get("/v1/models").json()
    assert models["object"] == "list" and models["data"][0]["id"] == "pace-demo"
    assert models["data"][0]["max_model_len"] == 512 and models["data"][0]["speculative_decoding"] == "pard"
    assert "/" not in json.dumps(models)  # no server paths
    metrics = c.get("/metrics").text
    for name in ("pace_requests_total", "pace_time_to_first_token_seconds_bucket", "pace_inter_token_latency_seconds",
                 "pace_generation_tokens_total", "pace_accepted_draft_tokens_per_step_bucket", "pace_queue_depth"):
        assert name in metrics


PROMPTS = ["def add(a, b):\n    return", "import os\n", "class Stack:\n    def push(self, item):"]


def test_completion_equals_engine_and_usage(server, engine):
    from pace_core import SamplingConfig

    for prompt in PROMPTS:
        r = server["client"].post("/v1/completions", json={"model": "pace-demo", "prompt": prompt, "max_tokens": 20})
        assert r.status_code == 200, r.text
        body = r.json()
        ref = engine.generate(prompt, SamplingConfig(max_new_tokens=20))
        choice = body["choices"][0]
        assert choice["text"] == ref.text and choice["finish_reason"] == ref.finish_reason
        cached = body["usage"]["prompt_tokens_details"]["cached_tokens"]  # what it shares with its replica's last one
        assert body["usage"] == {"prompt_tokens": len(ref.prompt_token_ids), "completion_tokens": len(ref.token_ids),
                                 "total_tokens": len(ref.prompt_token_ids) + len(ref.token_ids),
                                 "prompt_tokens_details": {"cached_tokens": cached}}
        assert 0 <= cached < len(ref.prompt_token_ids)
        assert body["object"] == "text_completion" and body["id"].startswith("cmpl-")


def test_stream_concatenation_equals_unary(server):
    c = server["client"]
    for prompt in PROMPTS:
        body = {"prompt": prompt, "max_tokens": 24, "stop": ["\n\n"]}
        unary = c.post("/v1/completions", json=body).json()
        with c.stream("POST", "/v1/completions", json={**body, "stream": True,
                                                       "stream_options": {"include_usage": True}}) as r:
            assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
            events = sse_events(r)
        assert events[-1] == "[DONE]"
        chunks = [e for e in events[:-1] if e["choices"]]
        assert "".join(e["choices"][0]["text"] for e in chunks) == unary["choices"][0]["text"]
        assert chunks[-1]["choices"][0]["finish_reason"] == unary["choices"][0]["finish_reason"]
        assert events[-2]["usage"] == unary["usage"]


def test_chat_unary_and_stream_equal_engine_chat(server, engine):
    from pace_core import SamplingConfig

    c = server["client"]
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "write a loop"}]
    ref = engine.chat(messages, SamplingConfig(max_new_tokens=16))
    r = c.post("/v1/chat/completions", json={"model": "pace-demo", "messages": messages, "max_tokens": 16})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "chat.completion"
    assert body["choices"][0]["message"] == {"role": "assistant", "content": ref.text}
    assert body["usage"]["completion_tokens"] == len(ref.token_ids)
    with c.stream("POST", "/v1/chat/completions", json={"messages": messages, "max_tokens": 16, "stream": True}) as r:
        events = sse_events(r)
    assert events[0]["choices"][0]["delta"]["role"] == "assistant"
    assert "".join(e["choices"][0]["delta"].get("content", "") for e in events[:-1]) == ref.text
    assert events[-2]["choices"][0]["finish_reason"] == ref.finish_reason and events[-1] == "[DONE]"


def test_concurrent_requests_all_equal_their_reference(server):
    import httpx

    prompts = [f"def f{i}(x):\n    return x +" for i in range(8)]
    refs = {p: server["client"].post("/v1/completions", json={"prompt": p, "max_tokens": 30}).json()["choices"][0]["text"]
            for p in prompts}

    async def run():
        async with httpx.AsyncClient(base_url=server["url"], timeout=120) as ac:
            return await asyncio.gather(*(ac.post("/v1/completions", json={"prompt": p, "max_tokens": 30}) for p in prompts))

    responses = asyncio.run(run())
    assert [r.status_code for r in responses] == [200] * 8
    assert [r.json()["choices"][0]["text"] for r in responses] == [refs[p] for p in prompts]


def test_overflow_gets_503_quickly(server):
    """With the engines stopped (SIGSTOP), 14 requests at once on 2 replicas with a queue
    of 8: 2 run, 8 wait in Serve's queue, 4 are refused at once with 503 + Retry-After;
    once the engines go on, the 10 admitted finish. (Stopping the engines makes the
    burst overflow whatever the machine's speed: the tiny pair finishes a request in
    well under the time a burst takes to arrive.)"""
    import signal

    import httpx

    body = {"prompt": "x", "max_tokens": 20, "ignore_eos": True}
    engines = engine_pids()

    async def run():
        async with httpx.AsyncClient(base_url=server["url"], timeout=120) as ac:
            async def one():
                t0 = time.perf_counter()
                r = await ac.post("/v1/completions", json=body)
                return r, time.perf_counter() - t0

            for pid in engines:
                os.kill(pid, signal.SIGSTOP)
            try:
                tasks = [asyncio.create_task(one()) for _ in range(14)]
                deadline = time.monotonic() + 20
                while sum(t.done() for t in tasks) < 4 and time.monotonic() < deadline:
                    await asyncio.sleep(0.05)
                assert not any(t.done() and t.result()[0].status_code == 200 for t in tasks)
            finally:
                for pid in engines:
                    os.kill(pid, signal.SIGCONT)
            return await asyncio.gather(*tasks)

    results = asyncio.run(run())
    statuses = [r.status_code for r, _ in results]
    assert statuses.count(200) == 10 and statuses.count(503) == 4, statuses
    for r, _ in results:  # the 4 refusals were answered while the engines were stopped: at once
        if r.status_code == 503:
            assert r.json()["error"]["code"] == "overloaded" and "retry" in r.json()["error"]["message"]
            assert r.headers.get("retry-after") == "1"
    assert server["client"].post("/v1/completions", json={"prompt": "x", "max_tokens": 2}).status_code == 200


def _bare_router(max_queued_requests: int, routers: int = 1):
    """A Router's admission without Ray (Router._admit and what it calls), Serve's counts
    played by the returned ``counts`` (running replicas; None: Serve does not answer)."""
    from types import MethodType, SimpleNamespace

    from deployments.metrics import Metrics
    from deployments.router import Router

    router = SimpleNamespace(args=SimpleNamespace(max_queued_requests=max_queued_requests), metrics=Metrics("m"),
                             _capacity_checked_at=-1e9, _capacity_check=None, routers=routers)
    router.metrics.running_capacity = 0
    for name in ("_admit", "_count_replicas", "_waiting", "_bound"):
        setattr(router, name, MethodType(getattr(Router.func_or_class, name), router))
    counts = {"running": 2, "asked": []}

    def replicas_problem():
        counts["asked"].append(counts["running"])
        if counts["running"] is None:
            raise RuntimeError("controller gone")
        router.metrics.running_capacity = counts["running"]
        router._capacity_checked_at = time.monotonic()

    router._replicas_problem = replicas_problem
    return router, counts


def test_admission_bounds_a_burst_and_counts_replicas_before_refusing():
    """Router._admit without Ray: with 2 running replicas and a bound of 3, a burst of 6
    admits 5 and refuses the 6th (Overloaded); the replica count is asked in the
    background, and again before a refusal once the last count is stale, so replicas
    added meanwhile (autoscaling) take the request; a failed count leaves the last one
    standing. With 2 router replicas each admits against half the replicas and half the
    bound: together never more than the bound."""
    from pace_core import Overloaded

    router, counts = _bare_router(3)

    async def burst(n):
        return await asyncio.gather(*(router._admit() for _ in range(n)), return_exceptions=True)

    results = asyncio.run(burst(6))
    assert results[:5] == [None] * 5 and isinstance(results[5], Overloaded)
    assert router.metrics.in_flight == 5 and counts["asked"] == [2]
    counts["running"] = 3  # autoscaling added a replica: the next request is admitted on a fresh count
    router._capacity_checked_at = -1e9  # the last count is stale
    assert asyncio.run(burst(1)) == [None] and router.metrics.in_flight == 6 and counts["asked"] == [2, 3]
    counts["running"] = None  # Serve does not answer: refused by the last count, not an error
    router._capacity_checked_at = -1e9
    assert isinstance(asyncio.run(burst(1))[0], Overloaded) and router.metrics.in_flight == 6

    admitted = 0
    for _ in range(2):  # two routers, 2 replicas, a bound of 3: 1 running + 1.5 waiting each
        router, counts = _bare_router(3, routers=2)
        admitted += sum(r is None for r in asyncio.run(burst(6)))
    assert admitted == 4 <= 2 + 3


def _in_flight(client, prefix: str = "") -> float:
    line = next(x for x in client.get(f"{prefix}/metrics").text.splitlines() if x.startswith("pace_requests_in_flight{"))
    return float(line.split()[-1])


PROBE_TOKENS = 60


_probes_sent = [0]


def _tokens_generated(handle, replicas: int = 2) -> int:
    """All tokens the app's engines generated so far, less those of these probes: a
    PROBE_TOKENS request on each replica at once (new sessions spread over the free ones;
    each long enough to keep its replica while the other is routed), each reporting its
    engine's count in its Final (itself included); a replica no probe reached (another
    request held it, or its engine was restarting after an earlier test) gets another
    probe, for up to a minute."""
    engines: dict[int, int] = {}
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        outs = [handle.generate.remote("x", {"max_new_tokens": PROBE_TOKENS, "ignore_eos": True},
                                       session_id=f"probe-{_probes_sent[0] + i}-{time.time()}")
                for i in range(replicas - len(engines))]
        _probes_sent[0] += len(outs)
        for out in (r.result(timeout_s=60) for r in outs):
            pid = out["engine"]["engine_pid"]
            engines[pid] = max(engines.get(pid, 0), out["engine"]["tokens_generated"])
        if len(engines) == replicas:
            return sum(engines.values()) - PROBE_TOKENS * _probes_sent[0]
        time.sleep(0.5)
    raise AssertionError(f"probes reached only {engines}")


def test_multi_prompt_request_refused_mid_way_stops_all_its_generations(server):
    """Eight prompts of 500 tokens each (seconds of work for the 2 replicas), the first
    refused by its engine (prompt + 500 tokens beyond the 512-token context): the
    request is a 400, the generations of the other prompts (running or queued) stop at
    once, so the next requests find both replicas free and their engines report a few
    tokens generated for the 7 cut short, not thousands."""
    c, handle = server["client"], server["handle"]
    before = _tokens_generated(handle)
    body = {"prompt": [[5] * 200] + [[6 + i] for i in range(7)], "max_tokens": 500, "ignore_eos": True}
    r = c.post("/v1/completions", json=body)
    assert r.status_code == 400 and "context" in r.json()["error"]["message"], r.text
    wait_for(lambda: _in_flight(c) == 0, 30, "the request's generations to end")
    generated = _tokens_generated(handle) - before
    assert 0 <= generated < 300, generated  # unstopped, the seven would generate up to 3500
    assert c.post("/v1/completions", json={"prompt": "x", "max_tokens": 2}).status_code == 200


def test_multi_prompt_requests_are_capped_and_admitted_whole(server):
    """More prompts than max_prompts_per_request (8) is a 400 naming the argument; with
    the engines stopped (SIGSTOP) under 4 requests (2 on the replicas, 2 in Serve's queue
    of 8), a request of 8 prompts does not fit the queue: it is refused as a whole (503:
    the prompts Serve queued are withdrawn), at once."""
    import signal

    import httpx

    c = server["client"]
    r = c.post("/v1/completions", json={"prompt": ["x"] * 9, "max_tokens": 2})
    assert r.status_code == 400 and "max_prompts_per_request" in r.json()["error"]["message"]
    engines = engine_pids()

    async def run():
        async with httpx.AsyncClient(base_url=server["url"], timeout=120) as ac:
            for pid in engines:
                os.kill(pid, signal.SIGSTOP)
            try:
                busy = [asyncio.create_task(ac.post("/v1/completions", json={"prompt": "x", "max_tokens": 8}))
                        for _ in range(4)]
                while _in_flight(c) < 4:
                    await asyncio.sleep(0.05)
                # answered while the engines are stopped: refused at once, nothing of it queued
                refused = await ac.post("/v1/completions", json={"prompt": ["y"] * 8, "max_tokens": 8})
                assert _in_flight(c) == 4
            finally:
                for pid in engines:
                    os.kill(pid, signal.SIGCONT)
            return refused, await asyncio.gather(*busy)

    refused, busy = asyncio.run(run())
    assert refused.status_code == 503 and refused.json()["error"]["code"] == "overloaded", refused.text
    assert [b.status_code for b in busy] == [200] * 4
    ok = c.post("/v1/completions", json={"prompt": ["x", "y"], "max_tokens": 3})
    assert ok.status_code == 200 and len(ok.json()["choices"]) == 2


BAD_BODIES = [
    ({"prompt": "x", "max_tokens": 0}, "max_tokens"),
    ({"prompt": "x", "max_tokens": "ten"}, "max_tokens"),
    ({"prompt": "x", "max_tokens": 100000}, "context length"),
    ({"prompt": ""}, "prompt must not be empty"),
    ({"prompt": []}, "prompt"),
    ({}, "prompt"),
    ({"prompt": 5}, "prompt"),
    ({"prompt": "x", "model": "gpt-4"}, "not served here"),
    ({"prompt": "x", "temperature": -1}, "temperature"),
    ({"prompt": "x", "temperature": 2.5}, "temperature"),
    ({"prompt": "x", "top_p": 0}, "top_p"),
    ({"prompt": "x", "min_p": 1.5}, "min_p"),
    ({"prompt": "x", "repetition_penalty": 0}, "repetition_penalty"),
    ({"prompt": "x", "presence_penalty": 2.5}, "presence_penalty"),
    ({"prompt": "x", "frequency_penalty": -3}, "frequency_penalty"),
    ({"prompt": "x", "logit_bias": {"5": 101}}, "logit_bias"),
    ({"prompt": "x", "logit_bias": {"x": 1}}, "logit_bias"),
    ({"prompt": "x", "logit_bias": {"100000000": 1}}, "outside the vocabulary"),
    ({"prompt": "x", "min_tokens": 9, "max_tokens": 4}, "min_tokens (9) must be <= max_tokens (4)"),
    ({"prompt": "x", "stop": list("abcde")}, "at most 4 stop strings"),
    ({"prompt": "x", "seed": 2 ** 70}, "seed"),
    ({"prompt": "x", "stop": [""]}, "stop"),
    ({"prompt": "x", "n": 2}, "n > 1"),
    ({"prompt": "x", "logprobs": 6}, "logprobs"),
    ({"prompt": "x", "logprobs": True}, "logprobs"),
    ({"prompt": "x", "echo": True}, "echo"),
    ({"prompt": "x", "stream": "yes"}, "stream"),
    ({"prompt": [10 ** 7]}, "outside the vocabulary"),
    ({"prompt": ["a", "b"], "stream": True}, "one prompt"),
]


@pytest.mark.parametrize("body,needle", BAD_BODIES)
def test_bad_completion_bodies(server, body, needle):
    r = server["client"].post("/v1/completions", json=body)
    assert r.status_code == 400, (body, r.text)
    err = r.json()["error"]
    assert needle in err["message"] or needle == err.get("param"), err
    assert err["type"] == "invalid_request_error"


@pytest.mark.parametrize("body,needle", [
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "wizard", "content": "x"}]}, "role"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]}, "text content"),
    ({"messages": "hello"}, "messages"),
    ({"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}, "top_logprobs needs logprobs: true"),
    ({"messages": [{"role": "user", "content": "x"}], "logprobs": True, "top_logprobs": 6}, "top_logprobs"),
])
def test_bad_chat_bodies(server, body, needle):
    r = server["client"].post("/v1/chat/completions", json=body)
    assert r.status_code == 400 and needle in r.json()["error"]["message"], r.text


def test_not_json_and_server_still_answers(server):
    c = server["client"]
    r = c.post("/v1/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]
    assert c.post("/v1/completions", json={"prompt": "x", "max_tokens": 3}).status_code == 200
    assert 'status="400"' in c.get("/metrics").text


def test_api_key(server):
    c = server["client"]
    body = {"prompt": "x", "max_tokens": 2}
    for auth in (None, b"Bearer wrong", b"Bearer \xff" + API_KEY.encode(), API_KEY.encode()):
        r = c.post("/one/v1/completions", json=body, headers={"Authorization": auth} if auth else {})
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer", r.text
        assert r.json()["error"]["code"] == "invalid_api_key"
    r = c.post("/one/v1/completions", json=body, headers={"Authorization": f"Bearer {API_KEY}"})
    assert r.status_code == 200 and r.json()["model"] == "one"
    assert c.post("/v1/completions", json=body).status_code == 200  # the other app has no key


def test_a_prompt_of_zero_tokens_is_a_400_on_every_route_and_an_error_in_handle_calls(server):
    """App "one"'s tokenizer drops DROPPED: a prompt of only that encodes to no token and is
    refused before any work with a message naming the cause, unary, streamed, in a list
    of prompts and through handle calls; the server goes on serving."""
    from ray import serve

    c = server["client"]
    headers = {"Authorization": f"Bearer {API_KEY}"}
    for body in ({"prompt": DROPPED * 2}, {"prompt": DROPPED, "stream": True}, {"prompt": ["x", DROPPED]}):
        r = c.post("/one/v1/completions", json={**body, "max_tokens": 4}, headers=headers)
        assert r.status_code == 400, r.text
        err = r.json()["error"]
        assert "encodes to zero tokens" in err["message"] and err["type"] == "invalid_request_error", err
    one = serve.get_app_handle("one")
    with pytest.raises(Exception, match="encodes to zero tokens"):
        one.generate.remote(DROPPED).result(timeout_s=60)
    with pytest.raises(Exception, match="encodes to zero tokens"):
        list(one.options(stream=True).generate_stream.remote(DROPPED))
    r = c.post("/one/v1/chat/completions", json={"messages": [{"role": "user", "content": DROPPED}], "max_tokens": 2},
               headers=headers)
    assert r.status_code == 200  # the chat template's own tokens remain
    assert c.post("/one/v1/completions", json={"prompt": "x" + DROPPED, "max_tokens": 2},
                  headers=headers).status_code == 200


def test_api_key_never_reaches_logs_or_app_details(server):
    """The key of app "one" (from api_key_file, deployed from a config) works, and no
    file of this Ray session's logs, nor Serve's stored app details, holds it."""
    import ray
    from ray.serve.context import _get_global_client

    c = server["client"]
    headers = {"Authorization": f"Bearer {API_KEY}"}
    assert c.post("/one/v1/completions", json={"prompt": "x", "max_tokens": 2}, headers=headers).status_code == 200
    assert c.post("/one/v1/completions", json={"prompt": "x", "max_tokens": 2}).status_code == 401
    logs = Path(ray._private.worker._global_node.get_logs_dir_path())
    files = [p for p in logs.rglob("*") if p.is_file()]
    assert any("Importing application 'one' with arguments" in p.read_text(errors="replace")
               for p in files if p.suffix == ".log")  # Serve did log the arguments
    assert not [p for p in files if API_KEY.encode() in p.read_bytes()]
    details = json.dumps(_get_global_client().get_serve_details())
    assert "api_key_file" in details and API_KEY not in details


def test_literal_api_key_is_refused_without_repeating_it(tiny_pair, tmp_path, monkeypatch):
    """A key in the app arguments fails the build as Serve runs it, with a message naming
    the environment variable and the file argument, and never quoting the key."""
    from ray.serve._private.api import call_user_app_builder_with_args_if_necessary

    from deployments.app import build_app
    from deployments.args import AppArgs

    target, draft = tiny_pair
    model = {"model_name_or_path": target, "pard_config": {"model_name_or_path": draft}}
    secret = "sk-literal-secret-123"
    with pytest.raises(ValueError) as err:
        call_user_app_builder_with_args_if_necessary(build_app, {"model": model, "api_key": secret})
    assert "PACE_API_KEY" in str(err.value) and "api_key_file" in str(err.value) and secret not in str(err.value)
    with pytest.raises(ValueError) as err:  # a bad value elsewhere does not print the arguments either
        AppArgs(model={"model_name_or_path": target}, api_key_file=secret)
    assert "absolute path" in str(err.value) and secret not in str(err.value)
    missing = tmp_path / "no-key"
    with pytest.raises(ValueError, match="api_key_file .*no-key: cannot read it"):
        build_app({"model": model, "api_key_file": str(missing)})
    key_file = tmp_path / "key"
    key_file.write_text(f"{secret}\n")
    monkeypatch.setenv("PACE_API_KEY", "from-env")
    assert AppArgs(api_key_file=str(key_file)).resolved_api_key() == secret  # the file wins
    assert AppArgs().resolved_api_key() == "from-env"


def _engine_facts(app: str = "one") -> dict:
    """The engine facts a 2-token request's Final reports (its own tokens included)."""
    from ray import serve

    out = serve.get_app_handle(app).generate.remote("x", {"max_new_tokens": 2, "ignore_eos": True}).result(timeout_s=60)
    assert out["usage"]["completion_tokens"] == 2
    return out["engine"]


def test_client_disconnect_stops_generation_within_a_step(server):
    """The 1-replica app: a 480-token stream is closed after two chunks; the replica must
    stop right there (it generated only a few of the 480 tokens) and be free."""
    c = server["client"]
    before = _engine_facts()
    headers = {"Authorization": f"Bearer {API_KEY}"}
    body = {"prompt": "x", "max_tokens": 480, "ignore_eos": True, "stream": True}
    with c.stream("POST", "/one/v1/completions", json=body, headers=headers) as r:
        got = 0
        for line in r.iter_lines():
            if line.startswith("data: {"):
                got += 1
                if got == 2:
                    break
    after = _engine_facts()
    assert after["engine_pid"] == before["engine_pid"] and after["forward"] in ("lean-native", "lean-python")
    cancelled = after["tokens_generated"] - before["tokens_generated"] - 2
    # stopped well before its 480 tokens (the tiny model decodes ~1000 tokens/s, so the
    # disconnect's trip from the proxy to the engine is worth tens of tokens, more on a
    # loaded host: the bound says "cancelled", not how fast)
    assert 2 <= cancelled < 360, cancelled


def test_unary_client_disconnect_stops_its_generation(server):
    """The 1-replica app, its engine stopped (SIGSTOP): a unary 480-token request whose
    client gives up is cancelled all the way to the engine, which (resumed once the
    router has let the request go) stops within a step or two instead of generating the
    480 tokens."""
    import signal

    import httpx

    c = server["client"]
    headers = {"Authorization": f"Bearer {API_KEY}"}
    before = _engine_facts()
    engine = before["engine_pid"]
    os.kill(engine, signal.SIGSTOP)
    try:
        with pytest.raises(httpx.ReadTimeout):
            c.post("/one/v1/completions", json={"prompt": "x", "max_tokens": 480, "ignore_eos": True},
                   headers=headers, timeout=0.5)
        wait_for(lambda: _in_flight(c, "/one") == 0, 30, "the router to let the request go")
    finally:
        os.kill(engine, signal.SIGCONT)
    after = _engine_facts()
    assert after["engine_pid"] == engine
    cancelled = after["tokens_generated"] - before["tokens_generated"] - 2
    assert 0 <= cancelled < 20, cancelled  # its first step or so, not 480 tokens


def test_replicas_run_serve_on_one_loop_and_the_engine_at_normal_priority(server):
    """build_app sets Serve's one-event-loop flags on both deployments' processes
    (deployments.REPLICA_ENV); the engine leaves Ray's worker niceness when it may, and
    pauses after a first chunk as the app argument first_chunk_pause_ms says (default 8)."""
    from deployments import REPLICA_ENV

    facts = _engine_facts()
    environ = dict(line.split("=", 1) for line in
                   Path(f"/proc/{facts['replica_pid']}/environ").read_text().split("\0") if "=" in line)
    assert {k: environ.get(k) for k in REPLICA_ENV} == REPLICA_ENV
    engine_nice = os.getpriority(os.PRIO_PROCESS, facts["engine_pid"])
    replica_nice = os.getpriority(os.PRIO_PROCESS, facts["replica_pid"])
    if facts["priority"].endswith("-> 0"):
        assert engine_nice == 0 and facts["priority"] == f"niceness {replica_nice} -> 0"
    else:
        assert facts["priority"] == f"niceness {engine_nice}" == f"niceness {replica_nice}"
    assert facts["first_chunk_pause_ms"] == 8


def test_handle_calls(server, engine):
    from ray import serve

    from pace_core import SamplingConfig

    handle = serve.get_app_handle("pace")
    out = handle.generate.remote("def add(a, b):\n    return", SamplingConfig(max_new_tokens=12)).result(timeout_s=60)
    ref = engine.generate("def add(a, b):\n    return", SamplingConfig(max_new_tokens=12))
    assert out["type"] == "completion" and out["text"] == ref.text and out["token_ids"] == ref.token_ids
    assert out["stats"]["steps"] == ref.stats.steps and out["finish_reason"] == ref.finish_reason
    assert out["usage"]["prompt_tokens"] == len(ref.prompt_token_ids) and out["usage"]["completion_tokens"] == 12
    *deltas, final = handle.options(stream=True).generate_stream.remote("def add(a, b):\n    return",
                                                                       {"max_new_tokens": 12})
    assert {d["type"] for d in deltas} == {"delta"} and final["type"] == "final"  # the engine's events, as dicts
    assert "".join(d["text"] for d in deltas) == ref.text and "stats" not in deltas[-1]
    assert final["finish_reason"] == ref.finish_reason and final["stats"]["steps"] == ref.stats.steps
    chat = handle.chat.remote([{"role": "user", "content": "hi"}], {"max_new_tokens": 5}).result(timeout_s=60)
    assert chat["token_ids"] == engine.chat([{"role": "user", "content": "hi"}], SamplingConfig(max_new_tokens=5)).token_ids
    # failures are typed: the client's mistake a RequestError (a ValueError), the queue full Overloaded, ...
    with pytest.raises(RequestError, match="max_new_tokens"):
        handle.generate.remote("x", {"max_new_tokens": 0}).result(timeout_s=60)
    with pytest.raises(RequestError, match="context length"):
        list(handle.options(stream=True).generate_stream.remote("x", {"max_new_tokens": 10 ** 6}))


def test_openai_client(server, engine):
    import openai

    from pace_core import SamplingConfig

    client = openai.OpenAI(base_url=server["url"] + "/v1", api_key="unused")
    ref = engine.generate("import os\n", SamplingConfig(max_new_tokens=10))
    out = client.completions.create(model="pace-demo", prompt="import os\n", max_tokens=10, temperature=0)
    assert out.choices[0].text == ref.text and out.usage.completion_tokens == len(ref.token_ids)
    stream = client.chat.completions.create(model="pace-demo", messages=[{"role": "user", "content": "hi"}],
                                            max_tokens=8, stream=True)
    text = "".join(ch.choices[0].delta.content or "" for ch in stream if ch.choices)
    assert text == engine.chat([{"role": "user", "content": "hi"}], SamplingConfig(max_new_tokens=8)).text
    # every sampling field (vLLM's extensions in extra_body), logprobs in the client's types
    ref = engine.generate("import os\n", SamplingConfig(max_new_tokens=12, logprobs=2, **SAMPLED))
    out = client.completions.create(
        model="pace-demo", prompt="import os\n", max_tokens=12, logprobs=2, temperature=0.8, top_p=0.95, seed=11,
        presence_penalty=0.3, frequency_penalty=0.2, logit_bias={"7": 2.0},
        extra_body={"top_k": 40, "min_p": 0.02, "repetition_penalty": 1.1, "min_tokens": 3})
    assert out.choices[0].text == ref.text and out.choices[0].logprobs.tokens == [e["token"] for e in ref.logprobs]
    messages = [{"role": "user", "content": "write a loop"}]
    ref = engine.chat(messages, SamplingConfig(max_new_tokens=12, logprobs=2, **SAMPLED))
    out = client.chat.completions.create(
        model="pace-demo", messages=messages, max_tokens=12, logprobs=True, top_logprobs=2, temperature=0.8,
        top_p=0.95, seed=11, presence_penalty=0.3, frequency_penalty=0.2, logit_bias={"7": 2.0},
        extra_body={"top_k": 40, "min_p": 0.02, "repetition_penalty": 1.1, "min_tokens": 3})
    assert out.choices[0].message.content == ref.text
    assert [c.logprob for c in out.choices[0].logprobs.content] == pytest.approx([e["logprob"] for e in ref.logprobs])


# the same settings as SamplingConfig fields and as OpenAI request fields
SAMPLED = dict(temperature=0.8, top_p=0.95, top_k=40, min_p=0.02, repetition_penalty=1.1, presence_penalty=0.3,
               frequency_penalty=0.2, logit_bias={7: 2.0}, seed=11, min_new_tokens=3)
SAMPLED_HTTP = {**{k: v for k, v in SAMPLED.items() if k not in ("min_new_tokens", "logit_bias")},
                "min_tokens": 3, "logit_bias": {"7": 2.0}}


def _streamed_logprobs(events: list, chat: bool) -> list:
    out = []
    for e in events[:-1]:
        lp = e["choices"][0]["logprobs"] if e.get("choices") else None
        if lp:
            out += lp["content"] if chat else [dict(zip(lp, v)) for v in zip(*lp.values())]
    return out


def test_sampling_and_logprobs_on_both_routes_equal_the_engine(server, engine):
    """With a seed, sampling (PARD speculative sampling, every processor) gives the
    engine's own tokens on both routes, unary and streamed, every time; logprobs come
    in OpenAI's shapes with the engine's values."""
    from pace_core import SamplingConfig

    c = server["client"]
    prompt = PROMPTS[0]
    ref = engine.generate(prompt, SamplingConfig(max_new_tokens=16, logprobs=2, **SAMPLED))
    body = {"prompt": prompt, "max_tokens": 16, "logprobs": 2, **SAMPLED_HTTP}
    choice = c.post("/v1/completions", json=body).json()["choices"][0]
    assert choice["text"] == ref.text
    assert c.post("/v1/completions", json=body).json()["choices"][0]["text"] == ref.text  # a seed: every time
    lp = choice["logprobs"]
    assert set(lp) == {"tokens", "token_logprobs", "top_logprobs", "text_offset"}
    assert lp["tokens"] == [e["token"] for e in ref.logprobs]
    assert lp["token_logprobs"] == pytest.approx([e["logprob"] for e in ref.logprobs])
    assert lp["top_logprobs"] == [{a["token"]: pytest.approx(a["logprob"]) for a in e["top_logprobs"]}
                                  for e in ref.logprobs]
    assert lp["text_offset"][0] == 0 and lp["text_offset"] == sorted(lp["text_offset"])
    with c.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
        events = sse_events(r)
    assert "".join(e["choices"][0]["text"] for e in events[:-1]) == ref.text
    streamed = _streamed_logprobs(events, chat=False)
    assert [e["tokens"] for e in streamed] == lp["tokens"] and [e["text_offset"] for e in streamed] == lp["text_offset"]

    messages = [{"role": "user", "content": "write a loop"}]
    ref = engine.chat(messages, SamplingConfig(max_new_tokens=16, logprobs=2, **SAMPLED))
    body = {"messages": messages, "max_tokens": 16, "logprobs": True, "top_logprobs": 2, **SAMPLED_HTTP}
    choice = c.post("/v1/chat/completions", json=body).json()["choices"][0]
    assert choice["message"]["content"] == ref.text
    content = choice["logprobs"]["content"]
    assert [x["token"] for x in content] == [e["token"] for e in ref.logprobs]
    assert [x["logprob"] for x in content] == pytest.approx([e["logprob"] for e in ref.logprobs])
    for x in content:
        assert x["bytes"] == list(x["token"].encode()) and len(x["top_logprobs"]) == 2
        assert set(x["top_logprobs"][0]) == {"token", "logprob", "bytes"}
    with c.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as r:
        events = sse_events(r)
    assert "".join(e["choices"][0]["delta"].get("content", "") for e in events[:-1]) == ref.text
    assert _streamed_logprobs(events, chat=True) == content
    plain = c.post("/v1/chat/completions", json={"messages": messages, "max_tokens": 4}).json()["choices"][0]
    assert plain["logprobs"] is None
    no_top = c.post("/v1/chat/completions", json={**body, "top_logprobs": None}).json()["choices"][0]
    assert all(x["top_logprobs"] == [] for x in no_top["logprobs"]["content"])


def test_sampling_through_handle_calls_with_amd_pace_names(server, engine):
    from ray import serve

    from pace_core import SamplingConfig

    handle = serve.get_app_handle("pace")
    pace = {"max_new_tokens": 12, "do_sample": True, "temperature": 0.7, "sampling_seed": 5, "min_new_tokens": 2,
            "repetition_penalty": 1.2, "stop_strings": ["\n\n"], "return_logprobs": True}
    ref = engine.generate(PROMPTS[1], SamplingConfig(**pace))
    out = handle.generate.remote(PROMPTS[1], pace).result(timeout_s=60)
    assert out["token_ids"] == ref.token_ids and [e["logprob"] for e in out["logprobs"]] == pytest.approx(
        [e["logprob"] for e in ref.logprobs])
    out = handle.generate.remote(PROMPTS[1], SamplingConfig(**pace)).result(timeout_s=60)
    assert out["token_ids"] == ref.token_ids
    *deltas, _ = handle.options(stream=True).generate_stream.remote(PROMPTS[1], pace)
    assert [t for d in deltas for t in d["token_ids"]] == ref.token_ids
    assert [e["token_id"] for d in deltas for e in d["logprobs"]] == ref.token_ids
    with pytest.raises(Exception, match="contradicts"):
        handle.generate.remote("x", {"do_sample": False, "temperature": 0.7}).result(timeout_s=60)


# ----------------------------------------------------------------------------- deploy-time validation
@pytest.mark.parametrize("args,needle", [
    ({"model.pard_config.num_speculative_tokens": 40}, "num_speculative_tokens must be in 1..32"),
    ({"model.model_name_or_path": "/no/such/model"}, r"model\.model_name_or_path: model path '/no/such/model'"),
    ({"model.pard_config.model_name_or_path": "/no/such/draft"}, r"model\.pard_config\.model_name_or_path: "),
    ({"model.tokenizer_name_or_path": "/no/such/tokenizer"}, r"model\.tokenizer_name_or_path: "),
    ({"num_replicas": 0}, "num_replicas"),
    ({"model.dtype": "int4"}, "dtype"),
    ({"model": {"model_name_or_path": "m", "speculative": 1}}, "speculative"),  # the engine's config forbids extras
    ({"autoscaling": {"min_replicas": 3, "max_replicas": 2}}, "min_replicas"),
    ({"unknown_option": 1}, "unknown_option"),
    # the engine's fields that were flat arguments name their new place
    ({"target": "/x"}, r"target moved: use model\.model_name_or_path"),
    ({"draft": None}, r"draft moved: use model\.pard_config\.model_name_or_path \(model\.pard_config: null"),
    ({"num_speculative_tokens": 8}, r"num_speculative_tokens moved: use model\.pard_config\.num_speculative_tokens"),
    ({"dtype": "float32"}, r"dtype moved: use model\.dtype"),
    ({"prefix_cache_gb": 0}, r"prefix_cache_gb moved: use model\.prefix_cache_gb"),
])
def test_bad_app_args_fail_at_build_time(tiny_pair, args, needle):
    from deployments.app import build_app

    target, draft = tiny_pair
    with pytest.raises(ValueError, match=needle):
        build_app({"model": {"model_name_or_path": target, "pard_config": {"model_name_or_path": draft}}, **args})


def test_old_flat_app_args_fail_as_serve_builds_them(tiny_pair):
    """A config of the old flat form fails as Serve builds the app, with each moved key's
    new place, not a generic extra-field error."""
    from ray.serve._private.api import call_user_app_builder_with_args_if_necessary

    from deployments.app import build_app

    target, draft = tiny_pair
    with pytest.raises(ValueError) as err:
        call_user_app_builder_with_args_if_necessary(build_app, {"target": target, "draft": draft,
                                                                 "num_speculative_tokens": 8, "served_model_name": "x"})
    message = str(err.value)
    assert "target moved: use model.model_name_or_path" in message
    assert "draft moved: use model.pard_config.model_name_or_path" in message
    assert "num_speculative_tokens moved: use model.pard_config.num_speculative_tokens" in message
    assert "extra" not in message.lower()


def test_app_args_carry_the_engines_own_config(tiny_pair):
    """One declaration: ``model`` is the engine's ModelConfig (its defaults, K's among
    them, are PardSpecDecodeConfig's), dotted keys set its fields, and the replicas get
    the validated AppArgs whose ``model`` is the object their engine builds from (paths
    resolved)."""
    from deployments.app import build_app
    from deployments.args import AppArgs
    from pace_core.configs import ModelConfig, PardSpecDecodeConfig

    target, draft = tiny_pair
    default = AppArgs()
    assert isinstance(default.model, ModelConfig) and default.model.model_name_or_path == "models/demo-target"
    assert default.model.pard_config.num_speculative_tokens == PardSpecDecodeConfig.model_fields[
        "num_speculative_tokens"].default
    dotted = AppArgs(**{"model.dtype": "float32", "model.pard_config.num_speculative_tokens": "4"})
    assert dotted.model.dtype == "float32" and dotted.model.pard_config.num_speculative_tokens == 4
    assert dotted.model.pard_config.model_name_or_path == "models/demo-draft"  # over the default model
    assert AppArgs(**{"model.pard_config": "null"}).model.pard_config is None  # as `serve run` passes it
    assert AppArgs(**default.model_dump()) == default  # the router's copy

    rel = os.path.relpath(target)  # resolved to an absolute path at build time
    app = build_app({"model": {"model_name_or_path": rel, "dtype": "float32",
                               "pard_config": {"model_name_or_path": draft, "num_speculative_tokens": 5}},
                     "slot_resource": "never"})
    (replica_args,) = app._bound_deployment.init_args[0]._bound_deployment.init_args
    assert isinstance(replica_args, AppArgs) and isinstance(replica_args.model, ModelConfig)
    assert replica_args.model.model_name_or_path == str(Path(target).resolve())
    assert replica_args.model.pard_config.model_name_or_path == str(Path(draft).resolve())
    assert replica_args.model.pard_config.num_speculative_tokens == 5 and replica_args.model.dtype == "float32"


@pytest.mark.slow
def test_serve_run_serve_config_yaml():
    """`serve run serve_config.yaml` serves the bundled demo pair on 127.0.0.1:8000."""
    import httpx

    if not (ROOT / "models" / "demo-target" / "config.json").is_file():
        pytest.skip("the demo pair is not in models/ yet")
    import tempfile

    # pinning on, with a private lock directory so that no other server on this host interferes
    # the README's command: NODE_ENV (RAY_SERVE_PROXY_USE_GRPC=1 ...) serve run serve_config.yaml
    from pace_core.numa import NODE_ENV

    # a Ray of its own under a private temp dir: cleanup stops that Ray and no other
    ray_tmp = tempfile.mkdtemp(prefix="ray-serve-run-")
    env = {**os.environ, "RAY_DASHBOARD_ENABLED": "0", "PACE_SLOT_DIR": tempfile.mkdtemp(prefix="pace-slots-"),
           "RAY_TMPDIR": ray_tmp, **NODE_ENV}
    env.pop("PACE_PIN", None)
    proc = subprocess.Popen(["serve", "run", "serve_config.yaml"], cwd=ROOT, env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 240
        while time.time() < deadline:
            assert proc.poll() is None, "serve run exited"
            try:
                if httpx.get("http://127.0.0.1:8000/v1/models", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(2)
        r = httpx.post("http://127.0.0.1:8000/v1/completions",
                       json={"model": "pace-demo", "prompt": "def fibonacci(n):", "max_tokens": 32}, timeout=120)
        assert r.status_code == 200 and r.json()["choices"][0]["text"]
        body = {"model": "pace-demo", "prompt": "def fibonacci(n):", "max_tokens": 32, "stream": True}
        with httpx.stream("POST", "http://127.0.0.1:8000/v1/completions", json=body, timeout=120) as s:
            events = [line for line in s.iter_lines() if line.startswith("data: ")]
        assert events[-1] == "data: [DONE]" and len(events) > 3
        assert "".join(json.loads(e[6:])["choices"][0]["text"] for e in events[:-1]) == r.json()["choices"][0]["text"]
        bad = httpx.post("http://127.0.0.1:8000/v1/completions", json={"model": "pace-demo", "max_tokens": 4}, timeout=30)
        assert bad.status_code == 400 and "prompt" in bad.json()["error"]["message"]
        assert 'route="/v1/completions",status="200"' in httpx.get("http://127.0.0.1:8000/metrics", timeout=30).text
        # the README's Security notes: the API and Ray's dashboard on loopback only
        import psutil

        listening = {(c.laddr.ip, c.laddr.port) for c in psutil.net_connections("inet") if c.status == "LISTEN"}
        assert {ip for ip, port in listening if port == 8000} == {"127.0.0.1"}, listening
        assert {ip for ip, port in listening if port == 8265} <= {"127.0.0.1"}, listening
    finally:
        import signal

        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        import psutil

        for leftover in psutil.process_iter(["cmdline"]):  # only this test's Ray (never `ray stop`)
            if any(ray_tmp in arg for arg in leftover.info["cmdline"] or ()):
                leftover.kill()


def test_metrics_acceptance_per_step_bonus_apart_and_itl_per_token(engine):
    """From a real generation's stats: one acceptance observation per speculative step
    (accepted drafts only: every step adds one correction or bonus token), a bonus for
    each step that kept all its proposals, and one ITL observation per token after the
    first, summing to the time from the first step's end to the last's."""
    from prometheus_client.parser import text_string_to_metric_families

    from deployments.metrics import Metrics
    from pace_core import SamplingConfig

    out = engine.generate("def f(x):", SamplingConfig(max_new_tokens=40, ignore_eos=True))
    stats = out.stats.to_dict()
    assert len(stats["drafts_proposed_per_step"]) == len(stats["drafts_accepted_per_step"]) == stats["steps"]
    assert sum(stats["drafts_accepted_per_step"]) + stats["steps"] == len(out.token_ids)  # max_new_tokens is never overshot
    metrics = Metrics("m")
    final = Final("length", Usage(3, len(out.token_ids)), out.stats, {"prefix_cache": None})  # an engine without a cache
    metrics.generation_done(final, len(out.token_ids), 0.01, 0.5)
    metrics.generation_done(None, 5, None, 0.1)  # one cut short: its tokens only
    samples = {s.name: s.value for f in text_string_to_metric_families(metrics.render()[0].decode())
               for s in f.samples if s.labels.get("le") is None}
    speculative = [(p, a) for p, a in zip(stats["drafts_proposed_per_step"], stats["drafts_accepted_per_step"]) if p]
    assert speculative and samples["pace_accepted_draft_tokens_per_step_count"] == len(speculative)
    assert samples["pace_accepted_draft_tokens_per_step_sum"] == sum(a for _, a in speculative)
    assert samples["pace_bonus_tokens_total"] == sum(1 for p, a in speculative if a == p)
    assert samples["pace_draft_tokens_proposed_total"] == sum(p for p, _ in speculative)
    assert samples["pace_inter_token_latency_seconds_count"] == len(out.token_ids) - 1
    assert samples["pace_generation_tokens_total"] == len(out.token_ids) + 5 and samples["pace_prompt_tokens_total"] == 3
    assert samples["pace_prefix_cache_queries_total"] == 0  # no cache: no query
    ends = stats["step_end_s"]
    assert samples["pace_inter_token_latency_seconds_sum"] == pytest.approx(ends[-1] - ends[0])


def test_stream_interval_coalesces_ready_events_until_the_deadline():
    """The replica's streaming send: every engine event already there goes as one; with a
    stream interval it also takes those arriving until the deadline, but never one after
    it, and never waits past the request's end. (The engine side of the socket is played
    by this test.)"""
    import multiprocessing

    from deployments.replica import LLMReplica
    from pace_core.outputs import Delta, GenerationStats

    replica = LLMReplica.func_or_class.__new__(LLMReplica.func_or_class)
    replica.step_timeout_s = None
    replica.engine, engine = multiprocessing.Pipe()  # a socket pair: poll / recv / fileno
    delta = lambda i: Delta([i], str(i))  # noqa: E731
    end = Final("length", Usage(1, 7), GenerationStats())

    async def main():
        loop = asyncio.get_running_loop()
        for i in range(3):
            engine.send(delta(i))
        while not replica.engine.poll():
            await asyncio.sleep(0.001)
        assert await replica._take_ready(replica.engine, 0.0) == [delta(0), delta(1), delta(2)]  # no waiting
        # 3 and 4 come before the deadline, 5 only once the call has returned
        deadline = loop.time() + 0.5
        call = asyncio.ensure_future(replica._take_ready(replica.engine, deadline))
        for i in (3, 4):
            engine.send(delta(i))
        got = await asyncio.wait_for(call, 30)
        engine.send(delta(5))
        assert got == [delta(3), delta(4)] and loop.time() >= deadline
        assert await replica._take_ready(replica.engine, 0.0) == [delta(5)]
        for event in (delta(6), end, delta(7)):
            engine.send(event)
        # the end stops the wait (a deadline an hour away), and the event after it waits for its own call
        assert await asyncio.wait_for(replica._take_ready(replica.engine, loop.time() + 3600), 30) == [delta(6), end]

    asyncio.run(main())


# ----------------------------------------------------------------------------- hostile input
def _raw(obj) -> bytes:
    """JSON with \\u escapes, so that lone surrogates travel as the escapes JSON allows."""
    return json.dumps(obj).encode()


BAD_STRINGS = {"high surrogate": "abc\ud800def", "low surrogate": "\udfff", "reversed pair": "\ude00\ud83d",
               "NUL": "a\u0000b", "NUL and surrogate": "\u0000\ud800"}


def _text_field_cases() -> list:
    """Each bad string in each text field a request can carry, on both routes."""
    user = lambda text: {"messages": [{"role": "user", "content": text}], "max_tokens": 4}  # noqa: E731
    fields = {
        "prompt": lambda t: ("/v1/completions", {"prompt": t, "max_tokens": 4}),
        "prompt list": lambda t: ("/v1/completions", {"prompt": ["ok", t], "max_tokens": 4}),
        "prompt stream": lambda t: ("/v1/completions", {"prompt": t, "max_tokens": 4, "stream": True}),
        "stop": lambda t: ("/v1/completions", {"prompt": "x", "stop": t, "max_tokens": 4}),
        "stop list": lambda t: ("/v1/chat/completions", {**user("hi"), "stop": ["\n", t]}),
        "message": lambda t: ("/v1/chat/completions", user(t)),
        "message stream": lambda t: ("/v1/chat/completions", {**user(t), "stream": True}),
        "content part": lambda t: ("/v1/chat/completions",
                                   {"messages": [{"role": "user", "content": [{"type": "text", "text": t}]}],
                                    "max_tokens": 4}),
        "model": lambda t: ("/v1/completions", {"prompt": "x", "model": t, "max_tokens": 4}),
        "user": lambda t: ("/v1/completions", {"prompt": "x", "user": t, "max_tokens": 4}),
    }
    cases = []
    for fname, make in fields.items():
        for sname, text in BAD_STRINGS.items():
            path, body = make(text)
            must_name = fname.split()[0] if "surrogate" in sname and fname not in ("model", "user") else None
            cases.append((f"{fname}: {sname}", "POST", path, {"content": _raw(body)}, must_name))
    return cases


JSON_CT = {"content-type": "application/json"}
HOSTILE = _text_field_cases() + [
    # malformed JSON
    ("empty body", "POST", "/v1/completions", {"content": b"", "headers": JSON_CT}, None),
    ("truncated", "POST", "/v1/completions", {"content": b'{"prompt": "x"', "headers": JSON_CT}, None),
    ("null", "POST", "/v1/completions", {"content": b"null"}, None),
    ("array", "POST", "/v1/chat/completions", {"content": b"[1, 2]"}, None),
    ("string", "POST", "/v1/completions", {"content": b'"prompt"'}, None),
    ("single quotes", "POST", "/v1/completions", {"content": b"{'prompt': 'x'}"}, None),
    ("invalid UTF-8", "POST", "/v1/completions", {"content": b'{"prompt": "\xff\xfe"}'}, None),
    ("NaN", "POST", "/v1/completions", {"content": b'{"prompt": "x", "max_tokens": NaN}'}, None),
    ("deep nesting", "POST", "/v1/completions", {"content": b"[" * 100_000}, None),
    ("duplicate keys", "POST", "/v1/completions", {"content": b'{"prompt": 1, "prompt": "x", "max_tokens": 2}'}, None),
    # wrong types
    ("prompt object", "POST", "/v1/completions", {"json": {"prompt": {"a": 1}}}, "prompt"),
    ("prompt bool", "POST", "/v1/completions", {"json": {"prompt": True}}, "prompt"),
    ("prompt null", "POST", "/v1/completions", {"json": {"prompt": None}}, "prompt"),
    ("prompt mixed list", "POST", "/v1/completions", {"json": {"prompt": [1, "a"]}}, "prompt"),
    ("prompt float ids", "POST", "/v1/completions", {"json": {"prompt": [1.5, 2]}}, "prompt"),
    ("negative token id", "POST", "/v1/completions", {"json": {"prompt": [-1], "max_tokens": 2}}, None),
    ("max_tokens list", "POST", "/v1/completions", {"json": {"prompt": "x", "max_tokens": []}}, "max_tokens"),
    ("max_tokens bool", "POST", "/v1/completions", {"json": {"prompt": "x", "max_tokens": True}}, None),
    ("temperature string", "POST", "/v1/completions", {"json": {"prompt": "x", "temperature": "hot"}}, "temperature"),
    ("stop number", "POST", "/v1/completions", {"json": {"prompt": "x", "stop": 5}}, "stop"),
    ("stop list of numbers", "POST", "/v1/completions", {"json": {"prompt": "x", "stop": [1]}}, "stop"),
    ("five stops", "POST", "/v1/completions", {"json": {"prompt": "x", "stop": list("abcde")}}, "stop"),
    ("messages object", "POST", "/v1/chat/completions", {"json": {"messages": {"role": "user"}}}, "messages"),
    ("message without role", "POST", "/v1/chat/completions", {"json": {"messages": [{"content": "x"}]}}, "role"),
    ("message number", "POST", "/v1/chat/completions", {"json": {"messages": [1]}}, "messages"),
    ("content number", "POST", "/v1/chat/completions", {"json": {"messages": [{"role": "user", "content": 5}]}},
     "content"),
    ("stream_options string", "POST", "/v1/completions", {"json": {"prompt": "x", "stream_options": "x"}}, None),
    ("seed string", "POST", "/v1/completions", {"json": {"prompt": "x", "seed": "x"}}, "seed"),
    ("top_p zero", "POST", "/v1/completions", {"json": {"prompt": "x", "top_p": 0}}, "top_p"),
    ("logprobs true", "POST", "/v1/completions", {"json": {"prompt": "x", "logprobs": True}}, "logprobs"),
    # huge values
    ("max_tokens 2**63", "POST", "/v1/completions", {"json": {"prompt": "x", "max_tokens": 2 ** 63}}, None),
    ("max_tokens 1e30", "POST", "/v1/completions", {"content": b'{"prompt": "x", "max_tokens": 1e30}'}, None),
    ("temperature 1e400", "POST", "/v1/completions", {"content": b'{"prompt": "x", "temperature": 1e400}'}, None),
    ("token id 2**64", "POST", "/v1/completions", {"json": {"prompt": [2 ** 64], "max_tokens": 2}}, None),
    ("seed 2**70", "POST", "/v1/completions", {"json": {"prompt": "x", "max_tokens": 2, "seed": 2 ** 70}}, None),
    ("top_k 10**20", "POST", "/v1/completions", {"json": {"prompt": "x", "max_tokens": 2, "top_k": 10 ** 20}}, None),
    ("n 10**9", "POST", "/v1/completions", {"json": {"prompt": "x", "n": 10 ** 9}}, "n"),
    ("prompt of 1.5M characters", "POST", "/v1/completions", {"json": {"prompt": "a" * 1_500_000}}, "prompt"),
    ("600k token ids", "POST", "/v1/completions", {"content": b'{"prompt": [' + b"1," * 600_000 + b"1]}"},
     None),
    ("messages of 1.5M characters", "POST", "/v1/chat/completions",
     {"json": {"messages": [{"role": "user", "content": "a" * 750_000}] * 2}}, "messages"),
    ("10 MB body", "POST", "/v1/completions", {"json": {"prompt": "a" * 10_000_000}}, None),
    ("10 MB chunked body", "POST", "/v1/chat/completions",
     {"content": iter([b'{"messages": [{"role": "user", "content": "'] + [b"a" * 1_000_000] * 10 + [b'"}]}'])},
     None),
    # headers and content types
    ("40 kB header", "POST", "/v1/completions", {"json": {"prompt": "x"}, "headers": {"x-big": "a" * 40_000}}, None),
    ("1 MB header", "GET", "/v1/models", {"headers": {"x-big": "a" * 1_000_000}}, None),
    ("500 headers", "GET", "/health", {"headers": {f"x-h{i}": "a" * 100 for i in range(500)}}, None),
    ("text/plain", "POST", "/v1/completions", {"content": _raw({"prompt": "x", "max_tokens": 2}),
                                               "headers": {"content-type": "text/plain"}}, None),
    ("form content type", "POST", "/v1/completions", {"content": b"prompt=x&max_tokens=2",
                                                      "headers": {"content-type": "application/x-www-form-urlencoded"}},
     None),
    ("multipart", "POST", "/v1/chat/completions",
     {"files": {"file": ("a.json", b'{"messages": []}', "application/json")}}, None),
    ("bad authorization header", "POST", "/v1/completions",
     {"json": {"prompt": "x", "max_tokens": 2}, "headers": {"authorization": b"Bearer \xff\xfe"}}, None),
    # wrong methods and paths
    ("GET completions", "GET", "/v1/completions", {}, None),
    ("PUT chat", "PUT", "/v1/chat/completions", {"json": {}}, None),
    ("DELETE models", "DELETE", "/v1/models", {}, None),
    ("POST health", "POST", "/health", {"json": {}}, None),
    ("PATCH metrics", "PATCH", "/metrics", {}, None),
    ("unknown path", "GET", "/v1/engines", {}, None),
    ("OPTIONS", "OPTIONS", "/v1/completions", {}, None),
]


def _check_answer(r, must_name) -> str | None:
    """None if ``r`` is a valid 200 or a 4xx in OpenAI's error shape (naming ``must_name``
    if given), else what is wrong."""
    if r.status_code == 200:
        if r.headers["content-type"].startswith("text/event-stream"):
            events = [line[6:] for line in r.text.splitlines() if line.startswith("data: ")]
            ok = events and events[-1] == "[DONE]" and all("error" not in json.loads(e) for e in events[:-1])
        else:
            ok = "choices" in r.json() or "data" in r.json() or r.json() == {"status": "ok"}
        return None if ok and must_name is None else f"200 {r.text[:200]}"
    if not 400 <= r.status_code < 500:
        return f"{r.status_code} {r.text[:300]}"
    try:
        err = r.json()["error"]
    except Exception:
        return f"{r.status_code}, not OpenAI's error shape: {r.text[:200]}"
    if set(err) != {"message", "type", "param", "code"} or not err["message"]:
        return f"{r.status_code}, not OpenAI's error shape: {err}"
    if must_name and must_name not in err["message"] and must_name != err["param"]:
        return f"{r.status_code}, does not name {must_name!r}: {err}"
    if r.status_code == 405 and not r.headers.get("allow"):
        return "405 without Allow"
    return None


def test_hostile_http_input_gets_4xx_or_200_and_no_engine_dies(server):
    """The bad-input corpus (issue 13): every answer is a 4xx in OpenAI's error shape or
    a valid 200, no engine process dies, and a normal request is still served."""
    assert len(HOSTILE) >= 60
    c = server["client"]
    pids = engine_pids()
    assert len(pids) == 3, pids  # "pace" (2 replicas) and "one"
    problems = []
    for name, method, path, kwargs, must_name in HOSTILE:
        r = c.request(method, path, **kwargs)
        problem = _check_answer(r, must_name)
        if problem:
            problems.append(f"{name}: {problem}")
    assert not problems, "\n".join(problems)
    statuses = {name: c.request(method, path, **kwargs).status_code
                for name, method, path, kwargs, _ in HOSTILE if name in ("10 MB body", "1 MB header", "GET completions")}
    assert statuses == {"10 MB body": 413, "1 MB header": 431, "GET completions": 405}
    assert engine_pids() == pids
    r = c.post("/v1/completions", json={"prompt": "def f():", "max_tokens": 8})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 8


def _raw_request(port: int, headers: bytes, body: bytes = b'{"prompt": "x", "max_tokens": 2}') -> tuple[int, bytes]:
    """A request written byte for byte (httpx refuses to send control characters): (status, body)."""
    request = (b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n" + headers
               + b"Content-Length: " + str(len(body)).encode() + b"\r\nConnection: close\r\n\r\n" + body)
    with socket.create_connection(("127.0.0.1", port), timeout=60) as sock:
        sock.sendall(request)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    head, _, rest = answer.partition(b"\r\n\r\n")
    return int(head.split()[1]), rest


def test_what_serves_proxy_refuses_is_answered_in_openai_shape(server):
    """Requests refused before the app (deployments.proxy): a garbage Authorization
    header (control characters: the HTTP parser refuses it) on the app without an API
    key and on the one with a key, and headers Serve's proxy decodes that are not UTF-8:
    400s in OpenAI's error shape naming the fix or the header; the server goes on serving."""
    port = server["port"]
    cases = [(b"Authorization: Bearer sk\x00garbage\r\n", "Authorization: Bearer <key>"),
             (b"Authorization: \x01\x7f\r\n", "not valid HTTP/1.1"),
             (b"X-Session-ID: \xff\xfe\r\n", "x-session-id header is not valid UTF-8"),
             (b"X-Request-ID: \xc3\r\n", "x-request-id header is not valid UTF-8")]
    for headers, needle in cases:
        status, body = _raw_request(port, headers)
        assert status == 400, (headers, body)
        err = json.loads(body)["error"]
        assert set(err) == {"message", "type", "param", "code"} and needle.lower() in err["message"].lower(), err
    status, body = _raw_request(port, b"Authorization: Bearer anything\r\n")  # the app without a key serves it
    assert status == 200 and json.loads(body)["usage"]["completion_tokens"] == 2


def test_hostile_handle_calls_raise_clear_errors_and_no_engine_dies(server):
    from ray import serve

    handle = serve.get_app_handle("pace")
    pids = engine_pids()
    calls = [
        ("prompt", lambda: handle.generate.remote("abc\ud800def", {"max_new_tokens": 2})),
        ("prompt", lambda: handle.generate.remote(None)),
        ("prompt", lambda: handle.generate.remote(5)),
        ("prompt", lambda: handle.generate.remote({"text": "x"})),
        ("prompt", lambda: handle.generate.remote([1, "a"])),
        ("prompt", lambda: handle.generate.remote("a" * 1_100_000)),
        ("stop", lambda: handle.generate.remote("x", {"stop": ["\udc00"]})),
        ("sampling", lambda: handle.generate.remote("x", "greedy")),
        ("max_new_tokens", lambda: handle.generate.remote("x", {"max_new_tokens": -1})),
        ("bogus", lambda: handle.generate.remote("x", {"bogus": 1})),
        ("messages", lambda: handle.chat.remote([{"role": "user", "content": "\ud800"}])),
        ("messages", lambda: handle.chat.remote("hello")),
        ("role", lambda: handle.chat.remote([{"role": "wizard", "content": "x"}])),
        ("content", lambda: handle.chat.remote([{"role": "user", "content": 5}])),
    ]
    for needle, call in calls:
        with pytest.raises(Exception, match=needle):
            call().result(timeout_s=60)
    with pytest.raises(Exception, match="prompt"):
        list(handle.options(stream=True).generate_stream.remote("\ud800"))
    with pytest.raises(Exception, match="messages"):
        list(handle.options(stream=True).chat_stream.remote([{"role": "user", "content": "\ud800"}]))
    assert engine_pids() == pids
    assert handle.generate.remote("x\u0000y", {"max_new_tokens": 3}).result(timeout_s=60)["finish_reason"] == "length"


def test_metrics_parse_as_prometheus_text_and_openmetrics(server):
    from prometheus_client.openmetrics.parser import text_string_to_metric_families as parse_openmetrics
    from prometheus_client.parser import text_string_to_metric_families as parse_prometheus

    c = server["client"]
    assert c.post("/v1/completions", json={"prompt": "x", "max_tokens": 3}).status_code == 200
    text = c.get("/metrics")
    assert text.headers["content-type"].startswith("text/plain")
    families = {f.name: f for f in parse_prometheus(text.text)}
    om = c.get("/metrics", headers={"Accept": "application/openmetrics-text; version=1.0.0"})
    assert om.headers["content-type"].startswith("application/openmetrics-text")
    om_families = {f.name: f for f in parse_openmetrics(om.text)}
    for fams in (families, om_families):
        assert fams["pace_requests"].type == "counter"
        ok = [s for s in fams["pace_requests"].samples
              if s.labels.get("route") == "/v1/completions" and s.labels.get("status") == "200" and s.name.endswith("_total")]
        assert ok and ok[0].value >= 1 and ok[0].labels["model"] == "pace-demo"
        for name in ("pace_time_to_first_token_seconds", "pace_inter_token_latency_seconds",
                     "pace_e2e_request_latency_seconds"):
            assert fams[name].type == "histogram"
            count = [s for s in fams[name].samples if s.name == name + "_count"]
            assert count and count[0].value >= 1
        for name in ("pace_requests_in_flight", "pace_queue_depth"):
            assert fams[name].type == "gauge"
        assert fams["pace_accepted_draft_tokens_per_step"].type == "histogram"
        assert fams["pace_generation_tokens"].samples[0].value >= 3


def test_killed_engine_mid_stream_error_event_then_restart_in_place(server):
    """The 1-replica app: its engine is killed after the first chunk of a long stream.
    The stream ends with an SSE error event in OpenAI's error shape (a request id, no
    detail), then [DONE]; the replica restarts its engine in place (the same replica
    process, a new engine, its second start) and serves the next request."""
    import signal

    c = server["client"]
    headers = {"Authorization": f"Bearer {API_KEY}"}
    before = _engine_facts()
    body = {"prompt": "x", "max_tokens": 480, "ignore_eos": True, "stream": True}

    with c.stream("POST", "/one/v1/completions", json=body, headers=headers) as r:
        assert r.status_code == 200
        events = sse_events(r, on_first=lambda: os.kill(before["engine_pid"], signal.SIGKILL))
    assert events[-1] == "[DONE]"
    assert events[-2] == {"error": {"message": f"internal server error (request id {events[0]['id']}); the details "
                                               "are in the server's log. Retry the request.",
                                    "type": "server_error", "param": None, "code": "internal_error"}}
    assert sum(len(e["choices"][0]["text"]) for e in events[:-2] if "choices" in e) > 0
    r = c.post("/one/v1/completions", json={"prompt": "x", "max_tokens": 2}, headers=headers)
    assert r.status_code == 200, r.text
    after = _engine_facts()
    assert after["replica_pid"] == before["replica_pid"] and after["engine_pid"] != before["engine_pid"]
    assert after["engine_start"] == before["engine_start"] + 1
    assert 'pace_stream_errors_total{model="one"} 1.0' in c.get("/one/metrics").text


def test_prefix_cache_reuse_is_reported_in_usage_metrics_and_info(server, engine):
    """The same long prompt twice (the cache-aware router sends it back to the replica
    that served it): the second reuses the cached blocks, says so in
    usage.prompt_tokens_details.cached_tokens, /metrics and the replica's info, and
    answers exactly as the first and as the engine alone."""
    from pace_core import SamplingConfig

    c = server["client"]
    prompt = "class Stack:\n    def __init__(self):\n        self.items = []\n\n" * 6 + "def peek(self):"
    body = {"prompt": prompt, "max_tokens": 12, "user": "prefix-cache-test"}
    first, second = (c.post("/v1/completions", json=body).json() for _ in range(2))
    ref = engine.generate(prompt, SamplingConfig(max_new_tokens=12))
    assert first["choices"][0]["text"] == second["choices"][0]["text"] == ref.text
    cached = second["usage"]["prompt_tokens_details"]["cached_tokens"]
    # the replica's runners still held the first request's sequence: all of the prompt but the last token
    assert first["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    assert cached == second["usage"]["prompt_tokens"] - 1
    with c.stream("POST", "/v1/completions", json={**body, "stream": True,
                                                   "stream_options": {"include_usage": True}}) as r:
        assert sse_events(r)[-2]["usage"]["prompt_tokens_details"]["cached_tokens"] == cached
    metrics = c.get("/metrics").text
    value = {line.split("{")[0]: float(line.split()[-1]) for line in metrics.splitlines()
             if line.startswith("pace_prefix_cache")}
    assert value["pace_prefix_cache_hits_total"] >= 2 and value["pace_prefix_cache_cached_tokens_total"] >= 2 * cached
    assert 0 < value["pace_prefix_cache_hit_rate"] < 1
    # the router's info (no replica asked): the replicas' engines as their latest Final reported them
    info = server["handle"].info.remote().result()
    caches = [facts["prefix_cache"] for facts in info["replicas"].values()]
    assert all(i["budget_bytes"] > 0 for i in caches) and any(i["hits"] >= 2 and i["blocks"] > 0 for i in caches)
    assert info["router_pid"] != os.getpid() and info["model"]["max_context"] == 512
