"""Prefix KV reuse (pace_core.prefix_cache): outputs equal with the cache on and off, the
memory budget holds, and the block bookkeeping (sharing, LRU of leaves) is right."""
from __future__ import annotations

import pytest
import torch

from pace_core import LLMModel, PardSpecDecodeConfig, SamplingConfig
from pace_core.prefix_cache import BLOCK_TOKENS, PrefixCache

GREEDY = SamplingConfig(max_new_tokens=40, ignore_eos=True)
SAMPLED = SamplingConfig(max_new_tokens=40, ignore_eos=True, temperature=0.8, top_p=0.95, seed=7)
HISTORY = ("def add(a, b):\n    return a + b\n\n\nclass Stack:\n    def __init__(self):\n        self.items = []\n\n"
           "    def push(self, item):\n        self.items.append(item)\n\n    def pop(self):\n        return self.items.pop()\n")


@pytest.fixture(scope="module")
def models(tiny_pairs):
    """{(arch, pard): (model with the prefix cache, the same model without)}."""
    out = {}
    for arch, (target, draft) in tiny_pairs.items():
        for pard in (False, True):
            pard_config = PardSpecDecodeConfig(model_name_or_path=draft, num_speculative_tokens=4) if pard else None
            out[arch, pard] = tuple(LLMModel(target, dtype="float32", pard_config=pard_config, prefix_cache_gb=gb)
                                    for gb in (0.25, 0))
    return out


