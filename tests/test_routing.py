"""Cache-aware routing (deployments.routing): the policy alone, then under Ray Serve with
two replicas of the tiny models."""
from __future__ import annotations

import os
import socket
import threading
import time

import pytest

from deployments.routing import BLOCK_CHARS, BLOCK_TOKENS, AffinityPolicy, Keys, chat_text, request_keys

SYSTEM = "You are a terse assistant: answer in one short sentence of at most ten words."  # > 1 block
LONG = "Tell me about the weather in a city that has a very long and particular name, please. "


def turns(first: str, n: int) -> list[list[dict]]:
    """A conversation's successive prompts: each turn's messages extend the previous ones."""
    msgs, out = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": first}], []
    for i in range(n):
        out.append(list(msgs))
        msgs += [{"role": "assistant", "content": f"answer {i} " * 5}, {"role": "user", "content": f"and then {i}?"}]
    return out


# ---------------------------------------------------------------- keys
def test_keys_of_a_turn_are_a_prefix_of_the_next_turns():
    convo = turns(LONG, 4)
    keys = [request_keys({"messages": m}) for m in convo]
    for a, b in zip(keys, keys[1:]):
        assert 0 < len(a.blocks) < len(b.blocks) and b.blocks[:len(a.blocks)] == a.blocks
    assert chat_text(convo[1]).startswith(chat_text(convo[0]))
    # a text prompt continued, and token ids continued, too
    t1, t2 = request_keys({"prompt": LONG * 2}), request_keys({"prompt": LONG * 2 + "more " * 40})
    assert t2.blocks[:len(t1.blocks)] == t1.blocks and len(t1.blocks) == len(LONG * 2) // BLOCK_CHARS
    i1, i2 = request_keys({"prompt": list(range(100))}), request_keys({"prompt": list(range(130))})
    assert len(i1.blocks) == 100 // BLOCK_TOKENS and i2.blocks[:len(i1.blocks)] == i1.blocks


def test_keys_differ_by_content_and_kind_and_odd_requests_have_none():
    a = request_keys({"messages": turns(LONG, 1)[0]})
    b = request_keys({"messages": turns(LONG.replace("weather", "history"), 1)[0]})
    assert a.blocks[0] == b.blocks[0] and a.blocks[-1] != b.blocks[-1]  # shared system prompt, then apart
    text = chat_text(turns(LONG, 1)[0])
    assert request_keys({"prompt": text}).blocks[0] != a.blocks[0]  # a text prompt is not a chat
    assert request_keys({"prompt": "short"}) == Keys(None, [])  # less than one block
    assert request_keys({"prompt": "x", "session_id": "s1"}) == Keys("s1", [])
    assert request_keys({"prompt": "\ud800" * 200}).blocks  # a lone surrogate hashes too
    for odd in (None, "text", {"prompt": 3}, {"messages": ["not a dict"]}, {"prompt": None}):
        assert request_keys(odd).blocks == []


# ---------------------------------------------------------------- policy
def test_a_conversations_next_turn_prefers_the_replica_of_its_previous_turn():
    p = AffinityPolicy(affinity_wait_s=0.5)
    c1, c2 = turns(LONG, 3), turns(LONG.replace("weather", "history"), 3)
    assert p.preferred(request_keys({"messages": c1[0]}), ["A", "B"]) is None
    p.record(request_keys({"messages": c1[0]}), "A")
    p.record(request_keys({"messages": c2[0]}), "B")
    # the shared system-prompt block now names B; the deepest match still says A for c1
    assert p.preferred(request_keys({"messages": c1[1]}), ["A", "B"]) == "A"
    assert p.preferred(request_keys({"messages": c2[2]}), ["A", "B"]) == "B"
    # a new conversation with only the system prompt in common goes to its last holder
    assert p.preferred(request_keys({"messages": turns("x" * 80, 1)[0]}), ["A", "B"]) == "B"


