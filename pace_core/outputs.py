"""What a generation produces, as plain data (no torch: the serving processes that
relay chunks import this module only)."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass
class GenerationStats:
    steps: int = 0
    tokens_per_step: list[int] = field(default_factory=list)  # tokens emitted per step (incl. correction)
    drafts_proposed_per_step: list[int] = field(default_factory=list)  # draft tokens proposed (K of the step; 0: plain)
    drafts_accepted_per_step: list[int] = field(default_factory=list)  # of those, accepted by the target (bonus apart)
    step_end_s: list[float] = field(default_factory=list)  # when each step's tokens were out, since the start
    draft_time_s: float = 0.0
    target_time_s: float = 0.0
    time_to_first_token_s: float = 0.0  # from the start of the generation (prepare apart) to its first tokens
    total_time_s: float = 0.0
    num_cached_tokens: int = 0  # prompt tokens whose KV came from the prefix cache (not prefilled)
    # where the first token's time goes: checking, tokenizing or templating the request
    # (LLMModel.prepare), reusing the cached KV of the prompt's prefix, and the first
    # step's forwards (the prefill of the uncached prompt tokens with the first proposals)
    prepare_s: float = 0.0
    prefix_cache_load_s: float = 0.0
    first_step_s: float = 0.0
    started_at: float = 0.0  # wall-clock time (time.time()) at which prepare began: where a served request's time went

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
        """Every field (lists copied) and the derived rates."""
        return {**asdict(self), "mean_accepted_length": self.mean_accepted_length, "tokens_per_s": self.tokens_per_s}


@dataclass
class StreamChunk:
    """New output of one generation: what :meth:`LLMModel.stream` yields, what the
    engine process sends, and what the server streams (after joining the chunks that
    were ready together, :meth:`join`). Handle calls get :meth:`to_dict`."""

    token_ids: list[int]  # new tokens in this chunk
    text: str  # new text (UTF-8 safe; empty when return_text=False)
    finish_reason: str | None  # "stop" / "length" on the last chunk
    stats: GenerationStats | None = None  # running stats (final on the last chunk)
    logprobs: list[dict] | None = None  # per token, when asked (SamplingConfig.logprobs): see LLMModel
    num_prompt_tokens: int = 0
    engine: dict | None = None  # on a served generation's last chunk: {"engine_pid", "prefix_cache"}

    @property
    def num_cached_tokens(self) -> int:
        return self.stats.num_cached_tokens if self.stats else 0

    @staticmethod
    def join(chunks: list["StreamChunk"]) -> "StreamChunk":
        """Consecutive chunks of one generation as one: every token, text and logprob;
        the last one's finish reason, stats and engine facts."""
        last = chunks[-1]
        logprobs = None if last.logprobs is None else [e for c in chunks for e in c.logprobs or ()]
        return StreamChunk([t for c in chunks for t in c.token_ids], "".join(c.text for c in chunks),
                           last.finish_reason, last.stats, logprobs, chunks[0].num_prompt_tokens, last.engine)

    def to_dict(self) -> dict:
        """{"text", "token_ids", "finish_reason", "num_prompt_tokens", "num_cached_tokens"}
        (+ "logprobs" when asked; + "stats", "engine_pid", "prefix_cache" on the last chunk)."""
        out = {"text": self.text, "token_ids": self.token_ids, "finish_reason": self.finish_reason,
               "num_prompt_tokens": self.num_prompt_tokens, "num_cached_tokens": self.num_cached_tokens}
        if self.logprobs is not None:
            out["logprobs"] = self.logprobs
        if self.finish_reason and self.stats is not None:
            out["stats"] = self.stats.to_dict()
        return {**out, **(self.engine or {})}


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
