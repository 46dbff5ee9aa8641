"""User-facing configuration objects (pydantic), mirroring AMD PACE's names.

Validation errors name the field and the allowed range, e.g.
``num_speculative_tokens must be in 1..32 (got 0)``.
"""
from __future__ import annotations

from typing import Any, Literal, get_args

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, field_validator, model_validator

MAX_SPECULATIVE_TOKENS = 32
MAX_LOGPROBS = 5  # most likely alternatives returned per token, as OpenAI's completions API
# a request that sets no max_new_tokens gets this many, lowered to the room its prompt
# leaves in the context (the library, handle calls and HTTP alike)
DEFAULT_MAX_NEW_TOKENS = 256
MAX_TEMPERATURE = 2.0  # OpenAI's range, for every way in
MAX_STOP_STRINGS = 4  # OpenAI's: each is searched for at every step
SEED_RANGE = (-(2 ** 63), 2 ** 64 - 1)  # what torch's generators take
# the weights' dtypes: the one list (pace_core.loading.DTYPES maps it to torch's, the
# command line offers it); "auto": as stored in the checkpoint
DType = Literal["auto", "bfloat16", "float32", "float16"]
DTYPE_NAMES: tuple[str, ...] = get_args(DType)
# weight-only quantization at load (pace_core.lean): int8 per output row, int4 in groups of 128
Quantization = Literal["int8", "int4"]


class PardSpecDecodeConfig(BaseModel):
    """A PARD draft model and how many tokens it proposes per step.

    ``pard_token`` is the draft's mask id. ``None`` reads it from the draft's
    config.json (``pard_token``, else ``mask_token_id``, else ``ptd_token_id``).

    ``speculation_schedule``: ``"adaptive"`` (default) treats ``num_speculative_tokens``
    as a cap and follows the draft's recent acceptance (twice as many after a fully
    accepted step, else two more than were accepted); ``"fixed"`` proposes exactly K
    every step. The output is the same either way; adaptive wastes fewer verify
    positions.

    ``draft_vocab_size``: the draft proposes among the first N token ids only, and its
    output projection reads N rows instead of the whole vocabulary (byte-level BPE
    vocabularies such as Qwen's and Llama's number tokens in merge order, frequent ones
    first; EAGLE-3 drafts use a reduced vocabulary the same way). The output is
    unchanged, since the target verifies every proposal; only acceptance can drop.
    ``None``: the whole vocabulary.

    ``quantization``: the draft's own weights, ``"int8"`` or ``"int4"`` (quantized at load,
    as ``LLMModel(quantization=...)``), independent of the target's; ``None``: as loaded.
    The draft only decides how many proposals are accepted, never which tokens come out,
    so a 4-bit draft leaves the output unchanged.
    """

    model_config = ConfigDict(arbitrary_types_allowed=True, extra="forbid", protected_namespaces=())

    model_name_or_path: str
    pard_token: int | None = None
    num_speculative_tokens: int = 12
    speculation_schedule: Literal["adaptive", "fixed"] = "adaptive"
    draft_vocab_size: int | None = Field(None, ge=2)
    quantization: Quantization | None = None

    @field_validator("model_name_or_path")
    @classmethod
    def _path_not_empty(cls, v: str) -> str:
        if not str(v).strip():
            raise ValueError("model_name_or_path must name the draft model (a local directory or a hub name)")
        return str(v)

    @field_validator("pard_token", mode="before")
    @classmethod
    def _pard_token_int(cls, v: Any) -> Any:
        if v is None:
            return None
        if hasattr(v, "numel") and hasattr(v, "item"):  # a torch tensor
            if v.numel() != 1:
                raise ValueError(f"pard_token must be an int or a 0-d tensor (got a tensor of shape {tuple(v.shape)})")
            v = v.item()
        if isinstance(v, bool) or not isinstance(v, int) and not (isinstance(v, float) and v.is_integer()):
            raise ValueError(f"pard_token must be a non-negative int token id (got {v!r})")
        v = int(v)
        if v < 0:
            raise ValueError(f"pard_token must be a non-negative int token id (got {v})")
        return v

    @field_validator("num_speculative_tokens")
    @classmethod
    def _k_range(cls, v: int) -> int:
        if not 1 <= v <= MAX_SPECULATIVE_TOKENS:
            raise ValueError(
                f"num_speculative_tokens must be in 1..{MAX_SPECULATIVE_TOKENS} (got {v}); "
                "for plain decoding without a draft pass pard_config=None"
            )
        return v


