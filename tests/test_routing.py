"""Cache-aware routing (deployments.routing): the policy alone, then under Ray Serve with
two replicas of the tiny models."""
from __future__ import annotations

import os
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
    p = AffinityPolicy(affinity_wait_s=0.5)
    prompt = {"prompt": LONG * 3}
    p.record(request_keys(prompt), "A")
    p.record(request_keys({"prompt": "hi", "session_id": "u1"}), "B")
    assert p.preferred(request_keys({**prompt, "session_id": "u1"}), ["A", "B"]) == "B"
    assert p.preferred(request_keys({**prompt, "session_id": "u2"}), ["A", "B"]) == "A"  # unknown session
    assert p.preferred(request_keys({**prompt, "session_id": "u1"}), ["A", "C"]) == "A"  # its replica is no candidate


def test_ranks_wait_for_the_busy_preferred_replica_then_offer_the_free_ones():
    p = AffinityPolicy(affinity_wait_s=0.5)
    keys = request_keys({"prompt": LONG * 2, "session_id": "s"})
    assert len(p.ranks(keys, ["A", "B", "C"], {"A", "B", "C"}, waited_s=0.0)) == 3  # no preference: free, one by one
    p.record(keys, "B")
    assert p.ranks(keys, ["A", "B", "C"], {"A", "B", "C"}, waited_s=0.0)[0] == ["B"]
    assert p.ranks(keys, ["A", "B", "C"], {"A", "C"}, waited_s=0.2) == [["B"]]  # busy, not waited long: wait for it
    first, second, rest = p.ranks(keys, ["A", "B", "C"], {"A", "C"}, waited_s=0.6)  # waited long enough
    assert sorted(first + second) == ["A", "C"] and rest == ["B"]
    assert p.ranks(keys, ["A", "B"], {"B"}, waited_s=9.0) == [["B"], ["A"]]  # the free preferred one first
    assert AffinityPolicy(affinity_wait_s=0).ranks(keys, ["A"], set(), 0.0) == [["A"]]  # all busy: Serve waits


def test_new_conversations_spread_over_the_replicas_sent_nothing_lately():
    p = AffinityPolicy(affinity_wait_s=0.5)
    convos = [request_keys({"prompt": f"{i}: {LONG * 2}", "session_id": f"s{i}"}) for i in range(4)]
    p.record(convos[0], "A")
    p.record(convos[1], "B")
    p.record(convos[0], "A")  # A was sent the latest request
    assert p.ranks(convos[2], ["A", "B"], {"A", "B"}, 0.0) == [["B"], ["A"]]
    assert p.ranks(convos[2], ["A", "B", "C"], {"A", "B", "C"}, 0.0)[0] == ["C"]  # never sent anything (new)
    assert p.ranks(convos[2], ["A", "B"], {"A"}, 0.0) == [["A"], ["B"]]  # the free one, then the busy one


def test_a_conversation_doubled_up_on_a_busy_replica_moves_to_one_idle_since():
    """Conversations 0 and 1 ran on A and B; conversation 2 landed on B too (B was free
    between two turns of conversation 1). Conversation 1's next turn finds B busy with
    conversation 2 while A has been sent nothing since: it moves to A at once. A turn
    that finds its replica still running its own previous turn (about to end) waits."""
    p = AffinityPolicy(affinity_wait_s=0.5)
    c0, c1, c2 = (turns(f"{i}: {LONG}", 3) for i in range(3))
    p.record(request_keys({"messages": c0[0]}), "A")
    p.record(request_keys({"messages": c1[0]}), "B")
    p.record(request_keys({"messages": c2[0]}), "B")  # B is running it
    assert p.ranks(request_keys({"messages": c1[1]}), ["A", "B"], {"A"}, 0.0) == [["A"]]
    p.record(request_keys({"messages": c1[1]}), "A")
    assert p.preferred(request_keys({"messages": c1[2]}), ["A", "B"]) == "A"  # it stays there
    # B runs conversation 2's turn 1; its turn 2 arrives before B is seen free: it waits for B
    assert p.ranks(request_keys({"messages": c2[1]}), ["A", "B"], {"A"}, 0.0) == [["B"]]
    # the same by session key, with no whole block
    p.record(Keys("s", []), "B")
    assert p.ranks(Keys("s", []), ["A", "B"], {"A"}, 0.0) == [["B"]]
    # a new conversation sharing only a system prompt with B's is not worth waiting for B
    p.record(request_keys({"messages": c2[0]}), "B")
    p.record(Keys("t", []), "A")  # A is not idle since
    new = request_keys({"messages": turns("z" * 300, 1)[0]})
    assert p.preferred(new, ["A", "B"]) == "B" and p.ranks(new, ["A", "B"], {"A"}, 0.0) == [["A"], ["B"]]


