"""The application's arguments: one pydantic model, validated by Serve when the app is
built, so a bad argument fails at deploy time with a message naming the field.

The engine's own configuration is not declared again here: ``model`` is a
:class:`pace_core.configs.ModelConfig` (target, dtype, tokenizer, its ``pard_config``
and the rest), the very object the replica hands to its engine process, which builds
the model with ``LLMModel.from_config``; each default and allowed value lives there.
Only the serving fields are flat."""
from __future__ import annotations

import os
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from ray.serve.config import AutoscalingConfig

from pace_core.configs import ModelConfig, PardSpecDecodeConfig


API_KEY_ENV = "PACE_API_KEY"

# app arguments that are gone, and what to do instead
REMOVED = {
    "default_max_tokens": "a request that gives no max_tokens gets pace_core's DEFAULT_MAX_NEW_TOKENS, lowered to the "
                          "room its prompt leaves in the context, over HTTP, through handles and in the library alike",
}

# the engine's fields that were flat app arguments, and where each lives now
MOVED = {
    "target": "model.model_name_or_path",
    "draft": "model.pard_config.model_name_or_path (model.pard_config: null for plain decoding)",
    "num_speculative_tokens": "model.pard_config.num_speculative_tokens",
    "speculation_schedule": "model.pard_config.speculation_schedule",
    "pard_token": "model.pard_config.pard_token",
    "draft_vocab_size": "model.pard_config.draft_vocab_size",
    "dtype": "model.dtype",
    "tokenizer": "model.tokenizer_name_or_path",
    "trust_remote_code": "model.trust_remote_code",
    "generation_config_defaults": "model.generation_config_defaults",
    "prefix_cache_gb": "model.prefix_cache_gb",
}


def demo_model() -> ModelConfig:
    """The bundled demo pair, the default ``model``."""
    return ModelConfig(model_name_or_path="models/demo-target",
                       pard_config=PardSpecDecodeConfig(model_name_or_path="models/demo-draft"))


def _expand_dotted(data: dict, defaults: dict) -> dict:
    """``{"model.dtype": "float32"}`` -> ``{"model": {..., "dtype": "float32"}}``, over
    the value given (or, absent, the default) of each parent: ``serve run
    deployments.app:app model.pard_config.num_speculative_tokens=4`` passes strings,
    where "none"/"null" mean None."""
    data = dict(data)
    for key in [k for k in data if isinstance(k, str) and "." in k]:
        value = data.pop(key)
        if isinstance(value, str) and value.strip().lower() in ("none", "null"):
            value = None
        *parents, leaf = key.split(".")
        node, node_defaults = data, defaults
        for name in parents:
            child = node.get(name, node_defaults.get(name) if isinstance(node_defaults, dict) else None)
            if isinstance(child, BaseModel):
                child = child.model_dump(exclude_unset=True)
            node_defaults = node_defaults.get(name) if isinstance(node_defaults, dict) else None
            node[name] = child = dict(child or {})
            node = child
        node[leaf] = value
    return data


