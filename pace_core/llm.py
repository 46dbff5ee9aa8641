"""LLMModel: a target model with an optional PARD draft, behind generate / stream / chat."""
from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch

from .configs import DEFAULT_MAX_NEW_TOKENS, ModelConfig, PardSpecDecodeConfig, SamplingConfig
from .decoder import decode
from .loading import (
    ModelLoadError,
    check_same_tokenizer,
    context_length,
    load_causal_lm,
    load_tokenizer,
    read_pard_token,
    return_freed_memory,
    sampling_defaults,
    stop_token_ids,
)
from .outputs import Delta, Final, GenerationOutput, GenerationStats, RequestError, Usage
from .prefix_cache import PrefixCache, auto_budget_bytes
from .runner import CausalLMRunner, make_runner
from .sampling import Sampler
from .stopping import OutputBuilder

logger = logging.getLogger(__name__)

__all__ = ["LLMModel", "PardSpecDecodeConfig", "SamplingConfig", "GenerationOutput", "GenerationStats", "Delta",
           "Final", "RequestError", "PreparedRequest"]


@dataclass
class PreparedRequest:
    """A request checked by :meth:`LLMModel.prepare`, ready to :meth:`LLMModel.run`."""

    prompt_ids: list[int]
    sampling: SamplingConfig  # the settings it runs with: the model's defaults filled in
    started_at: float = 0.0  # wall-clock time at which prepare began
    prepare_s: float = 0.0  # how long prepare took (tokenizing or templating, checks)


