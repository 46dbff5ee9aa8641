"""Cache-aware routing: send a request to the replica most likely to hold its prompt's
prefix in its engine's prefix KV cache, unless that replica stays busy.

A request's routing keys are its session key, when it has one (the OpenAI ``user``
field, the ``X-Session-ID`` header or a handle call's ``session_id=``: the router puts
it in the request as ``"session_id"``), and one key per whole block of its prompt: a
running hash of everything up to the end of that block, so a key names a whole prefix.
Blocks are ``BLOCK_CHARS`` characters of a text prompt, ``BLOCK_TOKENS`` ids of a
token-id prompt; chat messages serialize as ``role NUL content NUL`` each, so that a
conversation's turn N serializes to a prefix of turn N+1 and its keys are a prefix of
turn N+1's. A bounded LRU table remembers, for each key, the replica that was last sent
a request with it.

Where a request goes (:meth:`AffinityPolicy.ranks`):

- its preferred replica (its session's, else the one holding its deepest block) when
  that one is free;
- while it is busy: a free replica that has been sent nothing since the busy one got its
  request (two conversations doubled up on one replica while another idles: the second
  moves, once, and pays one prefill), else it waits for its replica, woken the moment
  this router sees a request complete (no polling), for at most ``affinity_wait_s``
  since the request arrived; after that any free replica takes it, the preferred first.
  It waits only for a replica worth it: its session's, or one holding at least half of
  its prompt's blocks (a shared system prompt alone is not);
- a request with no preferred replica (a new conversation) goes to the free replica
  sent a request longest ago, so that conversations spread over the replicas.

Replicas that leave (downscaling, a dead actor) are forgotten; new ones start with no
keys and, having served nothing, take the next new conversation.

:class:`AffinityPolicy` is the policy alone (no Ray; unit-tested in tests/test_routing.py);
:class:`CacheAwareRouter` plugs it into Serve as the replicas' request router
(deployments.app: ``RequestRouterConfig``) through Serve's public request-router
interface (``ray.serve.request_router``: ``choose_replicas``, ``on_send_request``,
``on_request_routed``, ``on_request_completed``, ``update_replicas``, ``on_replica_actor_died``,
``select_available_replicas``, ``curr_replicas``). The table lives in the process whose
handle routes, each ingress Router replica its own (README: Prefix caching and
cache-aware routing).
"""
from __future__ import annotations

import asyncio
import hashlib
import random
import time
from collections import Counter, OrderedDict
from typing import Hashable, NamedTuple

from ray.serve.request_router import PendingRequest, ReplicaID, RequestRouter, RunningReplica

from pace_core.prefix_cache import BLOCK_TOKENS

BLOCK_CHARS = 64  # characters per block of a text or chat prompt (~16 tokens)
MAX_KEYS = 100_000  # the routing table's size: keys of the requests routed lately


class Keys(NamedTuple):
    session: str | None  # the request's session key
    blocks: list[bytes]  # one per whole block: a digest of the prompt up to that block's end


def _prefix_digests(data: str | list, kind: bytes, block: int, encode) -> list[bytes]:
    h = hashlib.blake2b(kind, digest_size=16)
    out = []
    for start in range(0, len(data) - block + 1, block):
        h.update(encode(data[start:start + block]))
        out.append(h.copy().digest())
    return out


def _text(s: str) -> bytes:
    return s.encode("utf-8", "surrogatepass")


def chat_text(messages: list) -> str:
    """Messages as one string, each ``role NUL content NUL``: appending messages appends text."""
    parts = []
    for m in messages:
        content = m.get("content")
        parts.append(f"{m.get('role')}\0{content if isinstance(content, str) else repr(content)}\0")
    return "".join(parts)


def request_keys(request, block_chars: int = BLOCK_CHARS, block_tokens: int = BLOCK_TOKENS) -> Keys:
    """The routing keys of a request dict (``"prompt"``: str or list of ids, or
    ``"messages"``; optional ``"session_id"``). Anything else (not a dict, another
    prompt type) has no keys: routing never fails a request."""
    if not isinstance(request, dict):
        return Keys(None, [])
    session = request.get("session_id")
    session = str(session) if session not in (None, "") else None
    prompt, messages = request.get("prompt"), request.get("messages")
    try:
        if isinstance(messages, list):
            blocks = _prefix_digests(chat_text(messages), b"chat", block_chars, _text)
        elif isinstance(prompt, str):
            blocks = _prefix_digests(prompt, b"text", block_chars, _text)
        elif isinstance(prompt, list):
            blocks = _prefix_digests(prompt, b"ids", block_tokens, lambda ids: repr(ids).encode())
        else:
            blocks = []
    except Exception:  # an odd message (not a dict): no prefix keys
        blocks = []
    return Keys(session, blocks)


