"""Prefix KV reuse: a new request starts from the longest cached prefix of its prompt.

A chat client resends the whole conversation every turn; on a CPU, prefilling it is
most of the time to first token. After each request the engine keeps the target's (and
the draft's) KV of the token sequence it served, in blocks of ``BLOCK_TOKENS`` tokens;
a later prompt that starts with the same blocks gets their KV copied back into the
runners and prefills only the rest (as vLLM's automatic prefix caching, block-granular).

A block is identified by its tokens and its parent block, so a match is exact (no
hashes to collide) and blocks shared by several sequences (a system prompt, the earlier
turns of a conversation) are stored once. Memory stays within a budget: the least
recently used block goes first, and since every use of a block also uses its parents
(after it), a block is always more recent than its descendants, so eviction only ever
removes leaves.

The output does not change: in float32 every row of a forward is computed alone by the
few-rows kernels (:mod:`pace_core.lean`), so K/V computed in an earlier request are
bit-identical to those a full prefill would compute. (In bfloat16 prompts longer than
64 tokens run through torch's GEMM, whose rounding can depend on the row count: a near
tie may then resolve differently with and without the cache, as in any engine that
batches differently.)

Between requests the runners still hold the KV of the sequence they last served, so a
prompt that continues it (a conversation's next turn on the replica that served the
previous one) keeps that KV where it is: the runners are cut back to the longest common
prefix, token by token, with nothing copied (:meth:`PrefixCache.load`); the blocks are
the fallback for anything else.

Runners take part when they can copy their cache out and in (``read_kv`` /
``write_kv``: the lean runner); with another runner the cache stays empty.
"""
from __future__ import annotations

import os
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is imported where KV is copied: the serving router imports BLOCK_TOKENS only
    import torch

BLOCK_TOKENS = 32  # tokens per cached block: a prompt reuses whole blocks only
AUTO_MAX_BYTES = 4 << 30
AUTO_MEMORY_FRACTION = 0.05


def auto_budget_bytes() -> int:
    """The default budget: 5% of the host's memory, at most 4 GiB (one replica per
    NUMA slot: 8 slots of a 512 GB host keep 32 GB of KV; 2 replicas here, 2.4 GB)."""
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        total = 16 << 30
    return int(min(AUTO_MAX_BYTES, AUTO_MEMORY_FRACTION * total))


@dataclass(eq=False)
class Block:
    id: int
    parent: "Block | None"
    tokens: tuple[int, ...]
    kv: list[torch.Tensor]  # per runner: (2, layers, kv_heads, BLOCK_TOKENS, head_dim)
    children: int = 0
    nbytes: int = field(init=False)

    def __post_init__(self):
        self.nbytes = sum(t.nbytes for t in self.kv)

    @property
    def key(self) -> tuple[int, tuple[int, ...]]:
        """Its key in the cache: its parent's id (0 at the start) and its tokens."""
        return (self.parent.id if self.parent else 0, self.tokens)


@dataclass
class PrefixCacheStats:
    queries: int = 0  # requests that looked up the cache
    hits: int = 0  # of those, requests that reused at least one block
    prompt_tokens: int = 0  # prompt tokens of those requests
    cached_tokens: int = 0  # prompt tokens whose KV came from the cache (prefill saved)
    blocks: int = 0
    bytes: int = 0
    budget_bytes: int = 0
    evicted_blocks: int = 0

    @property
    def hit_rate(self) -> float:
        return self.hits / self.queries if self.queries else 0.0

    def to_dict(self) -> dict:
        return {**self.__dict__, "hit_rate": self.hit_rate, "block_tokens": BLOCK_TOKENS}