def test_the_session_key_wins_over_the_prefix():
    p = AffinityPolicy()
    prompt = {"prompt": LONG * 3}
    p.record(request_keys(prompt), "A")
    p.record(request_keys({"prompt": "hi", "session_id": "u1"}), "B")
    assert p.preferred(request_keys({**prompt, "session_id": "u1"}), ["A", "B"]) == "B"
    assert p.preferred(request_keys({**prompt, "session_id": "u2"}), ["A", "B"]) == "A"  # unknown session
    assert p.preferred(request_keys({**prompt, "session_id": "u1"}), ["A", "C"]) == "A"  # its replica is no candidate


def test_ranks_wait_for_the_preferred_replica_then_offer_the_others():
    p = AffinityPolicy(affinity_wait_s=0.5)
    keys = request_keys({"prompt": LONG * 2, "session_id": "s"})
    assert sorted(p.ranks(keys, ["A", "B", "C"], waited_s=0.0)[0]) == ["A", "B", "C"]  # no preference: all
    p.record(keys, "B")
    assert p.ranks(keys, ["A", "B", "C"], waited_s=0.2) == [["B"]]
    first, rest = p.ranks(keys, ["A", "B", "C"], waited_s=0.6)
    assert first == ["B"] and sorted(rest) == ["A", "C"]
    assert p.ranks(keys, ["A", "B"], waited_s=0.0) == [["B"]]
    assert AffinityPolicy(affinity_wait_s=0).ranks(keys, ["A"], 0.0) == [["A"]]


def test_the_table_is_lru_bounded():
    p = AffinityPolicy(max_keys=10)
    old, new = request_keys({"prompt": LONG * 5}), request_keys({"prompt": "other " * 100})
    assert len(old.blocks) == 6 and len(new.blocks) == 9
    p.record(old, "A")
    p.record(Keys(None, old.blocks[:1]), "A")  # its first block used again: the most recent
    p.record(new, "B")
    assert len(p) == 10
    assert p.preferred(old, ["A", "B"]) == "A"  # the kept first block still matches
    assert p.preferred(Keys(None, old.blocks[1:2]), ["A", "B"]) is None  # older blocks went first
    assert p.preferred(new, ["A", "B"]) == "B"


def test_a_replica_that_left_is_forgotten():
    p = AffinityPolicy()
    keys = request_keys({"prompt": LONG * 2, "session_id": "s"})
    p.record(keys, "A")
    p.record(request_keys({"prompt": "other " * 40}), "B")
    assert p.preferred(keys, ["B"]) is None  # not a candidate now
    p.forget("A")
    assert len(p) == len(request_keys({"prompt": "other " * 40}).blocks)
    assert p.preferred(keys, ["A", "B"]) is None


# ---------------------------------------------------------------- the Serve router, without Ray
class FakeReplica:
    """What Serve's routing asks of a replica: its id, capacity and queue length."""

    def __init__(self, name: str):
        from ray.serve._private.common import DeploymentID, ReplicaID

        self.replica_id = ReplicaID(name, DeploymentID(name="LLMReplica", app_name="test"))
        self.max_ongoing_requests = 1
        self.busy = False

    async def get_queue_len(self, *, deadline_s: float) -> int:
        return int(self.busy)


