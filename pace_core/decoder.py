"""The PARD speculative decoding loop; with no draft it is plain decoding.

Each step:
  1. the draft reads the accepted tokens it has not seen plus K-1 PARD (mask) tokens
     and proposes K tokens from its last K logits, in one forward pass; its cache then
     drops the masks, so it only ever holds real tokens;
  2. the target reads [tokens it has not seen] + the K proposals in one pass;
  3. proposals are kept while they equal the target's choice at the previous
     position, then the target's own choice is appended (the correction, or the bonus
     token when all K were kept);
  4. the target's cache is trimmed to the accepted length.
So every step emits 1..K+1 tokens, exactly the target's own greedy output (bit for bit
when the target computes each token's row alone, as the native runner does in every
weight format: a verify's logits are then the decode steps' logits). When sampling, step 3 is speculative sampling instead and the output is distributed exactly
as sampling from the target alone; the choices (and the logits processors behind them)
belong to the request's :class:`~pace_core.sampling.Sampler`.

With ``adaptive=True`` K is a cap: after a step that kept every proposal the next
step proposes twice as many (up to K), otherwise two more than were kept. Verify
positions the draft was unlikely to get right are not paid for, and the output is
unchanged (the draft is causal: its first j proposals do not depend on K); when
sampling, its distribution is (the random draws, and so a seed's tokens, differ with K).
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Iterator

from .configs import SamplingConfig
from .runner import CausalLMRunner
from .sampling import Sampler, TokenLogprobs


@dataclass
class Step:
    tokens: list[int]  # accepted proposals + the target's correction/bonus token
    num_proposed: int
    draft_s: float
    target_s: float
    logprobs: list[TokenLogprobs] | None = None  # one per token, when the request asks for them


def propose(draft: CausalLMRunner, unseen: list[int], k: int, pard_token: int, sampler: Sampler) -> list[int]:
    """K draft tokens from one forward pass over ``unseen`` + K-1 PARD tokens."""
    logits = draft.forward(unseen + [pard_token] * (k - 1), num_logits=k)
    draft.drop_last(k - 1)  # the draft's cache keeps real tokens only
    return sampler.propose(logits)


def next_k(k_max: int, proposed: int, kept: int) -> int:
    """Adaptive K: double it after a step that kept every proposal, else propose two
    more than were kept; always within 1..k_max."""
    return max(1, min(k_max, 2 * proposed if kept == proposed else kept + 2))


def decode(
    target: CausalLMRunner,
    prompt_ids: list[int],
    max_new_tokens: int,
    draft: CausalLMRunner | None = None,
    k: int = 0,
    pard_token: int | None = None,
    sampler: Sampler | None = None,
    adaptive: bool = False,
    cached: int = 0,
) -> Iterator[Step]:
    """Yield the tokens accepted at each step until ``max_new_tokens`` are produced
    (greedy unless a ``sampler`` says otherwise). The caller stops early (EOS, stop
    strings) simply by not asking for more. ``cached``: the runners already hold the
    first ``cached`` prompt tokens (a reused prefix); otherwise they start empty."""
    sampler = sampler or Sampler(SamplingConfig(), prompt_ids, target.vocab_limit)
    if not cached:
        for runner in (target, draft) if draft is not None else (target,):
            runner.reset()
    target_unseen, draft_unseen = list(prompt_ids[cached:]), list(prompt_ids[cached:])
    produced, k_next = 0, k
    while produced < max_new_tokens:
        # never propose beyond the last token we may emit
        k_step = min(k_next, max_new_tokens - produced - 1) if draft is not None else 0
        t0 = t1 = time.perf_counter()
        proposal = []
        if k_step:
            proposal, draft_unseen = propose(draft, draft_unseen, k_step, pard_token, sampler), []
            t1 = time.perf_counter()
        logits = target.forward(target_unseen + proposal, num_logits=k_step + 1)
        accepted, logprobs = sampler.verify(logits, proposal)
        n = len(accepted) - 1  # proposals kept
        target.drop_last(k_step - n)  # drop the rejected proposals
        t2 = time.perf_counter()
        if adaptive and k_step:
            k_next = next_k(k, k_step, n)
        target_unseen = accepted[-1:]
        draft_unseen += accepted
        produced += len(accepted)
        yield Step(accepted, k_step, t1 - t0, t2 - t1, logprobs)
