"""User-facing configuration objects (pydantic), mirroring AMD PACE's names.

Validation errors name the field and the allowed range, e.g.
``num_speculative_tokens must be in 1..32 (got 0)``.
"""
from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

MAX_SPECULATIVE_TOKENS = 32
DTYPES = ("auto", "bfloat16", "float32", "float16")  # auto: the checkpoint's own dtype


class PardSpecDecodeConfig(BaseModel):
    """A PARD draft model and how many tokens it proposes per step.

    ``pard_token`` is the draft's mask id. ``None`` reads it from the draft's
    config.json (``pard_token``, else ``mask_token_id``, else ``ptd_token_id``).

    ``speculation_schedule``: ``"adaptive"`` (default) treats ``num_speculative_tokens``
    as a cap and follows the draft's recent acceptance (twice as many after a fully
    accepted step, else two more than were accepted); ``"fixed"`` proposes exactly K
    every step. The output is the same either way; adaptive wastes fewer verify
    positions.
    """

    model_config = ConfigDict(arbitrary_types_allowed=True, extra="forbid", protected_namespaces=())

    model_name_or_path: str
    pard_token: int | None = None
    num_speculative_tokens: int = 12
    speculation_schedule: Literal["adaptive", "fixed"] = "adaptive"

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
    """How to generate: length, stopping rules and (for plain decoding) sampling."""

    model_config = ConfigDict(extra="forbid")

    max_new_tokens: int = 128
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    return_text: bool = True
    stop: list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    skip_special_tokens: bool = True

    @field_validator("max_new_tokens")
    @classmethod
    def _max_new(cls, v: int) -> int:
        if v < 1:
            raise ValueError(f"max_new_tokens must be >= 1 (got {v})")
        return v

    @field_validator("temperature")
    @classmethod
    def _temperature(cls, v: float) -> float:
        if v < 0:
            raise ValueError(f"temperature must be >= 0 (got {v}); 0 means greedy")
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
        return list(v) or None

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


class ModelConfig(BaseModel):
    """Everything needed to build an LLMModel, as one validated object (used by the
    deployments and the command line)."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    model_name_or_path: str
    dtype: Literal["auto", "bfloat16", "float32", "float16"] = "auto"  # auto: as stored in the checkpoint
    tokenizer_name_or_path: str | None = None
    pard_config: PardSpecDecodeConfig | None = None
    trust_remote_code: bool = False
    num_threads: int | None = Field(default=None, ge=1)
    # "auto": the lean Llama-family forward where it applies, else transformers' own
    runner: Literal["auto", "lean", "transformers"] = "auto"

    @model_validator(mode="after")
    def _check(self) -> "ModelConfig":
        if not self.model_name_or_path.strip():
            raise ValueError("model_name_or_path must name the target model")
        return self