def test_cache_aware_router_in_serves_routing_loop():
    """CacheAwareRouter driven by Serve's own routing loop (fake replicas, no Ray): a
    turn follows its conversation's replica; with that one busy, the other takes it
    after affinity_wait_s; two calls sharing an internal request id both get a replica;
    replicas that leave or die are forgotten."""
    import asyncio

    from ray.serve._private.common import DeploymentHandleSource, DeploymentID, RequestMetadata
    from ray.serve.request_router import PendingRequest

    from deployments.routing import CacheAwareRouter

    async def main():
        router = CacheAwareRouter(deployment_id=DeploymentID(name="LLMReplica", app_name="test"),
                                  handle_source=DeploymentHandleSource.UNKNOWN)
        router.initialize_state(affinity_wait_s=0.3)
        a, b, c = FakeReplica("a"), FakeReplica("b"), FakeReplica("c")
        router.update_replicas([a, b])

        async def route(request: dict, internal_id: str = ""):
            pr = PendingRequest(args=[request], kwargs={},
                                metadata=RequestMetadata(request_id="r", internal_request_id=internal_id or repr(request)))
            replica = await asyncio.wait_for(router._choose_replica_for_request(pr), timeout=10)
            router.on_request_routed(pr, replica.replica_id, None)
            return replica

        convo = turns(LONG, 3)
        first = await route({"messages": convo[0]})
        assert await route({"messages": convo[1]}) is first
        first.busy = True
        t0 = time.monotonic()
        other = await route({"messages": convo[2]})
        assert other is not first and 0.3 <= time.monotonic() - t0 < 2
        first.busy = False
        assert await route({"messages": convo[2]}) is other  # the conversation moved with it

        siblings = await asyncio.gather(route({"prompt": "x"}, "one-id"), route({"prompt": "y"}, "one-id"))
        assert len(siblings) == 2

        router.update_replicas([b, c])  # autoscaling: a left, c came
        assert all(r != a.replica_id for r in router.policy._table.values())
        router.on_replica_actor_died(b.replica_id)
        assert all(r == c.replica_id for r in router.policy._table.values())
        assert await route({"messages": convo[2]}) is c

    asyncio.run(main())


# ---------------------------------------------------------------- Ray Serve, two replicas
@pytest.mark.parametrize("routing", ["cache_aware", "power_of_two"])
def test_build_app_sets_the_replicas_request_router(tiny_pair, routing):
    from deployments.app import build_app

    target, draft = tiny_pair
    app = build_app({"model": {"model_name_or_path": target, "pard_config": {"model_name_or_path": draft}},
                     "slot_resource": "never", "routing": routing,
                     "affinity_wait_s": 0.25})
    replicas = app._bound_deployment.init_args[0]._bound_deployment  # Router.bind(replica, args)
    config = replicas._deployment_config.request_router_config
    if routing == "cache_aware":
        assert config.request_router_class == "deployments.routing.CacheAwareRouter"
        assert config.request_router_kwargs == {"affinity_wait_s": 0.25}
    else:
        assert config.is_default_request_router()


WAIT = 1.0  # the app's affinity_wait_s: wide apart from a tiny model's request time


@pytest.fixture(scope="module")
def two_replicas(tmp_path_factory):
    """(handle, url) of app "routing": 2 replicas behind the Router, cache-aware routing,
    on a private 2-CPU Ray, HTTP on 127.0.0.1. The model is the tiny test target
    (conftest's) with a 32k context and no draft: the 512-token context would end any
    generation within a second, too soon to keep a replica busy."""
    import ray
    from ray import serve

    from deployments.app import build_app
    from pace_core.testing import build_pair

    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("needs 2 CPUs")
    target, _ = build_pair(tmp_path_factory.mktemp("long-context") / "qwen2", "qwen2", max_position_embeddings=32768)
    ray.init(address="local", num_cpus=2, include_dashboard=False, namespace="pace-routing-test")
    try:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        args = {"model": {"model_name_or_path": target, "dtype": "float32"}, "num_replicas": 2, "cores_per_slot": 1,
                "pin": False, "slot_resource": "never", "affinity_wait_s": WAIT}
        yield serve.run(build_app(args), name="routing", route_prefix="/"), f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()


def keep_busy(stream) -> tuple[list, callable]:
    """A streamed handle response of a long generation, running once its first chunk is
    out: (its chunks so far, stop), where stop() cancels it and says whether it was still
    running."""
    from ray.serve.exceptions import RequestCancelledError

    chunks = [next(stream)]

    def read_rest():
        try:
            chunks.extend(stream)
        except RequestCancelledError:  # stop()
            pass

    reader = threading.Thread(target=read_rest, daemon=True)
    reader.start()

    def stop() -> bool:
        running = reader.is_alive()
        stream.cancel()
        reader.join(timeout=30)
        return running

    return chunks, stop


