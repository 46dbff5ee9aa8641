"""Choosing tokens for one request: its logits processors, greedy or sampled choices, and
the speculative-sampling rule that keeps PARD's output exact.

Processors, in this order (transformers' and vLLM's), identical for the draft's and the
target's logits: ``logit_bias``; ``min_new_tokens`` (stop ids masked until that many
tokens are out); ``repetition_penalty`` (transformers: every token of the prompt and the
output, a logit divided by it, or multiplied when negative); ``presence_penalty`` and
``frequency_penalty`` (OpenAI, as vLLM: the output's tokens, once / per occurrence);
then, when sampling, transformers' warpers ``temperature``, ``top_k``, ``top_p``,
``min_p``. Position by position: row i of a verify pass counts the output so far plus
the proposals before row i, so a penalty sees exactly what sampling from the target
alone would have seen.

Speculative sampling (Leviathan et al. 2023; Chen et al. 2023) on the PARD pass: the
draft proposes d_i ~ q_i (its processed distribution at row i); the target keeps d_i with
probability min(1, p_i(d_i) / q_i(d_i)); at the first rejection it draws the token from
normalize(max(0, p_i - q_i)); after K kept, a bonus token from p_{K+1}. Every emitted
token is then distributed exactly as if sampled from the target alone. Greedy
(temperature 0) is the special case where both choose their argmax, and with no
processors the choices are the raw logits' argmax, as they always were.

One ``torch.Generator`` per request draws everything (the draft's proposals, the
acceptance tests, the residual and bonus tokens) in a fixed order: a request with a
seed gives the same tokens every time with the same model and speculation settings.
"""
from __future__ import annotations

import torch

from .configs import SamplingConfig

NEG_INF = float("-inf")
LOGPROB_FLOOR = -9999.0  # logprob reported for a token the processors removed (JSON has no -inf), as vLLM

# (chosen token, its logprob, [(one of the most likely tokens, its logprob), ...])
TokenLogprobs = tuple[int, float, list[tuple[int, float]]]


def warp(logits: torch.Tensor, temperature: float, top_k: int = 0, top_p: float = 1.0, min_p: float = 0.0):
    """transformers' TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper and
    MinPLogitsWarper, in that order; removed tokens get -inf."""
    logits = logits / temperature
    if top_k:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, NEG_INF)
    if top_p < 1.0:
        ascending, order = logits.sort(dim=-1)
        drop = ascending.softmax(dim=-1).cumsum(dim=-1) <= 1 - top_p
        drop[..., -1] = False  # the most likely token always stays
        logits = logits.masked_fill(drop.scatter(-1, order, drop), NEG_INF)
    if min_p:
        probs = logits.softmax(dim=-1)
        logits = logits.masked_fill(probs < min_p * probs.amax(dim=-1, keepdim=True), NEG_INF)
    return logits


