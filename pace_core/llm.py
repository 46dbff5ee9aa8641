"""LLMModel: a target model with an optional PARD draft, behind generate / stream / chat."""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import torch

from .configs import ModelConfig, PardSpecDecodeConfig, SamplingConfig
from .decoder import decode
from .loading import (
    ModelLoadError,
    check_same_tokenizer,
    context_length,
    load_causal_lm,
    load_tokenizer,
    read_pard_token,
    sampling_defaults,
    stop_token_ids,
)
from .prefix_cache import PrefixCache, auto_budget_bytes
from .runner import make_runner
from .sampling import Sampler
from .stopping import OutputBuilder

logger = logging.getLogger(__name__)

__all__ = ["LLMModel", "PardSpecDecodeConfig", "SamplingConfig", "GenerationOutput", "GenerationStats", "StreamChunk"]


class RequestError(ValueError):
    """A request this model cannot serve as asked (e.g. longer than its context)."""


@dataclass
class GenerationStats:
    steps: int = 0
    tokens_per_step: list[int] = field(default_factory=list)  # tokens emitted per step (incl. correction)
    drafts_proposed_per_step: list[int] = field(default_factory=list)  # draft tokens proposed (K of the step; 0: plain)
    drafts_accepted_per_step: list[int] = field(default_factory=list)  # of those, accepted by the target (bonus apart)
    step_end_s: list[float] = field(default_factory=list)  # when each step's tokens were out, since the start
    draft_time_s: float = 0.0
    target_time_s: float = 0.0
    time_to_first_token_s: float = 0.0
    total_time_s: float = 0.0
    num_cached_tokens: int = 0  # prompt tokens whose KV came from the prefix cache (not prefilled)

    @property
    def num_tokens(self) -> int:
        return sum(self.tokens_per_step)

    @property
    def mean_accepted_length(self) -> float:
        return self.num_tokens / self.steps if self.steps else 0.0

    @property
    def tokens_per_s(self) -> float:
        return self.num_tokens / self.total_time_s if self.total_time_s > 0 else 0.0

    def to_dict(self) -> dict:
        return {
            "steps": self.steps,
            "tokens_per_step": list(self.tokens_per_step),
            "drafts_proposed_per_step": list(self.drafts_proposed_per_step),
            "drafts_accepted_per_step": list(self.drafts_accepted_per_step),
            "step_end_s": list(self.step_end_s),
            "mean_accepted_length": self.mean_accepted_length,
            "draft_time_s": self.draft_time_s,
            "target_time_s": self.target_time_s,
            "time_to_first_token_s": self.time_to_first_token_s,
            "total_time_s": self.total_time_s,
            "tokens_per_s": self.tokens_per_s,
            "num_cached_tokens": self.num_cached_tokens,
        }


@dataclass
class StreamChunk:
    token_ids: list[int]  # new tokens in this chunk
    text: str  # new text (UTF-8 safe; empty when return_text=False)
    finish_reason: str | None  # "stop" / "length" on the last chunk
    stats: GenerationStats  # running stats (final on the last chunk)
    logprobs: list[dict] | None = None  # per token, when asked (SamplingConfig.logprobs): see LLMModel


@dataclass
class GenerationOutput:
    text: str | None
    token_ids: list[int]
    finish_reason: str
    prompt_token_ids: list[int]
    stats: GenerationStats
    logprobs: list[dict] | None = None  # per token, when asked (SamplingConfig.logprobs): see LLMModel

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)