class SamplingConfig(BaseModel):
    """How to generate: length, stopping rules, sampling and its logits processors.

    ``temperature`` 0 is greedy decoding; above 0 tokens are sampled, with or without a
    PARD draft (speculative sampling: the output is distributed exactly as sampling from
    the target alone, see :mod:`pace_core.sampling`). Fields a request leaves unset take
    the model's defaults from its ``generation_config.json`` (:meth:`with_defaults`).

    AMD PACE's names work too: ``sampling_seed`` (= ``seed``), ``stop_strings``
    (= ``stop``), ``min_new_tokens`` (vLLM: ``min_tokens``), ``do_sample`` and
    ``return_logprobs`` (= ``logprobs=0``). ``do_sample=False`` is greedy and
    ``do_sample=True`` samples (at the model's temperature, else 1.0); one that
    contradicts an explicit ``temperature`` is an error.
    """

    model_config = ConfigDict(extra="forbid")

    # None: DEFAULT_MAX_NEW_TOKENS, lowered to the room the prompt leaves in the context
    # (a length given is refused if it does not fit)
    max_new_tokens: int | None = None
    min_new_tokens: int = Field(0, validation_alias=AliasChoices("min_new_tokens", "min_tokens"))
    do_sample: bool | None = None
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0  # transformers': logits of prompt and output tokens divided (or, < 0, multiplied)
    presence_penalty: float = 0.0  # OpenAI's: subtracted once from each token the output already has
    frequency_penalty: float = 0.0  # OpenAI's: subtracted per occurrence in the output
    logit_bias: dict[int, float] | None = None  # token id -> added to its logit (-100..100)
    seed: int | None = Field(None, validation_alias=AliasChoices("seed", "sampling_seed"))
    logprobs: int | None = None  # None: none; 0: each chosen token's; n: also the n most likely (<= MAX_LOGPROBS)
    return_text: bool = True
    stop: list[str] | None = Field(None, validation_alias=AliasChoices("stop", "stop_strings"))
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    skip_special_tokens: bool = True

    @model_validator(mode="before")
    @classmethod
    def _return_logprobs(cls, data: Any) -> Any:
        """AMD PACE's ``return_logprobs=True``: the chosen tokens' logprobs (``logprobs=0``)."""
        if isinstance(data, dict) and "return_logprobs" in data:
            data = dict(data)
            if data.pop("return_logprobs") and data.get("logprobs") is None:
                data["logprobs"] = 0
        return data

    @field_validator("max_new_tokens")
    @classmethod
    def _max_new(cls, v: int | None) -> int | None:
        if v is not None and v < 1:
            raise ValueError(f"max_new_tokens must be >= 1 (got {v})")
        return v

    @field_validator("min_new_tokens")
    @classmethod
    def _min_new(cls, v: int) -> int:
        if v < 0:
            raise ValueError(f"min_new_tokens must be >= 0 (got {v})")
        return v

    @field_validator("temperature")
    @classmethod
    def _temperature(cls, v: float) -> float:
        if not 0 <= v <= MAX_TEMPERATURE:
            raise ValueError(f"temperature must be in [0, {MAX_TEMPERATURE:g}] (got {v}); 0 means greedy")
        return v

    @field_validator("seed")
    @classmethod
    def _seed(cls, v: int | None) -> int | None:
        if v is not None and not SEED_RANGE[0] <= v <= SEED_RANGE[1]:
            raise ValueError(f"seed must be in [-2**63, 2**64 - 1] (got {v})")
        return v

    @field_validator("top_p")
    @classmethod
    def _top_p(cls, v: float) -> float:
        if not 0 < v <= 1:
            raise ValueError(f"top_p must be in (0, 1] (got {v})")
        return v

    @field_validator("top_k")
    @classmethod
    def _top_k(cls, v: int) -> int:
        if v < 0:
            raise ValueError(f"top_k must be >= 0 (got {v}); 0 disables it")
        return v

    @field_validator("min_p")
    @classmethod
    def _min_p(cls, v: float) -> float:
        if not 0 <= v <= 1:
            raise ValueError(f"min_p must be in [0, 1] (got {v}); 0 disables it")
        return v

    @field_validator("repetition_penalty")
    @classmethod
    def _repetition_penalty(cls, v: float) -> float:
        if not 0 < v < float("inf"):
            raise ValueError(f"repetition_penalty must be > 0 (got {v}); 1 disables it")
        return v

    @field_validator("presence_penalty", "frequency_penalty")
    @classmethod
    def _openai_penalty(cls, v: float, info) -> float:
        if not -2 <= v <= 2:
            raise ValueError(f"{info.field_name} must be in [-2, 2] (got {v}); 0 disables it")
        return v

    @field_validator("logit_bias")
    @classmethod
    def _logit_bias(cls, v: dict[int, float] | None) -> dict[int, float] | None:
        for token, bias in (v or {}).items():
            if token < 0:
                raise ValueError(f"logit_bias keys must be token ids >= 0 (got {token})")
            if not -100 <= bias <= 100:
                raise ValueError(f"logit_bias values must be in [-100, 100] (got {bias} for token {token})")
        return v or None

    @field_validator("logprobs")
    @classmethod
    def _logprobs(cls, v: int | None) -> int | None:
        if v is not None and not 0 <= v <= MAX_LOGPROBS:
            raise ValueError(f"logprobs must be in 0..{MAX_LOGPROBS} (got {v}): how many most likely tokens to "
                             "return besides the chosen one; None for no logprobs")
        return v

    @field_validator("stop", mode="before")
    @classmethod
    def _stop_list(cls, v: Any) -> Any:
        if v is None:
            return None
        if isinstance(v, str):
            v = [v]
        if not isinstance(v, (list, tuple)) or not all(isinstance(s, str) for s in v):
            raise ValueError("stop must be a string or a list of strings")
        if any(s == "" for s in v):
            raise ValueError("stop strings must not be empty")
        if len(v) > MAX_STOP_STRINGS:
            raise ValueError(f"at most {MAX_STOP_STRINGS} stop strings (got {len(v)})")
        return list(v) or None

    @model_validator(mode="after")
    def _consistent(self) -> "SamplingConfig":
        given = self.model_fields_set
        if self.do_sample is False and self.temperature > 0:
            raise ValueError(f"do_sample=False (greedy) contradicts temperature={self.temperature}: "
                             "drop one of them (do_sample=True, or no do_sample, samples)")
        if self.do_sample and "temperature" in given and self.temperature == 0:
            raise ValueError("do_sample=True contradicts temperature=0 (greedy): drop one of them")
        if self.max_new_tokens is not None and self.min_new_tokens > self.max_new_tokens:
            raise ValueError(f"min_new_tokens ({self.min_new_tokens}) must be <= "
                             f"max_new_tokens ({self.max_new_tokens})")
        return self

    @property
    def greedy(self) -> bool:
        return self.do_sample is False or (self.temperature == 0.0 and not self.do_sample)

    def with_defaults(self, defaults: dict[str, Any]) -> "SamplingConfig":
        """The settings this request runs with: the fields it sets, ``defaults`` (a
        model's ``generation_config.json``, see :func:`pace_core.loading.sampling_defaults`)
        for the sampling fields it leaves unset, the built-in defaults for the rest.
        ``do_sample=False`` keeps only the defaults greedy decoding uses too
        (repetition_penalty), as in transformers; ``do_sample=True`` without a temperature
        samples at the default temperature, else 1.0. The result has no ``do_sample``:
        its temperature says greedy (0) or sampling."""
        given = self.model_dump(include=self.model_fields_set - {"do_sample"})
        if self.do_sample is False:
            defaults = {k: v for k, v in defaults.items() if k == "repetition_penalty"}
        fields = {**defaults, **given}
        if self.do_sample and "temperature" not in fields:
            fields["temperature"] = 1.0
        return SamplingConfig(**fields)