class AffinityPolicy:
    """Which replicas to offer a request, from the keys of the requests routed before and
    when each replica was last sent one. Replicas are any hashable ids."""

    def __init__(self, affinity_wait_s: float, max_keys: int = MAX_KEYS):
        self.affinity_wait_s = affinity_wait_s  # the app argument's (deployments.args.AppArgs)
        self.max_keys = max_keys
        self._table: OrderedDict = OrderedDict()  # key -> replica, least recently used first
        self._last_sent: dict[Hashable, float] = {}  # replica -> when it was last sent a request
        self._last_keys: dict[Hashable, Keys] = {}  # replica -> the keys of that request

    def __len__(self) -> int:
        return len(self._table)

    def preferred(self, keys: Keys, candidates) -> Hashable | None:
        """The session's replica, else the one holding the deepest block; only among ``candidates``."""
        return self._match(keys, candidates)[0]

    def _match(self, keys: Keys, candidates) -> tuple[Hashable | None, bool]:
        """(the preferred replica, whether it is worth waiting for: the session's, or one
        holding at least half of the request's blocks, not merely a shared beginning such
        as a system prompt)."""
        candidates = set(candidates)
        if keys.session is not None and self._table.get(("session", keys.session)) in candidates:
            return self._table[("session", keys.session)], True
        for depth in range(len(keys.blocks), 0, -1):  # deepest first; a replica that is no candidate does not count
            replica = self._table.get(keys.blocks[depth - 1])
            if replica in candidates:
                return replica, 2 * depth >= len(keys.blocks)
        return None, False

    def least_recently_sent(self, replicas) -> list:
        """``replicas`` by when they were last sent a request, longest ago (or never) first;
        ties in random order."""
        replicas = list(replicas)
        random.shuffle(replicas)
        return sorted(replicas, key=lambda r: self._last_sent.get(r, float("-inf")))

    def _idle_while_busy(self, replica: Hashable, busy: Hashable, keys: Keys) -> bool:
        """``replica`` has been sent nothing since ``busy`` got the request it is running,
        and that request is not this conversation's previous turn (about to end)."""
        if self._last_sent.get(replica, float("-inf")) >= self._last_sent.get(busy, float("-inf")):
            return False
        running = self._last_keys.get(busy)
        same_session = keys.session is not None and running is not None and running.session == keys.session
        continued = running is not None and bool(running.blocks) and keys.blocks[:len(running.blocks)] == running.blocks
        return not (same_session or continued)

    def ranks(self, keys: Keys, candidates: list, free: set, waited_s: float) -> list[list]:
        """Serve's ranks (tried in order) for a request that has waited ``waited_s``,
        ``free`` being the candidates free now. Its preferred replica, when free. When
        that one is busy: a free replica that has been sent nothing since (two
        conversations doubled up on one replica while another idles: this one moves, once),
        else the preferred replica alone while the request has waited less than
        affinity_wait_s, if it is worth waiting for (:meth:`_match`). After that, or with
        no preferred replica, the free replicas one
        by one, least recently sent first (a new conversation goes where no conversation
        went lately), and the busy ones last, together."""
        preferred, worth_waiting = self._match(keys, candidates)
        others = [c for c in self.least_recently_sent(candidates) if c != preferred]
        free_others = [c for c in others if c in free]
        if preferred is not None and preferred not in free:
            idle = [c for c in free_others if self._idle_while_busy(c, preferred, keys)]
            if idle:
                return [[c] for c in idle]
            if worth_waiting and waited_s < self.affinity_wait_s:
                return [[preferred]]
        order = ([preferred] if preferred in free else []) + free_others
        busy = [c for c in ([preferred] if preferred is not None else []) + others if c not in free]
        return [[c] for c in order] + ([busy] if busy else [])

    def record(self, keys: Keys, replica: Hashable) -> None:
        """``replica`` was sent a request with these keys: it holds them now."""
        self._last_sent[replica] = time.monotonic()
        self._last_keys[replica] = keys
        all_keys = ([("session", keys.session)] if keys.session is not None else []) + keys.blocks
        for key in all_keys:
            self._table[key] = replica
            self._table.move_to_end(key)
        while len(self._table) > self.max_keys:
            self._table.popitem(last=False)

    def forget(self, replica: Hashable) -> None:
        """``replica`` left: none of its keys count any more."""
        self._last_sent.pop(replica, None)
        self._last_keys.pop(replica, None)
        for key in [k for k, r in self._table.items() if r == replica]:
            del self._table[key]


