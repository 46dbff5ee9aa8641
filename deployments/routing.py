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

The preferred replica of a request is its session's replica, else the one holding its
deepest block. While the request has waited less than ``affinity_wait_s`` only that
replica is offered to Serve (which waits, with backoff, for it to free up: replicas take
one request at a time); after that any replica takes it, the preferred one first. A
request with no preferred replica goes to the least loaded one (Serve's choice among all
replicas, in random order). Replicas that leave (downscaling, a dead actor) are
forgotten; new ones start with no keys and take requests that prefer no one.

:class:`AffinityPolicy` is the policy alone (no Ray; unit-tested in tests/test_routing.py);
:class:`CacheAwareRouter` plugs it into Serve as the replicas' request router
(deployments.app: ``RequestRouterConfig``). The table lives in the process of the
caller whose handle routes: the ingress Router, of which the app runs one replica.
"""
from __future__ import annotations

import hashlib
import random
import time
from collections import OrderedDict
from typing import Hashable, NamedTuple

from ray.serve.request_router import PendingRequest, ReplicaID, RequestRouter, RunningReplica

BLOCK_CHARS = 64  # characters per block of a text or chat prompt (~16 tokens)
BLOCK_TOKENS = 32  # ids per block of a token-id prompt (as pace_core.prefix_cache.BLOCK_TOKENS)


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
    """Which replicas to offer a request, from the keys of the requests routed before.
    Replicas are any hashable ids."""

    def __init__(self, affinity_wait_s: float = 0.5, max_keys: int = 100_000):
        self.affinity_wait_s = affinity_wait_s
        self.max_keys = max_keys
        self._table: OrderedDict = OrderedDict()  # key -> replica, least recently used first

    def __len__(self) -> int:
        return len(self._table)

    def preferred(self, keys: Keys, candidates) -> Hashable | None:
        """The session's replica, else the one holding the deepest block; only among ``candidates``."""
        candidates = set(candidates)
        if keys.session is not None and self._table.get(("session", keys.session)) in candidates:
            return self._table[("session", keys.session)]
        for key in reversed(keys.blocks):  # deepest first; a replica that is no candidate does not count
            if self._table.get(key) in candidates:
                return self._table[key]
        return None

    def ranks(self, keys: Keys, candidates: list, waited_s: float) -> list[list]:
        """Serve's ranks: the preferred replica alone while the request has waited less
        than affinity_wait_s, then it first and all others after; no preferred replica:
        all, in random order (Serve takes the least loaded)."""
        preferred = self.preferred(keys, candidates)
        others = [c for c in candidates if c != preferred]
        random.shuffle(others)
        if preferred is None:
            return [others]
        if waited_s < self.affinity_wait_s:
            return [[preferred]]
        return [[preferred], others]

    def record(self, keys: Keys, replica: Hashable) -> None:
        """``replica`` was sent a request with these keys: it holds them now."""
        all_keys = ([("session", keys.session)] if keys.session is not None else []) + keys.blocks
        for key in all_keys:
            self._table[key] = replica
            self._table.move_to_end(key)
        while len(self._table) > self.max_keys:
            self._table.popitem(last=False)

    def forget(self, replica: Hashable) -> None:
        """``replica`` left: none of its keys count any more."""
        for key in [k for k, r in self._table.items() if r == replica]:
            del self._table[key]


class CacheAwareRouter(RequestRouter):
    """Serve's request router for the replicas (RequestRouterConfig(request_router_class=
    "deployments.routing.CacheAwareRouter", request_router_kwargs={"affinity_wait_s": ...}))."""

    def initialize_state(self, affinity_wait_s: float = 0.5, max_keys: int = 100_000):
        self.policy = AffinityPolicy(affinity_wait_s, max_keys)

    @staticmethod
    def _request_keys(pending_request: PendingRequest | None) -> Keys:
        if pending_request is None or not pending_request.args:
            return Keys(None, [])
        # computed once per request, not at every routing attempt; kept on the request
        # itself: calls made while serving one request share its internal request id
        keys = getattr(pending_request, "_pace_routing_keys", None)
        if keys is None:
            keys = pending_request._pace_routing_keys = request_keys(pending_request.args[0])
        return keys

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        if pending_request is not None:
            # back off between attempts (Serve only does when the router says so)
            pending_request.routing_context.should_backoff = True
        if not candidate_replicas:
            return []
        by_id = {r.replica_id: r for r in candidate_replicas}
        waited = time.time() - pending_request.created_at if pending_request is not None else float("inf")
        ranks = self.policy.ranks(self._request_keys(pending_request), list(by_id), waited)
        return [[by_id[i] for i in rank] for rank in ranks]

    def _fulfill_next_pending_request(self, replica: RunningReplica, request_metadata=None) -> None:
        """The replica goes to the oldest pending request with the routed request's
        internal id: that request, or a sibling (calls made while serving one request,
        such as the prompts of one completion, share its id). Serve's default matches
        through an index holding one request per id, so a sibling's replica went to no
        one and its routing never ended; FIFOMixin would hand the replica to the oldest
        request, whichever replica that one prefers."""
        for pr in self._pending_requests_to_fulfill:
            if (not pr.future.done() and request_metadata is not None
                    and pr.metadata.internal_request_id == request_metadata.internal_request_id):
                self._cancel_routing_task_for_pending_request(pr)
                self._record_queue_wait_time(pr)
                pr.future.set_result(replica)
                self._remove_pending_request_from_indices(pr)
                self._pending_requests_to_fulfill.remove(pr)
                return

    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID, result) -> None:
        self.policy.record(self._request_keys(pending_request), replica_id)

    def update_replicas(self, replicas: list[RunningReplica]) -> None:
        gone = set(self._replica_id_set) - {r.replica_id for r in replicas}
        super().update_replicas(replicas)
        for replica_id in gone:
            self.policy.forget(replica_id)

    def on_replica_actor_died(self, replica_id: ReplicaID) -> None:
        super().on_replica_actor_died(replica_id)
        self.policy.forget(replica_id)