class ModelConfig(BaseModel):
    """Everything needed to build an LLMModel, as one validated object: the serving
    app's ``model`` argument (deployments.args.AppArgs) is one, and the engine process
    builds its model from it with :meth:`LLMModel.from_config`. ``pard_config=None``:
    plain decoding."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    model_name_or_path: str
    dtype: DType = "auto"  # auto: as stored in the checkpoint
    tokenizer_name_or_path: str | None = None
    pard_config: PardSpecDecodeConfig | None = None
    trust_remote_code: bool = False
    num_threads: int | None = Field(default=None, ge=1)
    # "auto": the lean Llama-family forward where it applies, else transformers' own
    runner: Literal["auto", "lean", "transformers"] = "auto"
    # sampling fields of generation_config.json are the defaults of requests that leave them unset
    generation_config_defaults: bool = True
    # memory for reused prompt prefixes' KV (pace_core.prefix_cache): None = 5% of the
    # host's memory, at most 4 GiB; 0 = no prefix cache
    prefix_cache_gb: float | None = Field(default=None, ge=0)
    # the target's linear weights quantized at load: None = as loaded (dtype)
    quantization: Quantization | None = None

    @model_validator(mode="after")
    def _check(self) -> "ModelConfig":
        if not self.model_name_or_path.strip():
            raise ValueError("model_name_or_path must name the target model")
        return self