def residual(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """normalize(max(0, p - q)): what a rejected position draws from. When nothing is
    left (p == q, where a rejection has probability 0 but for rounding) it is p."""
    r = (p - q).clamp(min=0)
    total = r.sum()
    return r / total if total > 0 else p


class Sampler:
    """One request's token choices. ``propose`` turns the draft's K logits into K
    proposals, ``verify`` turns the target's K+1 logits into the emitted tokens (and
    their logprobs when asked) and records them for the penalties."""

    def __init__(self, config: SamplingConfig, prompt_ids: list[int], vocab_size: int, stop_token_ids=()):
        self.config = c = config
        self.greedy = c.greedy
        self.vocab_size = vocab_size
        self.generator = torch.Generator()
        if c.seed is not None:
            self.generator.manual_seed(c.seed)
        else:
            self.generator.seed()
        self.num_output = 0
        self.bias = self.seen = self.counts = self.min_tokens_stop = None
        if c.logit_bias:
            self.bias = torch.zeros(vocab_size)
            self.bias[list(c.logit_bias)] = torch.tensor(list(c.logit_bias.values()))
        if c.min_new_tokens and stop_token_ids:
            self.min_tokens_stop = sorted(t for t in stop_token_ids if t < vocab_size)
        if c.repetition_penalty != 1.0:
            self.seen = torch.zeros(vocab_size, dtype=torch.bool)
            self.seen[[t for t in prompt_ids if t < vocab_size]] = True  # (a prompt may hold padding ids)
        if c.presence_penalty or c.frequency_penalty:
            self.counts = torch.zeros(vocab_size)
        self.processes = not self.greedy or any(x is not None for x in (self.bias, self.min_tokens_stop, self.seen,
                                                                         self.counts))
        self.q: list[torch.Tensor] = []  # the draft's distributions at this step's proposals

    # ------------------------------------------------------------------ processors
    def process(self, logits: torch.Tensor, before: list[int] = (), start: int = 0) -> torch.Tensor:
        """Processed logits, shape (n, vocab_size): row r as the next-token logits after the
        output so far plus ``before[:start + r]`` (the proposals ahead of that position)."""
        n, width = logits.shape
        if width < self.vocab_size:  # a draft with fewer ids: those it lacks get probability 0
            logits = torch.nn.functional.pad(logits, (0, self.vocab_size - width), value=NEG_INF)
        c = self.config
        if self.bias is not None:
            logits = logits + self.bias
        if self.min_tokens_stop is not None:
            rows = max(0, min(n, c.min_new_tokens - self.num_output - start))
            if rows:
                logits = logits.clone()
                logits[:rows, self.min_tokens_stop] = NEG_INF
        if self.seen is not None or self.counts is not None:
            pairs = [(r, t) for r in range(n) for t in before[: start + r]]
            rows, cols = (torch.tensor(x, dtype=torch.long) for x in zip(*pairs)) if pairs else (None, None)
        if self.seen is not None:
            seen = self.seen.expand(n, -1).clone()
            if pairs:
                seen[rows, cols] = True
            p = c.repetition_penalty
            logits = torch.where(seen, torch.where(logits < 0, logits * p, logits / p), logits)
        if self.counts is not None:
            counts = self.counts.expand(n, -1).clone()
            if pairs:
                counts.index_put_((rows, cols), torch.ones(len(pairs)), accumulate=True)
            logits = logits - c.frequency_penalty * counts - c.presence_penalty * (counts > 0)
        if not self.greedy:
            logits = warp(logits, c.temperature, c.top_k, c.top_p, c.min_p)
        return logits

    def _draw(self, probs: torch.Tensor) -> int:
        """A token from ``probs`` (weights, not necessarily normalized) by inverse CDF: one
        uniform draw, ~20x cheaper than torch.multinomial at a 152k vocabulary; the CDF is
        summed in float64, so rounding moves no token's probability by more than ~1e-16."""
        cdf = probs.cumsum(dim=0, dtype=torch.float64)
        u = torch.rand((), generator=self.generator, dtype=torch.float64)
        token = int(torch.searchsorted(cdf, u * cdf[-1], right=True))
        if token >= len(probs):  # u * total rounded up to the total: the last token that has weight
            token = int(probs.nonzero()[-1])
        return token

    # ------------------------------------------------------------------ the two halves of a step
    def propose(self, logits: torch.Tensor) -> list[int]:
        """The draft's proposals from its K logits rows: each row processed after the
        proposals before it, then its argmax (greedy) or a draw from it (kept as q_i)."""
        self.q = []
        if not self.processes:
            return logits.argmax(dim=-1).tolist()
        if self.seen is None and self.counts is None:  # no row depends on the proposals before it
            return self._choose(self.process(logits))
        proposal: list[int] = []
        for i in range(logits.shape[0]):
            proposal += self._choose(self.process(logits[i : i + 1], proposal, start=i))
        return proposal

    def _choose(self, rows: torch.Tensor) -> list[int]:
        if self.greedy:
            return rows.argmax(dim=-1).tolist()
        self.q += list(rows.softmax(dim=-1))
        return [self._draw(q) for q in self.q[-len(rows):]]

    def verify(self, logits: torch.Tensor, proposal: list[int]) -> tuple[list[int], list[TokenLogprobs] | None]:
        """The tokens this step emits, from the target's K+1 logits rows over the proposal:
        the kept proposals, then the correction (or the bonus token when all were kept);
        and their logprobs under the target's processed distribution when asked."""
        rows = self.process(logits, proposal) if self.processes else logits
        if self.greedy:
            choices = rows.argmax(dim=-1).tolist()
            n = 0
            while n < len(proposal) and proposal[n] == choices[n]:
                n += 1
            tokens = proposal[:n] + [choices[n]]
        else:
            tokens = self._speculative_sampling(rows.softmax(dim=-1), proposal)
        logprobs = self._logprobs(rows[: len(tokens)], tokens) if self.config.logprobs is not None else None
        self._record(tokens)
        return tokens, logprobs

    def _speculative_sampling(self, p: torch.Tensor, proposal: list[int]) -> list[int]:
        k = len(proposal)
        if k:
            # keep d_i with probability min(1, p_i(d_i) / q_i(d_i)): u_i * q_i(d_i) < p_i(d_i), u_i ~ U[0, 1)
            q_of_d = torch.stack([q[d] for q, d in zip(self.q, proposal)])
            kept = (torch.rand(k, generator=self.generator) * q_of_d < p[torch.arange(k), proposal]).tolist()
            if not all(kept):
                n = kept.index(False)  # the first rejection: its token from the residual
                return proposal[:n] + [self._draw(residual(p[n], self.q[n]))]
        return proposal + [self._draw(p[k])]

    def _logprobs(self, rows: torch.Tensor, tokens: list[int]) -> list[TokenLogprobs]:
        logprobs = rows.log_softmax(dim=-1).clamp(min=LOGPROB_FLOOR)
        out = []
        for row, token in zip(logprobs, tokens):
            top = torch.topk(row, self.config.logprobs) if self.config.logprobs else None
            alternatives = list(zip(top.indices.tolist(), top.values.tolist())) if top is not None else []
            out.append((token, float(row[token]), alternatives))
        return out

    def _record(self, tokens: list[int]) -> None:
        """The emitted tokens join the output the penalties count."""
        self.num_output += len(tokens)
        if self.seen is not None:
            self.seen[tokens] = True
        if self.counts is not None:
            self.counts.index_put_((torch.tensor(tokens),), torch.ones(len(tokens)), accumulate=True)