class AppArgs(BaseModel):
    # no argument's value in error messages: Serve logs them, and a value may be a secret
    model_config = ConfigDict(extra="forbid", protected_namespaces=(), hide_input_in_errors=True)

    # the engine's model, as LLMModel.from_config takes it (pace_core.configs.ModelConfig):
    # model_name_or_path, dtype, tokenizer_name_or_path, trust_remote_code,
    # generation_config_defaults, prefix_cache_gb, runner, and pard_config (the PARD draft:
    # model_name_or_path, num_speculative_tokens, speculation_schedule, pard_token,
    # draft_vocab_size; null: plain decoding). Relative paths resolve against the project.
    model: ModelConfig = Field(default_factory=demo_model)
    served_model_name: str = "pace-demo"
    num_replicas: int = Field(2, ge=1)
    # Serve's own AutoscalingConfig (min_replicas, max_replicas, upscale_delay_s, ...); a
    # replica takes one request at a time, so build_app makes target_ongoing_requests 1
    # where it is not given (Serve's default is 2)
    autoscaling: AutoscalingConfig | None = None
    # replicas of the ingress Router; each admits its share of max_queued_requests (Router._admit)
    router_replicas: int = Field(1, ge=1)
    cores_per_slot: int | None = Field(None, ge=1)
    # request the slot Ray resource (pace_core.numa.SLOT_RESOURCE) per replica: "auto" =
    # when the cluster advertises it
    slot_resource: Literal["auto", "always", "never"] = "auto"
    pin: bool = True  # claim a NUMA slot and pin each replica to it
    # requests waiting for a free replica (in flight beyond the running replicas, counted
    # by the router as they arrive, so right under autoscaling); beyond: 503
    max_queued_requests: int = Field(16, ge=1)
    # streaming: send accepted tokens at most every this many ms (0: every step); the
    # first token always goes at once
    stream_interval_ms: float = Field(0.0, ge=0, le=1000)
    # the engine sleeps this long after a request's first chunk (unless it is the last),
    # so that Serve's processes, at Ray's lower priority, carry the first token at once
    # on a host whose cores the engines fill (deployments.engine_process); 0: no pause
    first_chunk_pause_ms: float = Field(8.0, ge=0, le=100)
    # size limits, checked by the router before any work: a larger body is a 413, a
    # longer prompt (characters, or token ids) a 400. The router sends a request to its
    # replica as one message of at most 4 MiB (Ray Serve's gRPC limit), hence the cap.
    max_request_bytes: int = Field(2 * 1024 * 1024, ge=1024, le=3 * 1024 * 1024)
    max_prompt_chars: int = Field(1_000_000, ge=1)
    # /v1/completions with "prompt" as a list: at most this many prompts, admitted
    # together or refused together (a 503 when the queue has no room for all of them)
    max_prompts_per_request: int = Field(8, ge=1)
    # a request not finished this many seconds after it arrived ends with a 504 (an SSE
    # error event once streaming began) and its generation stops; None: no deadline
    request_timeout_s: float | None = Field(None, gt=0)
    # the engine's liveness bound: an engine serving a request must send something (a
    # step's tokens; the first after the prefill) within this many seconds, or it is
    # killed, its request fails and its replica is replaced. Above the longest prefill.
    engine_step_timeout_s: float = Field(120.0, gt=0)
    # the API key lives in the PACE_API_KEY environment variable of the Ray nodes, or in
    # this file (an absolute path, read by the router): never in the app arguments, which
    # Serve logs and stores in plain text (see _no_literal_api_key)
    api_key_file: str | None = None
    # cache_aware: a request goes to the replica holding its prompt's prefix or session (deployments.routing)
    routing: Literal["cache_aware", "power_of_two"] = "cache_aware"
    # cache_aware: how long a request waits for its busy preferred replica before another takes it
    affinity_wait_s: float = Field(0.5, ge=0)

    @model_validator(mode="before")
    @classmethod
    def _no_literal_api_key(cls, data):
        """Refused rather than redacted: Serve logs a config's arguments ("Importing
        application ... with arguments {...}") and keeps them in the application's
        details before any code of ours runs, so a key given here is already exposed;
        a failed deploy says so at once, where a redaction would hide it for good."""
        if isinstance(data, dict) and "api_key" in data:
            raise ValueError(f"api_key must not be an app argument: Serve logs and stores app arguments in plain "
                             f"text (rotate this key: it is in the logs now). Set the {API_KEY_ENV} environment "
                             "variable where Ray runs, or name a file holding the key with api_key_file")
        return data

    @model_validator(mode="before")
    @classmethod
    def _model_fields(cls, data):
        """The engine's fields live in ``model``: a flat one (the old form) fails naming
        its place, rather than as an unknown argument; dotted keys are expanded."""
        if not isinstance(data, dict):
            return data
        moved = [f"{key} moved: use {MOVED[key]}" for key in data if key in MOVED]
        if moved:
            raise ValueError("; ".join(moved) + " (the engine's settings are the `model` argument, a "
                             "pace_core ModelConfig: README, App arguments)")
        removed = [f"{key} was removed: {REMOVED[key]}" for key in data if key in REMOVED]
        if removed:
            raise ValueError("; ".join(removed))
        return _expand_dotted(data, {"model": demo_model().model_dump()})

    @field_validator("api_key_file")
    @classmethod
    def _key_file(cls, v: str | None) -> str | None:
        if v is not None and not os.path.isabs(v):
            raise ValueError("api_key_file must be an absolute path (got a relative one)")
        return v

    @field_validator("served_model_name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("served_model_name must not be empty")
        return v

    def resolved_api_key(self) -> str | None:
        """The key from ``api_key_file`` if set, else from $PACE_API_KEY; None: no key.
        Raises ValueError (naming the file, never its content) if the file is unusable."""
        if self.api_key_file is None:
            return os.environ.get(API_KEY_ENV) or None
        try:
            with open(self.api_key_file, encoding="utf-8") as f:
                key = f.read().strip()
        except (OSError, UnicodeDecodeError) as err:
            raise ValueError(f"api_key_file {self.api_key_file}: cannot read it ({type(err).__name__})") from None
        if not key or any(c.isspace() for c in key):
            raise ValueError(f"api_key_file {self.api_key_file}: the file must hold the key alone, on one line")
        return key