def test_the_table_is_lru_bounded():
    p = AffinityPolicy(affinity_wait_s=0.5, max_keys=10)
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
    p = AffinityPolicy(affinity_wait_s=0.5)
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
        self.queue_len = 0

    async def get_queue_len(self, *, deadline_s: float) -> int:
        return self.queue_len


def test_cache_aware_router_in_serves_routing_loop():
    """CacheAwareRouter driven by Serve's own routing loop (fake replicas, no Ray): a turn
    follows its conversation's replica; while that one runs a request, a turn waits for it
    and is routed there once it completes (woken by the completion, not by a clock); after
    affinity_wait_s it takes the free one and the conversation follows; a replica busy
    with another router's request (its queue length says so) is not taken; replicas that
    leave or die are forgotten."""
    import asyncio

    from ray.serve._private.common import DeploymentHandleSource, DeploymentID, RequestMetadata
    from ray.serve.request_router import PendingRequest

    from deployments.routing import CacheAwareRouter

    async def main():
        router = CacheAwareRouter(deployment_id=DeploymentID(name="LLMReplica", app_name="test"),
                                  handle_source=DeploymentHandleSource.UNKNOWN)
        router.initialize_state(affinity_wait_s=3600)
        a, b, c = FakeReplica("a"), FakeReplica("b"), FakeReplica("c")
        router.update_replicas([a, b])
        ids = iter(range(1000))

        def pending(request: dict, created_at: float | None = None) -> PendingRequest:
            pr = PendingRequest(args=[request], kwargs={},
                                metadata=RequestMetadata(request_id="r", internal_request_id=f"i{next(ids)}"))
            if created_at is not None:
                pr.created_at = created_at
            return pr

        async def start(pr: PendingRequest):  # routed, sent and running until done(pr), as Serve reports it
            replica = await asyncio.wait_for(router._choose_replica_for_request(pr), timeout=10)
            router.on_send_request(replica.replica_id)
            router.on_request_routed(pr, replica.replica_id, None)
            return replica

        def done(pr: PendingRequest, replica) -> None:
            router.on_request_completed(replica.replica_id, pr.metadata.internal_request_id)

        convo = turns(LONG, 4)
        first = pending({"messages": convo[0]})
        home = await start(first)
        done(first, home)
        second = pending({"messages": convo[1]})
        assert await start(second) is home  # running now
        third = pending({"messages": convo[2]})
        waiting = asyncio.ensure_future(start(third))
        for _ in range(20):
            await asyncio.sleep(0)
        assert not waiting.done()  # the other replica is free, yet it waits for its own
        done(second, home)
        assert await waiting is home
        # waited past affinity_wait_s (arrived an hour ago): the free replica takes it
        late = pending({"messages": convo[3]}, created_at=time.time() - 3601)
        other = await start(late)
        assert other is not home and router.running[home.replica_id] == router.running[other.replica_id] == 1
        done(third, home), done(late, other)
        assert router.policy.preferred(request_keys({"messages": convo[3]}), [a.replica_id, b.replica_id]) == \
            other.replica_id  # the conversation moved with it
        assert router.running[home.replica_id] == 0

        router.update_replicas([b, c])  # autoscaling: a left, c came
        assert all(r != a.replica_id for r in router.policy._table.values())
        # a new conversation goes to c, sent nothing yet, unless another router's request is there
        c.queue_len = 1
        assert await start(pending({"prompt": "a new one"})) is b
        c.queue_len = 0
        router.on_replica_actor_died(b.replica_id)
        assert all(r == c.replica_id for r in router.policy._table.values())
        assert await start(pending({"messages": convo[3]})) is c

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


WAIT = 3600.0  # the app's affinity_wait_s: a turn waiting for its busy replica waits as long as the test needs


@pytest.fixture(scope="module")
def two_replicas(tmp_path_factory):
    """(handle, url) of app "routing": 2 replicas behind the Router, cache-aware routing,
    on a private 2-CPU Ray, HTTP on 127.0.0.1. The model is the tiny test target
    (conftest's) with a 32k context and no draft: the 512-token context would end any
    generation within a second, too soon to keep a replica busy."""
    from ray import serve

    from deployments.app import build_app
    from helpers import local_serve
    from pace_core.testing import build_pair

    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("needs 2 CPUs")
    target, _ = build_pair(tmp_path_factory.mktemp("long-context") / "qwen2", "qwen2", max_position_embeddings=32768)
    with local_serve("pace-routing-test", num_cpus=2) as port:
        args = {"model": {"model_name_or_path": target, "dtype": "float32"}, "num_replicas": 2, "cores_per_slot": 1,
                "pin": False, "slot_resource": "never", "affinity_wait_s": WAIT}
        yield serve.run(build_app(args), name="routing", route_prefix="/"), f"http://127.0.0.1:{port}"


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


def in_background(fn) -> tuple[threading.Thread, list]:
    """Run ``fn()`` in a thread: (the thread, [its result] once it returned)."""
    out: list = []
    thread = threading.Thread(target=lambda: out.append(fn()), daemon=True)
    thread.start()
    return thread, out