class LLMModel:
    """A target LLM, optionally with a PARD draft for speculative decoding.

    >>> model = LLMModel("path/to/target", dtype="float32",
    ...                  pard_config=PardSpecDecodeConfig(model_name_or_path="path/to/draft"))
    >>> model.generate("def fib(n):", SamplingConfig(max_new_tokens=32)).text

    Sampling fields a request leaves unset take the checkpoint's defaults from its
    ``generation_config.json`` (``model.sampling_defaults``), as transformers and vLLM do;
    ``generation_config_defaults=False`` turns that off. With ``SamplingConfig(logprobs=n)``
    each output token comes with ``{"token_id", "token", "logprob", "top_logprobs":
    [{"token_id", "token", "logprob"}, ...n]}`` under the target's processed distribution
    (penalties, bias, temperature and truncation applied; with temperature 0 the penalized
    logits at temperature 1); a token the processors removed reports -9999.
    """

    def __init__(
        self,
        model_name_or_path: str,
        dtype: str | torch.dtype = "auto",
        pard_config: PardSpecDecodeConfig | None = None,
        tokenizer_name_or_path: str | None = None,
        trust_remote_code: bool = False,
        num_threads: int | None = None,
        runner: str = "auto",
        spec_config: PardSpecDecodeConfig | None = None,  # AMD PACE's name for pard_config
        generation_config_defaults: bool = True,
        prefix_cache_gb: float | None = None,
    ):
        if isinstance(dtype, torch.dtype):
            dtype = str(dtype).removeprefix("torch.")
        if spec_config is not None and pard_config is not None:
            raise ValueError("pass either pard_config or spec_config (its AMD PACE alias), not both")
        self.config = ModelConfig(
            model_name_or_path=model_name_or_path,
            dtype=dtype,
            tokenizer_name_or_path=tokenizer_name_or_path,
            pard_config=pard_config or spec_config,
            trust_remote_code=trust_remote_code,
            num_threads=num_threads,
            runner=runner,
            generation_config_defaults=generation_config_defaults,
            prefix_cache_gb=prefix_cache_gb,
        )
        if num_threads:
            torch.set_num_threads(num_threads)
        cfg = self.config
        t0 = time.perf_counter()
        self.tokenizer = load_tokenizer(cfg.tokenizer_name_or_path or cfg.model_name_or_path, cfg.trust_remote_code)
        target = load_causal_lm(cfg.model_name_or_path, cfg.dtype, cfg.trust_remote_code)
        # ids past the tokenizer are embedding padding (Qwen: 152064 rows, 151665 tokens):
        # never emitted, as transformers' suppress_tokens would have it
        self.target = make_runner(target, cfg.runner, vocab_limit=min(target.config.vocab_size, len(self.tokenizer)))
        self.stop_token_ids = stop_token_ids(target, self.tokenizer)
        self.max_context = context_length(target.config)
        # the sampling fields of generation_config.json: defaults of requests that leave them unset
        self.sampling_defaults = {}
        if cfg.generation_config_defaults:
            self.sampling_defaults = sampling_defaults(getattr(target, "generation_config", None), cfg.model_name_or_path)
        if self.sampling_defaults:
            logger.info("sampling defaults from %s's generation_config.json: %s", cfg.model_name_or_path,
                        self.sampling_defaults)
        self.draft = None  # a runner like self.target, when a PARD draft is configured
        self.draft_context: int | None = None
        self.pard_token: int | None = None
        self.num_speculative_tokens = 0  # K (the cap, when adaptive); 0 = plain decoding
        self.speculation_schedule = "fixed"  # or "adaptive"; both settable between requests
        if cfg.pard_config is not None:
            self._load_draft(cfg.pard_config)
            self.num_speculative_tokens = cfg.pard_config.num_speculative_tokens
            self.speculation_schedule = cfg.pard_config.speculation_schedule
        budget = auto_budget_bytes() if cfg.prefix_cache_gb is None else int(cfg.prefix_cache_gb * (1 << 30))
        self.prefix_cache = PrefixCache(budget) if budget else None
        if self.prefix_cache and not PrefixCache.usable(self._runners):
            logger.info("no prefix cache: the %s runner cannot copy its KV out and in", cfg.runner)
            self.prefix_cache = None
        self._lock = threading.Lock()
        logger.info("loaded %s%s in %.1fs", cfg.model_name_or_path,
                    f" + PARD draft {cfg.pard_config.model_name_or_path}" if self.draft else "", time.perf_counter() - t0)

    def _load_draft(self, pard: PardSpecDecodeConfig) -> None:
        cfg = self.config
        draft = load_causal_lm(pard.model_name_or_path, cfg.dtype, cfg.trust_remote_code)
        try:
            draft_tokenizer = load_tokenizer(pard.model_name_or_path, cfg.trust_remote_code)
        except Exception:  # a draft shipped without tokenizer files
            logger.warning("the draft %s has no tokenizer: checking vocabulary sizes only", pard.model_name_or_path)
        else:
            check_same_tokenizer(self.tokenizer, draft_tokenizer)
        self.pard_token = read_pard_token(draft.config, pard.pard_token)
        # padded embeddings (e.g. 151936 vs 152064): propose only ids the target may emit;
        # a reduced draft vocabulary: only the first draft_vocab_size of them
        limit = min(draft.config.vocab_size, self.target.vocab_limit, pard.draft_vocab_size or draft.config.vocab_size)
        if draft.config.vocab_size < len(self.tokenizer) - 1:
            raise ModelLoadError(
                f"the draft's vocabulary ({draft.config.vocab_size}) is smaller than the tokenizer's ({len(self.tokenizer)}): "
                "a PARD draft must share its target's tokenizer"
            )
        self.draft = make_runner(draft, cfg.runner, vocab_limit=limit)
        self.draft_context = context_length(draft.config)

    # ---------------------------------------------------------------- helpers
    @property
    def _runners(self) -> list:
        return [self.target] + ([self.draft] if self.draft is not None else [])

    def prefix_cache_stats(self) -> dict | None:
        """Hits, prompt tokens, cached tokens (prefill saved), blocks and bytes of the
        prefix cache since loading; None without one."""
        return self.prefix_cache.stats.to_dict() if self.prefix_cache else None

    @property
    def dtype(self) -> torch.dtype:
        """The target's weights' dtype (``dtype="auto"`` resolved)."""
        return self.target.model.dtype

    @property
    def forward_kind(self) -> str:
        """How the target's forward runs: ``lean-native`` (C++ layer loop), ``lean-python``
        or ``transformers`` (see ``runner=`` and :mod:`pace_core.native`)."""
        if hasattr(self.target, "native"):
            return "lean-native" if self.target.native else "lean-python"
        return "transformers"

    def get_tokenizer(self):
        return self.tokenizer

    def encode(self, prompt: str | Sequence[int]) -> list[int]:
        if isinstance(prompt, str):
            if not prompt:
                raise RequestError("the prompt is empty: give at least one character or token id")
            return self.tokenizer.encode(prompt, add_special_tokens=True)
        ids = [int(t) for t in (prompt.tolist() if hasattr(prompt, "tolist") else prompt)]
        if not ids:
            raise RequestError("the prompt is empty: give at least one token id")
        vocab = self.target.model.config.vocab_size
        bad = [t for t in ids if not 0 <= t < vocab]
        if bad:
            raise RequestError(f"prompt token ids {bad[:5]} are outside the vocabulary (0..{vocab - 1})")
        return ids

    def apply_chat_template(self, messages: list[dict]) -> list[int]:
        if not getattr(self.tokenizer, "chat_template", None):
            raise RequestError("this model's tokenizer has no chat template: use generate() with a plain prompt")
        try:
            ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        except Exception as err:  # a template that rejects these messages (roles, order, ...)
            raise RequestError(f"the chat template rejected these messages: {err}") from None
        if hasattr(ids, "keys"):  # a BatchEncoding in newer transformers
            ids = ids["input_ids"]
        return list(ids)

    def check_request(self, prompt_ids: list[int], sampling: SamplingConfig) -> SamplingConfig:
        """Raise RequestError for what this model cannot do, before any work; return the
        settings the request runs with (the model's defaults for the fields it leaves unset)."""
        sampling = sampling.with_defaults(self.sampling_defaults)
        for name, limit in (("target", self.max_context), ("draft", self.draft_context if self.draft else None)):
            if limit and len(prompt_ids) + sampling.max_new_tokens > limit:
                raise RequestError(
                    f"prompt ({len(prompt_ids)} tokens) + max_new_tokens ({sampling.max_new_tokens}) exceeds the {name}'s "
                    f"context length of {limit} tokens: shorten the prompt or lower max_new_tokens"
                )
        vocab = self.target.vocab_limit
        bad = [t for t in (sampling.logit_bias or {}) if t >= vocab]
        if bad:
            raise RequestError(f"logit_bias token ids {bad[:5]} are outside the vocabulary (0..{vocab - 1})")
        return sampling

    # ---------------------------------------------------------------- generation
    def stream(self, prompt: str | Sequence[int], sampling_config: SamplingConfig | None = None) -> Iterator[StreamChunk]:
        """Yield chunks as they are accepted. Closing the generator stops generation
        within the current step."""
        sampling = sampling_config or SamplingConfig()
        prompt_ids = self.encode(prompt)
        yield from self._stream_ids(prompt_ids, sampling)

    def _stream_ids(self, prompt_ids: list[int], sampling: SamplingConfig) -> Iterator[StreamChunk]:
        sampling = self.check_request(prompt_ids, sampling)
        stop_ids = (set() if sampling.ignore_eos else self.stop_token_ids) | set(sampling.stop_token_ids or ())
        out = OutputBuilder(
            self.tokenizer,
            sampling.max_new_tokens,
            stop_token_ids=stop_ids,
            stop_strings=sampling.stop,
            skip_special_tokens=sampling.skip_special_tokens,
            want_text=sampling.return_text,
        )
        stats = GenerationStats()
        with self._lock:
            t0 = time.perf_counter()
            sampler = Sampler(sampling, prompt_ids, self.target.vocab_limit, stop_ids)
            cached = self.prefix_cache.load(prompt_ids, self._runners) if self.prefix_cache else 0
            stats.num_cached_tokens = cached
            steps = decode(self.target, prompt_ids, sampling.max_new_tokens, self.draft,
                           self.num_speculative_tokens, self.pard_token, sampler,
                           adaptive=self.speculation_schedule == "adaptive", cached=cached)
            sequence = list(prompt_ids)  # every token the runners have been given, in order
            completed = False
            try:
                for step in steps:
                    sequence += step.tokens
                    delta = out.add(step.tokens)
                    stats.steps += 1
                    stats.tokens_per_step.append(len(delta.token_ids))
                    stats.drafts_proposed_per_step.append(step.num_proposed)
                    stats.drafts_accepted_per_step.append(len(step.tokens) - 1)  # the last is the correction or bonus
                    stats.draft_time_s += step.draft_s
                    stats.target_time_s += step.target_s
                    stats.total_time_s = time.perf_counter() - t0
                    stats.step_end_s.append(stats.total_time_s)
                    if stats.steps == 1:
                        stats.time_to_first_token_s = stats.total_time_s
                    if delta.token_ids or delta.text or delta.finish_reason:
                        logprobs = None
                        if step.logprobs is not None:  # the tokens the output kept are a prefix of the step's
                            logprobs = self._logprob_dicts(step.logprobs[: len(delta.token_ids)])
                        yield StreamChunk(delta.token_ids, delta.text, delta.finish_reason, stats, logprobs)
                    if delta.finish_reason:
                        completed = True
                        return
                completed = True
            except GeneratorExit:  # the caller stopped between steps: the runners are consistent
                completed = True
                raise
            finally:
                steps.close()
                if self.prefix_cache and completed:  # not after a failure mid-forward
                    self.prefix_cache.store(sequence, self._runners)

    def generate(self, prompt: str | Sequence[int] | list[str], sampling_config: SamplingConfig | None = None):
        """Generate for one prompt (text or token ids); a list of strings gives a list of outputs."""
        if isinstance(prompt, (list, tuple)) and prompt and all(isinstance(p, str) for p in prompt):
            return [self.generate(p, sampling_config) for p in prompt]
        sampling = sampling_config or SamplingConfig()
        prompt_ids = self.encode(prompt)
        return self._collect(prompt_ids, sampling)

    def chat(self, messages: list[dict], sampling_config: SamplingConfig | None = None, stream: bool = False):
        """Apply the tokenizer's chat template, then generate (or stream)."""
        sampling = sampling_config or SamplingConfig()
        prompt_ids = self.apply_chat_template(messages)
        return self._stream_ids(prompt_ids, sampling) if stream else self._collect(prompt_ids, sampling)

    def _collect(self, prompt_ids: list[int], sampling: SamplingConfig) -> GenerationOutput:
        token_ids: list[int] = []
        text: list[str] = []
        logprobs: list[dict] = []
        chunk = None
        for chunk in self._stream_ids(prompt_ids, sampling):
            token_ids += chunk.token_ids
            text.append(chunk.text)
            logprobs += chunk.logprobs or []
        return GenerationOutput(
            text="".join(text) if sampling.return_text else None,
            token_ids=token_ids,
            finish_reason=chunk.finish_reason,
            prompt_token_ids=prompt_ids,
            stats=chunk.stats,
            logprobs=logprobs if chunk.logprobs is not None else None,
        )

    def _logprob_dicts(self, entries) -> list[dict]:
        """Token logprobs as plain dicts, with each token's text (its own decoding: a
        piece of a multi-byte character shows as U+FFFD, as in vLLM)."""
        def text(t: int) -> str:
            return self.tokenizer.decode([t], skip_special_tokens=False, clean_up_tokenization_spaces=False)

        return [{"token_id": t, "token": text(t), "logprob": lp,
                 "top_logprobs": [{"token_id": a, "token": text(a), "logprob": alp} for a, alp in top]}
                for t, lp, top in entries]