class CacheAwareRouter(RequestRouter):
    """Serve's request router for the replicas (RequestRouterConfig(request_router_class=
    "deployments.routing.CacheAwareRouter", request_router_kwargs={"affinity_wait_s": ...})).
    It counts the requests it sent to each replica and not yet completed (replicas take
    one at a time), so it knows which are free, and a request that may take none of the
    free ones waits until this router sees a request complete (no polling). Other
    routers' requests (several ingress replicas) it learns of from Serve's queue-length
    cache and the replicas' rejections; while it sees no completion, Serve asks the
    replicas offered every BLIND_WAIT_S."""

    BLIND_WAIT_S = 0.1

    def initialize_state(self, affinity_wait_s: float, max_keys: int = MAX_KEYS):
        self.policy = AffinityPolicy(affinity_wait_s, max_keys)
        self.running: Counter = Counter()  # replica id -> requests this router sent there, not yet completed
        self._completion: asyncio.Future | None = None  # resolved at the next completion this router sees

    @staticmethod
    def _request_keys(pending_request: PendingRequest | None) -> Keys:
        if pending_request is None or not pending_request.args:
            return Keys(None, [])
        keys = getattr(pending_request, "_pace_routing_keys", None)  # once per request, not per attempt
        if keys is None:
            keys = pending_request._pace_routing_keys = request_keys(pending_request.args[0])
        return keys

    def _free(self, candidates: list[RunningReplica]) -> set:
        """The candidates free as far as this router knows: fewer of its requests there than
        the replica takes, and not full in Serve's queue-length cache."""
        available = {r.replica_id for r in self.select_available_replicas(candidates)}
        return {r.replica_id for r in candidates
                if r.replica_id in available and self.running[r.replica_id] < r.max_ongoing_requests}

    async def _next_completion(self, timeout_s: float) -> None:
        """Until this router sees a request complete on any replica, or ``timeout_s``."""
        if self._completion is None or self._completion.done():
            self._completion = asyncio.get_running_loop().create_future()
        try:
            await asyncio.wait_for(asyncio.shield(self._completion), max(timeout_s, 0.0))
        except asyncio.TimeoutError:
            pass

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        if not candidate_replicas:
            return []
        by_id = {r.replica_id: r for r in candidate_replicas}
        keys = self._request_keys(pending_request)
        created = pending_request.created_at if pending_request is not None else float("-inf")
        waited, free = time.time() - created, self._free(candidate_replicas)
        ranks = self.policy.ranks(keys, list(by_id), free, waited)
        offers_free = any(i in free for rank in ranks for i in rank)
        if not offers_free:
            # none it may take is free: until one of this router's requests ends (or a
            # while: another router's may have), then Serve asks the replicas offered
            preferred = self.policy.preferred(keys, by_id)
            left = self.policy.affinity_wait_s - waited if ranks == [[preferred]] else self.BLIND_WAIT_S
            await self._next_completion(min(self.BLIND_WAIT_S, left))
            waited, free = time.time() - created, self._free(candidate_replicas)
            ranks = self.policy.ranks(keys, list(by_id), free, waited)
        if pending_request is not None:
            # Serve backs off before asking again only when a replica thought free refused
            # (another router's request is there); the waiting for one is done above
            pending_request.routing_context.should_backoff = offers_free
        return [[by_id[i] for i in rank] for rank in ranks]

    def on_send_request(self, replica_id: ReplicaID) -> None:
        super().on_send_request(replica_id)
        self.running[replica_id] += 1  # until it completes, refused or not: Serve reports each exactly once

    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID, result) -> None:
        self.policy.record(self._request_keys(pending_request), replica_id)

    def on_request_completed(self, replica_id: ReplicaID, internal_request_id: str) -> None:
        if self.running[replica_id] > 0:
            self.running[replica_id] -= 1
        if self._completion is not None and not self._completion.done():
            self._completion.set_result(None)

    def update_replicas(self, replicas: list[RunningReplica]) -> None:
        gone = set(self.curr_replicas) - {r.replica_id for r in replicas}
        super().update_replicas(replicas)
        for replica_id in gone:
            self._forget(replica_id)

    def on_replica_actor_died(self, replica_id: ReplicaID) -> None:
        super().on_replica_actor_died(replica_id)
        self._forget(replica_id)

    def _forget(self, replica_id: ReplicaID) -> None:
        self.policy.forget(replica_id)
        self.running.pop(replica_id, None)
        if self._completion is not None and not self._completion.done():
            self._completion.set_result(None)  # whoever waited for it asks again