LONG_GEN = {"max_new_tokens": 30000, "ignore_eos": True}  # ~40 s here: always stopped long before


def test_turns_stay_on_their_replica_and_a_busy_ones_turn_goes_to_the_free_one(two_replicas):
    handle, _ = two_replicas

    def chat(messages, session_id=None):
        return handle.chat.remote(messages, {"max_new_tokens": 4}, session_id=session_id).result(timeout_s=60)

    # (a) successive turns: by prefix (long first messages) or by session (short ones)
    convos = [(turns(f"{i}: {LONG}", 3), None) for i in range(3)]
    convos += [(turns(f"q{i}", 3), f"session-{i}") for i in range(2)]
    pids = {}
    for turn in range(3):
        for c, (convo, sid) in enumerate(convos):
            pid = chat(convo[turn], sid)["engine_pid"]
            if turn:
                assert pid == pids[c], (c, turn)
            pids[c] = pid
    assert len(set(pids.values())) <= 2

    # (b) a conversation's replica is busy with a long generation: its next turn waits
    # about affinity_wait_s for it, then the other replica serves it
    for c in (0, 3):  # by prefix, by session
        convo, sid = convos[c]
        chunks, stop = keep_busy(handle.options(stream=True).chat_stream.remote(convo[2], LONG_GEN, session_id=sid))
        try:
            t0 = time.monotonic()
            out = chat(convo[2] + [{"role": "assistant", "content": "ok"}, {"role": "user", "content": "next?"}], sid)
            took = time.monotonic() - t0
        finally:
            assert stop() and not chunks[-1]["finish_reason"]  # the long one was still running
        assert out["engine_pid"] != pids[c]
        assert WAIT * 0.9 < took < WAIT + 5, took
        # the conversation follows its latest replica
        assert chat(convo[2] + [{"role": "assistant", "content": "ok"}], sid)["engine_pid"] == out["engine_pid"]


def test_http_session_keys_reach_the_routing(two_replicas):
    """Over HTTP, OpenAI's ``user`` field and the X-Session-ID header (which wins) are the
    session key: while the session's replica is busy, a request of that session waits
    about affinity_wait_s for it before the free replica serves it; one of another
    session is served at once."""
    import httpx

    handle, url = two_replicas
    chat = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}  # no whole block: session only
    with httpx.Client(base_url=url, timeout=60) as client:

        def took(route, payload, headers=None) -> float:
            t0 = time.monotonic()
            r = client.post(route, json=payload, headers=headers or {})
            assert r.status_code == 200, r.text
            return time.monotonic() - t0

        cases = [("/v1/chat/completions", {**chat, "user": "s"}, {}),
                 ("/v1/chat/completions", {**chat, "user": "other"}, {"X-Session-ID": "s"}),
                 ("/v1/completions", {"prompt": "hi", "max_tokens": 2, "user": "s"}, {}),
                 ("/v1/completions", {"prompt": "hi", "max_tokens": 2}, {"X-Session-ID": "s"})]
        for i, (route, payload, headers) in enumerate(cases):
            _, stop = keep_busy(handle.options(stream=True).generate_stream.remote("x", LONG_GEN, session_id="s"))
            try:
                assert took("/v1/chat/completions", {**chat, "user": f"fresh-{i}"}) < WAIT * 0.9
                assert took(route, payload, headers) > WAIT * 0.9, (route, payload, headers)
            finally:
                stop()
        # the prompts of one completion are calls sharing one internal request id: all are served
        r = client.post("/v1/completions", json={"prompt": ["a", "b", "c", "d"], "max_tokens": 2}, timeout=30)
        assert r.status_code == 200 and len(r.json()["choices"]) == 4