class PrefixCache:
    """Blocks of KV for the token sequences served, within ``budget_bytes``."""

    def __init__(self, budget_bytes: int):
        self.blocks: OrderedDict[tuple[int, tuple[int, ...]], Block] = OrderedDict()  # LRU first
        self.stats = PrefixCacheStats(budget_bytes=budget_bytes)
        self._next_id = 1
        # what the runners hold since the last store: (the runners, the tokens whose KV
        # every one of them holds); None once a load consumed it (or a request failed)
        self._resident: tuple[list, list[int]] | None = None

    @staticmethod
    def usable(runners) -> bool:
        """Whether ``runners`` can copy their KV out and in (checked at each use too: a
        runner can be swapped after loading, as the benchmarks' oracle draft is)."""
        return all(hasattr(r, "read_kv") and hasattr(r, "write_kv") for r in runners)

    def _path(self, token_ids: list[int], max_tokens: int) -> list[Block]:
        """The cached blocks that start ``token_ids``, covering at most ``max_tokens``."""
        path: list[Block] = []
        for start in range(0, max_tokens - BLOCK_TOKENS + 1, BLOCK_TOKENS):
            block = self.blocks.get((path[-1].id if path else 0, tuple(token_ids[start : start + BLOCK_TOKENS])))
            if block is None:
                break
            path.append(block)
        return path

    def _touch(self, path: list[Block]) -> None:
        for block in reversed(path):  # parents end up more recent than their children
            self.blocks.move_to_end(block.key)

    def load(self, prompt_ids: list[int], runners: list) -> int:
        """Give ``runners`` the KV of the longest reusable prefix of the prompt, leaving at
        least its last token to compute, whose logits start decoding; return how many
        tokens that is (0: the runners are untouched, and decoding starts them afresh).
        The prefix the runners still hold from the last stored sequence stays in place
        (they are cut back to it: no copy, token-exact); else, or when the cached blocks
        reach further, the blocks' KV is copied in (their whole sequence then:
        :meth:`LeanRunner.write_kv`)."""
        resident, self._resident = self._resident, None  # the runners change from here on
        if not self.usable(runners):
            return 0
        limit = len(prompt_ids) - 1
        path = self._path(prompt_ids, limit)
        self.stats.queries += 1
        self.stats.prompt_tokens += len(prompt_ids)
        kept = 0
        if resident is not None and len(resident[0]) == len(runners) and all(
                a is b for a, b in zip(resident[0], runners)):
            held = resident[1]
            while kept < min(limit, len(held)) and held[kept] == prompt_ids[kept]:
                kept += 1
        if path:
            self._touch(path)
        if kept > len(path) * BLOCK_TOKENS:
            for runner in runners:
                runner.drop_last(runner.seq_len - kept)
            cached = kept
        elif path:
            import torch

            for i, runner in enumerate(runners):
                runner.write_kv(torch.cat([block.kv[i] for block in path], dim=3))
            cached = len(path) * BLOCK_TOKENS
        else:
            return 0
        self.stats.hits += 1
        self.stats.cached_tokens += cached
        return cached

    def store(self, token_ids: list[int], runners: list) -> None:
        """Keep the KV of the whole blocks of ``token_ids`` that every runner holds
        (the runners' caches hold a prefix of ``token_ids``), evicting the least
        recently used blocks beyond the budget."""
        if not self.usable(runners):
            return
        held = min([len(token_ids)] + [r.seq_len for r in runners])
        self._resident = (list(runners), list(token_ids[:held]))
        path = self._path(token_ids, held)
        self._touch(path)
        first_new = len(path) * BLOCK_TOKENS
        n_new = (held - first_new) // BLOCK_TOKENS
        if n_new <= 0:
            return
        end = first_new + n_new * BLOCK_TOKENS
        kv = [r.read_kv(first_new, end).split(BLOCK_TOKENS, dim=3) for r in runners]
        on_path = {id(b) for b in path}
        for j in range(n_new):
            start = first_new + j * BLOCK_TOKENS
            parent = path[-1] if path else None
            block = Block(self._next_id, parent, tuple(token_ids[start : start + BLOCK_TOKENS]),
                          [parts[j].clone() for parts in kv])
            if not self._make_room(block.nbytes, on_path):
                break
            self._next_id += 1
            self.blocks[block.key] = block
            if parent is not None:
                parent.children += 1
            self.stats.blocks += 1
            self.stats.bytes += block.nbytes
            path.append(block)
            on_path.add(id(block))
        self._touch(path)

    def _make_room(self, nbytes: int, keep: set[int]) -> bool:
        """Evict least recently used blocks until ``nbytes`` more fit the budget; False
        if they cannot without evicting a block of ``keep`` (the path being stored)."""
        while self.stats.bytes + nbytes > self.stats.budget_bytes:
            if not self.blocks:
                return False
            key, block = next(iter(self.blocks.items()))
            if id(block) in keep:
                return False
            assert block.children == 0, "the LRU block is always a leaf"
            del self.blocks[key]
            if block.parent is not None:
                block.parent.children -= 1
            self.stats.blocks -= 1
            self.stats.bytes -= block.nbytes
            self.stats.evicted_blocks += 1
        return True

    def clear(self) -> None:
        self.blocks.clear()
        self._resident = None
        self.stats.blocks = self.stats.bytes = 0