def in_flight(url: str) -> float:
    import httpx

    text = httpx.get(f"{url}/metrics", timeout=30).text
    return float(next(x for x in text.splitlines() if x.startswith("pace_requests_in_flight{")).split()[-1])


LONG_GEN = {"max_new_tokens": 30000, "ignore_eos": True}  # ~40 s here: always stopped long before


def test_turns_stay_on_their_replica_wait_for_it_and_leave_a_doubled_up_one(two_replicas):
    """(a) Successive turns stay on their replica, by prefix or by session. (b) While a
    conversation's replica runs its own previous turn, the next turn waits for it, though
    the other replica is free (it serves another request meanwhile), and runs there once
    it is free. (c) While its replica runs another conversation's request and the other
    replica has been sent nothing since, the turn moves there at once."""
    from helpers import wait_for

    handle, url = two_replicas

    def chat(messages, session_id=None):
        return handle.chat.remote(messages, {"max_new_tokens": 4}, session_id=session_id).result(timeout_s=60)

    convos = [(turns(f"{i}: {LONG}", 3), None) for i in range(3)]
    convos += [(turns(f"q{i}", 3), f"session-{i}") for i in range(2)]
    pids = {}
    for turn in range(3):
        for c, (convo, sid) in enumerate(convos):
            pid = chat(convo[turn], sid)["engine"]["engine_pid"]
            if turn:
                assert pid == pids[c], (c, turn)
            pids[c] = pid
    assert len(set(pids.values())) <= 2  # one when free: the conversations share a system prompt

    for c in (0, 3):  # (b), by prefix and by session
        convo, sid = convos[c]
        chunks, stop = keep_busy(handle.options(stream=True).chat_stream.remote(convo[2], LONG_GEN, session_id=sid))
        try:
            nxt = convo[2] + [{"role": "assistant", "content": "ok"}, {"role": "user", "content": "next?"}]
            thread, out = in_background(lambda: chat(nxt, sid))
            wait_for(lambda: in_flight(url) == 2, 30, "the next turn at the router")
            fresh = chat([{"role": "user", "content": f"unrelated {c}"}], f"fresh-{c}")
            assert fresh["engine"]["engine_pid"] != pids[c] and thread.is_alive() and not out  # the free replica was not taken
        finally:
            assert stop() and chunks[-1]["type"] == "delta"  # the long one was still running
        thread.join(60)
        assert out[0]["engine"]["engine_pid"] == pids[c]

    # (c) conversation 1's replica runs a request sharing only its first message (another
    # conversation); the other replica has been sent nothing since: its next turn moves there
    convo, _ = convos[1]
    other = convo[0][:2] + [{"role": "assistant", "content": "something else " * 8}]
    _, stop = keep_busy(handle.options(stream=True).chat_stream.remote(other, LONG_GEN))  # to pids[1]'s: its prefix
    try:
        moved = chat(convo[2] + [{"role": "assistant", "content": "ok"}])
    finally:
        assert stop()
    assert moved["engine"]["engine_pid"] != pids[1]


def test_http_session_keys_reach_the_routing(two_replicas):
    """Over HTTP, OpenAI's ``user`` field and the X-Session-ID header (which wins) are the
    session key: while the session's replica runs one of its requests, a request of that
    session waits for it though the other replica serves another session's request
    meanwhile, and is answered once the session's replica is free."""
    import httpx

    from helpers import wait_for

    handle, url = two_replicas
    chat = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}  # no whole block: session only
    with httpx.Client(base_url=url, timeout=60) as client:
        cases = [("/v1/chat/completions", {**chat, "user": "s"}, {}),
                 ("/v1/chat/completions", {**chat, "user": "other"}, {"X-Session-ID": "s"}),
                 ("/v1/completions", {"prompt": "hi", "max_tokens": 2, "user": "s"}, {}),
                 ("/v1/completions", {"prompt": "hi", "max_tokens": 2}, {"X-Session-ID": "s"})]
        for i, (route, payload, headers) in enumerate(cases):
            _, stop = keep_busy(handle.options(stream=True).generate_stream.remote("x", LONG_GEN, session_id="s"))
            try:
                thread, out = in_background(lambda: client.post(route, json=payload, headers=headers))
                wait_for(lambda: in_flight(url) == 2, 30, "the session's request at the router")
                assert client.post("/v1/chat/completions", json={**chat, "user": f"fresh-{i}"}).status_code == 200
                assert thread.is_alive() and not out, (route, payload, headers)
            finally:
                stop()
            thread.join(60)
            assert out[0].status_code == 200, out[0].text
        # the prompts of one completion are calls made in one request: all are served
        r = client.post("/v1/completions", json={"prompt": ["a", "b", "c", "d"], "max_tokens": 2}, timeout=30)
        assert r.status_code == 200 and len(r.json()["choices"]) == 4
