"""What a generation produces, as plain data (no torch: the serving processes that
relay it import this module only): one typed stream from ``LLMModel.run`` through the
engine process, the replica and the router to the client, of :class:`Delta` events
(new tokens and text) ended by a :class:`Final` (finish reason, usage, statistics) or a
:class:`Failed` (a failure's kind and message, :class:`GenerationError` raised)."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Union


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
class Delta:
    """New output of a generation: the tokens a decoding step added (stop rules applied)
    and their text (UTF-8 safe; empty when return_text=False)."""

    token_ids: list[int]
    text: str
    logprobs: list[dict] | None = None  # per token, when asked (SamplingConfig.logprobs): see LLMModel

    @staticmethod
    def join(deltas: list["Delta"]) -> "Delta":
        """Consecutive deltas of one generation as one."""
        logprobs = None if deltas[-1].logprobs is None else [e for d in deltas for e in d.logprobs or ()]
        return Delta([t for d in deltas for t in d.token_ids], "".join(d.text for d in deltas), logprobs)

    def to_dict(self) -> dict:
        """{"type": "delta", "text", "token_ids"} (+ "logprobs" when asked)."""
        out = {"type": "delta", "text": self.text, "token_ids": self.token_ids}
        return out if self.logprobs is None else {**out, "logprobs": self.logprobs}


@dataclass
class Usage:
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0  # prompt tokens whose KV came from the prefix cache (not prefilled)


@dataclass
class Final:
    """The end of a finished generation: why it ended, its counts and statistics, and the
    facts of the engine that ran it (:meth:`LLMModel.facts`). The only event that
    carries statistics."""

    finish_reason: str  # "stop" (a stop token or string) or "length"
    usage: Usage
    stats: GenerationStats
    engine: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        """{"type": "final", "finish_reason", "usage", "stats", "engine"}."""
        return {"type": "final", "finish_reason": self.finish_reason, "usage": asdict(self.usage),
                "stats": self.stats.to_dict(), "engine": self.engine}


class GenerationError(Exception):
    """A generation that could not be done; ``kind`` says why (:class:`Failed`)."""

    kind = "engine"


class RequestError(GenerationError, ValueError):
    """A request that cannot be served as asked (the caller's to fix: the message names
    what), e.g. longer than the model's context."""

    kind = "invalid_request"


class Overloaded(GenerationError):
    """Every replica is busy and the queue is full: retry later."""

    kind = "overloaded"


class DeadlineExceeded(GenerationError, TimeoutError):
    """The request did not finish within the server's request_timeout_s."""

    kind = "timeout"


class Cancelled(GenerationError):
    """The generation was stopped at its caller's request (the caller went away)."""

    kind = "cancelled"


class EngineFailure(GenerationError, RuntimeError):
    """The engine failed serving it (an exception, a dead or stalled engine process): not
    the caller's fault; the server's log has the detail."""

    kind = "engine"


FAILURES = {cls.kind: cls for cls in (RequestError, Overloaded, DeadlineExceeded, Cancelled, EngineFailure)}


@dataclass
class Failed:
    """The end of a generation that failed: its kind (a key of FAILURES) and a message."""

    kind: str
    message: str

    def error(self) -> GenerationError:
        """The typed exception for this failure."""
        return FAILURES.get(self.kind, EngineFailure)(self.message)


Event = Union[Delta, Final, Failed]  # what a generation's stream is made of: Delta*, then Final or Failed


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

    @property
    def num_cached_tokens(self) -> int:
        return self.stats.num_cached_tokens