def _conversation(model: LLMModel, sampling: SamplingConfig) -> list:
    """Three turns, each prompt the previous prompt + part of (or all of) its answer +
    new text: turn 2's cached prefix ends inside turn 1's answer; turn 3 is longer than
    anything cached. Then a prompt that is a strict prefix of turn 1's."""
    outs = []
    ids = model.encode(HISTORY)
    for turn, extra in enumerate(["\n\ndef mul(x, y):\n", "\nprint(Stack().pop())\n", None]):
        out = model.generate(ids, sampling)
        outs.append(out)
        if extra is None:
            break
        answer = out.token_ids[: len(out.token_ids) // 2] if turn == 0 else out.token_ids
        ids = ids + answer + model.encode(extra)
    outs.append(model.generate(outs[0].prompt_token_ids[: 2 * BLOCK_TOKENS + 5], sampling))
    return outs


@pytest.mark.parametrize("pard", [False, True], ids=["plain", "pard"])
@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
@pytest.mark.parametrize("sampling", [GREEDY, SAMPLED], ids=["greedy", "sampled"])
def test_outputs_equal_with_and_without_the_cache(models, arch, pard, sampling):
    cached_model, plain_model = models[arch, pard]
    assert cached_model.prefix_cache is not None and plain_model.prefix_cache is None
    with_cache, without = _conversation(cached_model, sampling), _conversation(plain_model, sampling)
    for a, b in zip(with_cache, without):
        assert a.prompt_token_ids == b.prompt_token_ids
        assert a.token_ids == b.token_ids
        assert b.stats.num_cached_tokens == 0
    # turns 2, 3 and 4 kept what they share with the sequence served just before, token
    # by token, where the runners hold it (all of it but the last token; a draft lags by
    # up to a step: K + 1)
    for turn, out in enumerate(with_cache[1:], 1):
        before = with_cache[turn - 1]
        served = before.prompt_token_ids + before.token_ids
        common = next((i for i, (a, b) in enumerate(zip(served, out.prompt_token_ids)) if a != b),
                      min(len(served), len(out.prompt_token_ids)))
        most = min(common, len(out.prompt_token_ids) - 1)
        least = min(most, len(served) - 1 - (5 if pard else 0))
        assert least <= out.stats.num_cached_tokens <= most and out.stats.num_cached_tokens > 0
    assert with_cache[1].stats.num_cached_tokens > len(with_cache[0].prompt_token_ids)
    assert with_cache[3].stats.num_cached_tokens == 2 * BLOCK_TOKENS + 4  # all but its last token


def test_a_prompt_longer_than_any_entry_and_one_fully_cached(models):
    model, plain = models["qwen2", True]
    model.prefix_cache.clear()
    ids = model.encode(HISTORY)
    first = model.generate(ids, GREEDY)
    again = model.generate(ids, GREEDY)  # the whole prompt is cached but its last token runs
    assert again.token_ids == first.token_ids
    assert again.stats.num_cached_tokens == len(ids) - 1
    # a prefix ending inside the answer: the blocks reused reach past the prompt
    inside = ids + first.token_ids[:36] + model.encode("\n# and now")
    out = model.generate(inside, GREEDY)
    assert out.token_ids == plain.generate(inside, GREEDY).token_ids
    assert out.stats.num_cached_tokens > len(ids)
    longer = ids + first.token_ids + model.encode(HISTORY * 2)
    out = model.generate(longer, GREEDY)
    assert out.token_ids == plain.generate(longer, GREEDY).token_ids
    assert 0 < out.stats.num_cached_tokens < len(ids) + len(first.token_ids)


def test_memory_stays_within_the_budget(tiny_pairs):
    target, draft = tiny_pairs["llama"]
    model = LLMModel(target, dtype="float32", pard_config=PardSpecDecodeConfig(model_name_or_path=draft),
                     prefix_cache_gb=0)
    runners = [model.target, model.draft]
    block_bytes = sum(2 * r.num_layers * r.num_kv_heads * BLOCK_TOKENS * r.head_dim * 4 for r in runners)
    model.prefix_cache = cache = PrefixCache(budget_bytes=6 * block_bytes)
    plain = LLMModel(target, dtype="float32", pard_config=PardSpecDecodeConfig(model_name_or_path=draft),
                     prefix_cache_gb=0)
    prompts = [model.encode(f"# file {i}\n" + HISTORY) for i in range(4)]
    for ids in prompts + prompts[:1]:
        out = model.generate(ids, GREEDY)
        assert out.token_ids == plain.generate(ids, GREEDY).token_ids
        assert cache.stats.bytes <= cache.stats.budget_bytes
        assert cache.stats.bytes == sum(b.nbytes for b in cache.blocks.values()) == cache.stats.blocks * block_bytes
    assert cache.stats.evicted_blocks > 0
    # what is left is reachable: every block's parent is cached too
    assert all(b.parent is None or b.parent in cache.blocks.values() for b in cache.blocks.values())


class _ArrayRunner:
    """A runner whose 'KV' for a position is its token id, to check the bookkeeping."""

    def __init__(self):
        self.tokens: list[int] = []

    @property
    def seq_len(self) -> int:
        return len(self.tokens)

    def reset(self):
        self.tokens = []

    def read_kv(self, start, end):
        return torch.tensor(self.tokens[start:end], dtype=torch.float32).view(1, 1, 1, -1, 1).expand(2, 1, 1, -1, 1)

    def write_kv(self, kv):
        self.tokens = [int(x) for x in kv[0, 0, 0, :, 0]]
        self.writes += 1

    def drop_last(self, n):
        del self.tokens[len(self.tokens) - n:]

    writes = 0


def test_shared_blocks_are_stored_once_and_only_leaves_are_evicted():
    runner = _ArrayRunner()
    block_bytes = 2 * BLOCK_TOKENS * 4
    cache = PrefixCache(budget_bytes=5 * block_bytes)
    system = list(range(1000, 1000 + 2 * BLOCK_TOKENS))  # two shared blocks
    conversations = [system + [c] * (2 * BLOCK_TOKENS) for c in (1, 2)]
    for seq in conversations:
        assert cache.load(seq, [runner]) == (2 * BLOCK_TOKENS if seq is conversations[1] else 0)
        runner.tokens = list(seq)
        cache.store(seq, [runner])
    assert cache.stats.blocks == 5 and cache.stats.evicted_blocks == 1  # 2 shared + 2 + 2, one over budget
    # conversation 1's leaf went first; the shared blocks (used by both) stayed
    assert cache.load(conversations[0], [runner]) == 3 * BLOCK_TOKENS
    assert runner.tokens == conversations[0][: 3 * BLOCK_TOKENS]  # the loaded KV is the tokens' own
    assert cache.load(conversations[1], [runner]) == 3 * BLOCK_TOKENS  # never the block of the prompt's last token
    assert cache.stats.hits == 3 and cache.stats.queries == 4


def test_runner_without_kv_copy_has_no_cache(tiny_pairs):
    target, _ = tiny_pairs["qwen2"]
    model = LLMModel(target, dtype="float32", runner="transformers")
    assert model.prefix_cache is None and model.prefix_cache_stats() is None
    out = model.generate(HISTORY, GREEDY)
    assert out.stats.num_cached_tokens == 0 and len(out.token_ids) == GREEDY.max_new_tokens


def test_the_prefix_the_runners_still_hold_is_kept_in_place_token_by_token():
    """A prompt continuing the sequence just served keeps the runners' own KV, cut back to
    the common prefix (nothing copied, not rounded to blocks); after another sequence, or
    a failed request (store never ran), only the blocks can serve, copied in."""
    runner = _ArrayRunner()
    cache = PrefixCache(budget_bytes=1 << 20)
    served = list(range(100, 100 + 3 * BLOCK_TOKENS + 7))  # the prompt + the answer of a turn
    runner.tokens = list(served)
    cache.store(served, [runner])
    next_turn = served[:-3] + [7, 8, 9]  # the answer's last 3 tokens re-tokenized otherwise
    assert cache.load(next_turn, [runner]) == len(served) - 3
    assert runner.writes == 0 and runner.tokens == served[:-3]
    runner.tokens = list(next_turn)
    cache.store(next_turn, [runner])
    other = [5] * (2 * BLOCK_TOKENS)
    assert cache.load(other, [runner]) == 0  # nothing in common: the runners are left as they are
    runner.tokens = list(other)
    cache.store(other, [runner])
    assert cache.load(next_turn, [runner]) == 3 * BLOCK_TOKENS  # the blocks, copied in
    assert runner.writes == 1 and runner.tokens == next_turn[: 3 * BLOCK_TOKENS]
    # a request whose generation failed never stores: the runners hold nothing reusable
    assert cache.load(next_turn, [runner]) == 3 * BLOCK_TOKENS and runner.writes == 2