class LLMModel:
    """A target LLM, optionally with a PARD draft for speculative decoding.

    >>> model = LLMModel("path/to/target", dtype="float32",
    ...                  pard_config=PardSpecDecodeConfig(model_name_or_path="path/to/draft"))
    >>> model.generate("def fib(n):", SamplingConfig(max_new_tokens=32)).text

    Every request goes through :meth:`prepare` (all request errors raised there, before
    any work) and then :meth:`run` (chunks as they come) or :meth:`collect` (the whole
    output); ``generate``, ``stream`` and ``chat`` are those two calls. With a prefix
    cache (``prefix_cache_gb``, :mod:`pace_core.prefix_cache`) a prompt starting like an
    earlier sequence prefills only the rest.

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
        quantization: str | None = None,
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
            quantization=quantization,
        )
        if num_threads:
            torch.set_num_threads(num_threads)
        cfg = self.config
        t0 = time.perf_counter()
        self.tokenizer = load_tokenizer(cfg.tokenizer_name_or_path or cfg.model_name_or_path, cfg.trust_remote_code)
        target = load_causal_lm(cfg.model_name_or_path, cfg.dtype, cfg.trust_remote_code)
        # ids past the tokenizer are embedding padding (Qwen: 152064 rows, 151665 tokens):
        # never emitted, as transformers' suppress_tokens would have it
        self.target = self._runner(target, min(target.config.vocab_size, len(self.tokenizer)), cfg.quantization)
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
        del target  # packed: the runners hold their own copies
        return_freed_memory()
        self.requests_served = self.tokens_generated = 0  # since loading
        self.facts: dict = {}  # a serving process's facts about itself, reported with the model's (facts_now)
        logger.info("loaded %s%s in %.1fs", cfg.model_name_or_path,
                    f" + PARD draft {cfg.pard_config.model_name_or_path}" if self.draft else "", time.perf_counter() - t0)

    @classmethod
    def from_config(cls, config: ModelConfig | dict, num_threads: int | None = None) -> "LLMModel":
        """The model a :class:`ModelConfig` describes (a dict is validated into one), as
        the serving engine builds it; ``num_threads``, when given, overrides the config's."""
        config = ModelConfig.model_validate(config)
        fields = config.model_dump(exclude={"pard_config"})
        if num_threads is not None:
            fields["num_threads"] = num_threads
        return cls(pard_config=config.pard_config, **fields)

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
        self.draft = self._runner(draft, limit, pard.quantization)
        self.draft_context = context_length(draft.config)

    def _runner(self, model, vocab_limit: int, quantization: str | None):
        try:
            return make_runner(model, self.config.runner, vocab_limit=vocab_limit, quantization=quantization,
                               release_weights=True)  # the model is ours: one copy of the weights
        except ValueError as err:  # a quantization or runner this model cannot take
            raise ModelLoadError(str(err)) from None

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
        """The target's dtype as loaded (``dtype="auto"`` resolved): its activations' and
        KV cache's precision (float32 activations in the native forward), and its weights'
        unless quantized (:attr:`weight_format`)."""
        return self.target.dtype

    @property
    def weight_format(self) -> str:
        """How the target's linear weights are stored: ``float32``, ``bfloat16``, ``int8``
        or ``int4`` in the native forward; the dtype's name otherwise."""
        return self.target.weight_format or str(self.target.dtype).removeprefix("torch.")

    @property
    def forward_kind(self) -> str:
        """How the target's forward runs: ``lean-native`` (the C++ forward), ``lean-python``
        or ``transformers`` (see ``runner=`` and :mod:`pace_core.native`)."""
        if isinstance(self.target, CausalLMRunner):
            return "transformers"
        return "lean-native" if self.target.native else "lean-python"

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
        vocab = self.target.config.vocab_size
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

    def prepare(self, prompt: str | Sequence[int] | None = None, sampling_config: SamplingConfig | dict | None = None,
                *, messages: list[dict] | None = None) -> PreparedRequest:
        """Everything that can be wrong with a request, checked before any generation:
        the prompt encoded (or the chat ``messages`` templated), the sampling settings
        validated with the model's defaults for the fields left unset, the context and
        vocabulary limits. Raises :class:`RequestError` (a ValueError; a dict of bad
        sampling fields: pydantic's ValidationError, also a ValueError). A request that
        sets no ``max_new_tokens`` gets DEFAULT_MAX_NEW_TOKENS, lowered to the room its
        prompt leaves in the context (as vLLM); a length it sets must fit."""
        started_at, t0 = time.time(), time.perf_counter()
        if (prompt is None) == (messages is None):
            raise RequestError("give either a prompt or chat messages")
        prompt_ids = self.apply_chat_template(messages) if messages is not None else self.encode(prompt)
        if not prompt_ids:  # a text the tokenizer drops entirely (e.g. characters its normalizer removes)
            raise RequestError("the chat template produced no tokens for these messages" if messages is not None else
                               "the prompt encodes to zero tokens: this model's tokenizer drops every character of it; "
                               "send text the tokenizer keeps (or token ids)")
        if isinstance(sampling_config, dict):
            sampling_config = SamplingConfig(**sampling_config)
        sampling = (sampling_config or SamplingConfig()).with_defaults(self.sampling_defaults)
        limits = [(name, limit) for name, limit in (("target", self.max_context),
                                                     ("draft", self.draft_context if self.draft else None)) if limit]
        if sampling.max_new_tokens is None:
            room = min([DEFAULT_MAX_NEW_TOKENS] + [limit - len(prompt_ids) for _, limit in limits])
            if room < 1:
                name, limit = min(limits, key=lambda x: x[1])
                raise RequestError(f"the prompt ({len(prompt_ids)} tokens) leaves no room for an answer in the {name}'s "
                                   f"context length of {limit} tokens: shorten the prompt")
            sampling = sampling.model_copy(update={"max_new_tokens": room})
        for name, limit in limits:
            if len(prompt_ids) + sampling.max_new_tokens > limit:
                raise RequestError(
                    f"prompt ({len(prompt_ids)} tokens) + max_new_tokens ({sampling.max_new_tokens}) exceeds the {name}'s "
                    f"context length of {limit} tokens: shorten the prompt or lower max_new_tokens"
                )
        if sampling.min_new_tokens > sampling.max_new_tokens:
            raise RequestError(f"min_new_tokens ({sampling.min_new_tokens}) must be <= max_new_tokens "
                               f"({sampling.max_new_tokens}, what the context leaves)")
        vocab = self.target.vocab_limit
        bad = [t for t in (sampling.logit_bias or {}) if t >= vocab]
        if bad:
            raise RequestError(f"logit_bias token ids {bad[:5]} are outside the vocabulary (0..{vocab - 1})")
        return PreparedRequest(prompt_ids, sampling, started_at, time.perf_counter() - t0)

    # ---------------------------------------------------------------- generation
    def run(self, request: PreparedRequest) -> Iterator[Delta | Final]:
        """Generate for a prepared request: a :class:`Delta` for each step's new output, as
        tokens are accepted, then one :class:`Final` (finish reason, usage, statistics,
        :meth:`facts`). Closing the generator stops generation within the current step.
        One generation at a time: the model has one KV cache (a second one while this one
        is open raises)."""
        if not self._lock.acquire(blocking=False):
            raise RuntimeError("this LLMModel is already generating (one generation at a time: it has one KV cache); "
                               "finish or close the open stream first, or use one LLMModel per thread")
        try:
            yield from self._decode(request)
        finally:
            self._lock.release()

    def _decode(self, request: PreparedRequest) -> Iterator[Delta | Final]:
        prompt_ids, sampling = request.prompt_ids, request.sampling
        stop_ids = (set() if sampling.ignore_eos else self.stop_token_ids) | set(sampling.stop_token_ids or ())
        out = OutputBuilder(self.tokenizer, sampling.max_new_tokens, stop_token_ids=stop_ids, stop_strings=sampling.stop,
                            skip_special_tokens=sampling.skip_special_tokens, want_text=sampling.return_text)
        stats = GenerationStats(started_at=request.started_at, prepare_s=request.prepare_s)
        t0 = time.perf_counter()
        sampler = Sampler(sampling, prompt_ids, self.target.vocab_limit, stop_ids)
        t_load = time.perf_counter()
        cached = self.prefix_cache.load(prompt_ids, self._runners) if self.prefix_cache else 0
        stats.num_cached_tokens, stats.prefix_cache_load_s = cached, time.perf_counter() - t_load
        steps = decode(self.target, prompt_ids, sampling.max_new_tokens, self.draft, self.num_speculative_tokens,
                       self.pard_token, sampler, adaptive=self.speculation_schedule == "adaptive", cached=cached)
        sequence = list(prompt_ids)  # every token the runners have been given, in order
        failed = False  # a failure mid-forward leaves the runners' caches unfit to keep
        self.requests_served += 1
        try:
            for step in steps:
                sequence += step.tokens
                delta = out.add(step.tokens)
                self.tokens_generated += len(delta.token_ids)
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
                    stats.first_step_s = step.draft_s + step.target_s
                if delta.token_ids or delta.text:
                    if step.logprobs is not None:  # the tokens the output kept are a prefix of the step's
                        delta.logprobs = self._logprob_dicts(step.logprobs[: len(delta.token_ids)])
                    yield delta
                if out.finish_reason:
                    yield Final(out.finish_reason, Usage(len(prompt_ids), len(out.token_ids), cached), stats,
                                self.facts_now())
                    return
        except GeneratorExit:  # closed at a yield: between steps, the caches are whole
            raise
        except BaseException:
            failed = True
            raise
        finally:
            steps.close()
            if self.prefix_cache and not failed:
                self.prefix_cache.store(sequence, self._runners)

    def facts_now(self) -> dict:
        """What this model is (and the process serving it: :attr:`facts`), its counts so
        far and its prefix cache's: every :class:`Final` carries it."""
        cfg = self.config
        return {"engine_pid": os.getpid(), "target": cfg.model_name_or_path,
                "draft": (cfg.pard_config.model_name_or_path if cfg.pard_config else "set after loading")
                if self.draft else None,
                "num_speculative_tokens": self.num_speculative_tokens,
                "speculation_schedule": self.speculation_schedule if self.draft else None,
                "dtype": str(self.dtype).removeprefix("torch."), "weights": self.weight_format,
                "draft_weights": getattr(self.draft, "weight_format", None), "forward": self.forward_kind,
                "max_context": min(c for c in (self.max_context, self.draft_context) if c) if self.max_context else None,
                **self.facts, "requests_served": self.requests_served, "tokens_generated": self.tokens_generated,
                "prefix_cache": self.prefix_cache_stats()}

    def stream(self, prompt: str | Sequence[int], sampling_config: SamplingConfig | dict | None = None
               ) -> Iterator[Delta | Final]:
        """:meth:`run` of :meth:`prepare`: request errors raise here, before any event.
        Closing the iterator stops generation within the current step."""
        return self.run(self.prepare(prompt, sampling_config))

    def generate(self, prompt: str | Sequence[int] | list[str], sampling_config: SamplingConfig | dict | None = None):
        """Generate for one prompt (text or token ids); a list of strings gives a list of outputs."""
        if isinstance(prompt, (list, tuple)) and prompt and all(isinstance(p, str) for p in prompt):
            return [self.generate(p, sampling_config) for p in prompt]
        return self.collect(self.prepare(prompt, sampling_config))

    def chat(self, messages: list[dict], sampling_config: SamplingConfig | dict | None = None, stream: bool = False):
        """Apply the tokenizer's chat template, then generate (or stream, as :meth:`run`)."""
        request = self.prepare(messages=messages, sampling_config=sampling_config)
        return self.run(request) if stream else self.collect(request)

    def collect(self, request: PreparedRequest) -> GenerationOutput:
        """The whole output of a prepared request."""
        events = list(self.run(request))
        final = events.pop()
        whole = Delta.join(events) if events else Delta([], "")
        return GenerationOutput(text=whole.text if request.sampling.return_text else None, token_ids=whole.token_ids,
                                finish_reason=final.finish_reason, prompt_token_ids=request.prompt_ids,
                                stats=final.stats, logprobs=whole.logprobs if request.sampling.logprobs is not None
                                else None)

    def _logprob_dicts(self, entries) -> list[dict]:
        """Token logprobs as plain dicts, with each token's text (its own decoding: a
        piece of a multi-byte character shows as U+FFFD, as in vLLM)."""
        def text(t: int) -> str:
            return self.tokenizer.decode([t], skip_special_tokens=False, clean_up_tokenization_spaces=False)

        return [{"token_id": t, "token": text(t), "logprob": lp,
                 "top_logprobs": [{"token_id": a, "token": text(a), "logprob": alp} for a, alp in top]}
                for t, lp, top in entries]
