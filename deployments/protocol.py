"""OpenAI-compatible request bodies and response/chunk builders.

Unknown fields are ignored (as vLLM does); fields whose meaning this server cannot
honour (n > 1, echo, suffix, best_of, tools) are refused with a 400 that says so, never
silently ignored. Sampling fields a request leaves out are left out of the request to
the engine, which fills them from the model's generation_config.json (else greedy).
"""
from __future__ import annotations

import time
import uuid
from typing import ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, ValidationError

from pace_core.configs import SamplingConfig
from pace_core.outputs import Delta, Final


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type_: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type_

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class StreamOptions(BaseModel):
    include_usage: StrictBool = False


class _Common(BaseModel):
    """The fields both routes share. Sampling fields carry their types only: their ranges
    are pace_core's SamplingConfig's, checked by :meth:`sampling` (one declaration)."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None  # vLLM extension
    min_p: float | None = None  # vLLM extension
    repetition_penalty: float | None = None  # vLLM extension (transformers' semantics)
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    min_tokens: int | None = None  # vLLM extension
    logit_bias: dict[int, float] | None = None  # {"token id": bias}
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    n: int = Field(1, ge=1)
    ignore_eos: StrictBool = False  # vLLM extension
    user: str | None = None

    def refuse_unsupported(self) -> None:
        if self.n != 1:
            raise APIError(400, "n > 1 is not supported: send separate requests", "n")

    def num_logprobs(self) -> int | None:
        """SamplingConfig.logprobs: None (no logprobs), or how many alternatives per token."""
        raise NotImplementedError

    def max_length(self) -> int | None:
        return self.max_tokens

    def sampling(self) -> dict:
        """The SamplingConfig fields this request sets, checked against SamplingConfig
        (APIError naming the request's field otherwise). The others come from the model's
        generation_config.json in the engine, else its defaults: temperature 0 (greedy),
        unlike OpenAI's default of 1; the default length: DEFAULT_MAX_NEW_TOKENS, lowered
        to the room the prompt leaves in the context."""
        out = {"ignore_eos": self.ignore_eos}
        if self.max_length() is not None:
            out["max_new_tokens"] = self.max_length()
        if self.stop is not None:
            out["stop"] = self.stop
        for name in ("temperature", "top_p", "top_k", "min_p", "repetition_penalty", "presence_penalty",
                     "frequency_penalty", "logit_bias", "seed"):
            if getattr(self, name) is not None:
                out[name] = getattr(self, name)
        if self.min_tokens is not None:
            out["min_new_tokens"] = self.min_tokens
        if self.num_logprobs() is not None:
            out["logprobs"] = self.num_logprobs()
        try:
            SamplingConfig(**out)
        except ValidationError as err:
            raise validation_error(err.errors(), self.HTTP_NAMES) from None
        return out

    # the request fields behind SamplingConfig's, where the names differ
    HTTP_NAMES: ClassVar[dict] = {"max_new_tokens": "max_tokens", "min_new_tokens": "min_tokens"}


class CompletionRequest(_Common):
    prompt: str | list[str] | list[int] | list[list[int]]
    echo: StrictBool = False
    suffix: str | None = None
    best_of: int | None = None
    logprobs: StrictInt | None = None  # alternatives per token (0: the chosen only)

    def num_logprobs(self) -> int | None:
        return self.logprobs

    def prompts(self) -> list[str | list[int]]:
        p = self.prompt
        if isinstance(p, str):
            prompts = [p]
        elif p and all(isinstance(x, int) for x in p):
            prompts = [p]
        else:
            prompts = list(p)
        if not prompts or any(len(x) == 0 for x in prompts):
            raise APIError(400, "prompt must not be empty", "prompt")
        return prompts

    def refuse_unsupported(self) -> None:
        super().refuse_unsupported()
        if self.echo:
            raise APIError(400, "echo is not supported", "echo")
        if self.suffix:
            raise APIError(400, "suffix is not supported", "suffix")
        if self.best_of not in (None, 1):
            raise APIError(400, "best_of > 1 is not supported", "best_of")


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[dict] | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        parts = []
        for part in self.content:
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise APIError(400, f"only text content parts are supported (got {part.get('type')!r})", "messages")
            parts.append(part["text"])
        return "".join(parts)


class ChatCompletionRequest(_Common):
    messages: list[ChatMessage] = Field(..., min_length=1)
    max_completion_tokens: int | None = None
    tools: list | None = None
    logprobs: StrictBool = False
    top_logprobs: int | None = None

    HTTP_NAMES: ClassVar[dict] = {**_Common.HTTP_NAMES, "logprobs": "top_logprobs"}

    def max_length(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def refuse_unsupported(self) -> None:
        super().refuse_unsupported()
        if self.tools:
            raise APIError(400, "tools are not supported", "tools")
        if self.top_logprobs is not None and not self.logprobs:
            raise APIError(400, "top_logprobs needs logprobs: true", "top_logprobs")

    def num_logprobs(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None

    def plain_messages(self) -> list[dict]:
        return [{"role": m.role, "content": m.text()} for m in self.messages]


def validation_error(errors: list[dict], names: dict | None = None) -> APIError:
    """A 400 listing pydantic's errors, each under the request's own field name (``names``:
    a validated model's field -> the request's, where they differ)."""
    parts, params = [], []
    for e in errors:
        loc = [names.get(x, x) if names else x for x in e.get("loc", ()) if x != "body"]
        loc = ".".join(str(x) for x in loc)
        msg = str(e.get("msg")).removeprefix("Value error, ")
        for ours, theirs in (names or {}).items():
            msg = msg.replace(ours, theirs)
        params.append(loc)
        parts.append(f"{loc}: {msg}" if loc and not msg.startswith(loc) else msg)
    return APIError(400, "invalid request body: " + "; ".join(parts), param=params[0] if params else None)


def text_problem(text: str) -> str | None:
    """Why ``text`` is not valid Unicode text (a lone UTF-16 surrogate, which JSON's
    ``\\ud800`` escapes allow and no tokenizer can encode), or None."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        return (f"contains a lone UTF-16 surrogate (U+{ord(text[err.start]):04X} at character {err.start}), "
                "which is not valid Unicode text: send whole characters (surrogates only in escaped pairs)")
    return None


def check_generation_request(request: dict, max_prompt_chars: int) -> None:
    """The checks every generation request passes in the router, from HTTP and from
    handle calls alike, before it reaches a replica: the prompt's type, valid Unicode
    in every text (prompt, message contents, stop strings) and the prompt's size.
    Raises APIError(400) naming the field."""
    texts: list[tuple[str, str]] = []
    if request.get("messages") is not None:
        texts += [(f"messages[{i}].content", m["content"]) for i, m in enumerate(request["messages"])]
        size, field = sum(len(m["content"]) for m in request["messages"]), "messages"
    else:
        prompt = request.get("prompt")
        if isinstance(prompt, str):
            texts.append(("prompt", prompt))
        elif not (isinstance(prompt, list) and all(type(t) is int for t in prompt)):
            raise APIError(400, "prompt must be a string or a list of token ids (integers)", "prompt")
        size, field = len(prompt), "prompt"
    if size > max_prompt_chars:
        raise APIError(400, f"the {field} is {size:,} characters (or token ids) long; this server accepts at most "
                            f"{max_prompt_chars:,} (app argument max_prompt_chars)", field, code="prompt_too_long")
    stop = (request.get("sampling") or {}).get("stop")
    texts += [("stop", s) for s in ([stop] if isinstance(stop, str) else stop or []) if isinstance(s, str)]
    for field, text in texts:
        problem = text_problem(text)
        if problem:
            raise APIError(400, f"{field} {problem}", field.split("[")[0])


def plain_messages(messages) -> list[dict]:
    """Chat messages as {"role", "content": str} dicts, validated as an HTTP body's are
    (raises pydantic's ValidationError or APIError)."""
    if not isinstance(messages, list) or not messages:
        raise APIError(400, "messages must be a non-empty list of {role, content} objects", "messages")
    return [{"role": m.role, "content": m.text()} for m in (ChatMessage.model_validate(m) for m in messages)]


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> dict:
    """OpenAI's usage block; ``cached_tokens``: prompt tokens whose KV the prefix cache held."""
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached_tokens}}


def completion_logprobs(entries: list[dict] | None, offset: int = 0) -> dict | None:
    """OpenAI's completions ``logprobs`` from the engine's per-token entries. ``text_offset``
    adds up the token strings' lengths from ``offset`` (the tokens a stream sent before):
    each token's place in the text, as long as tokens are whole characters."""
    if entries is None:
        return None
    offsets = []
    for e in entries:
        offsets.append(offset)
        offset += len(e["token"])
    return {"tokens": [e["token"] for e in entries], "token_logprobs": [e["logprob"] for e in entries],
            "top_logprobs": [{a["token"]: a["logprob"] for a in e["top_logprobs"]} for e in entries],
            "text_offset": offsets}


def chat_logprobs(entries: list[dict] | None) -> dict | None:
    """OpenAI's chat ``logprobs``: {"content": [{token, logprob, bytes, top_logprobs}]}."""
    if entries is None:
        return None

    def item(e: dict) -> dict:
        return {"token": e["token"], "logprob": e["logprob"], "bytes": list(e["token"].encode("utf-8"))}

    return {"content": [{**item(e), "top_logprobs": [item(a) for a in e["top_logprobs"]]} for e in entries]}


def completion_body(rid: str, model: str, outputs: list[tuple[Delta, Final]]) -> dict:
    return {
        "id": rid, "object": "text_completion", "created": int(time.time()), "model": model,
        "choices": [{"index": i, "text": delta.text, "logprobs": completion_logprobs(delta.logprobs),
                     "finish_reason": final.finish_reason} for i, (delta, final) in enumerate(outputs)],
        "usage": usage(sum(f.usage.prompt_tokens for _, f in outputs), sum(f.usage.completion_tokens for _, f in outputs),
                       sum(f.usage.cached_tokens for _, f in outputs)),
    }


def chat_body(rid: str, model: str, delta: Delta, final: Final) -> dict:
    return {
        "id": rid, "object": "chat.completion", "created": int(time.time()), "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": delta.text},
                     "logprobs": chat_logprobs(delta.logprobs), "finish_reason": final.finish_reason}],
        "usage": usage(final.usage.prompt_tokens, final.usage.completion_tokens, final.usage.cached_tokens),
    }


def completion_chunk(rid: str, model: str, created: int, text: str, finish_reason: str | None,
                     logprobs: dict | None = None) -> dict:
    return {"id": rid, "object": "text_completion", "created": created, "model": model,
            "choices": [{"index": 0, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}]}


def chat_chunk(rid: str, model: str, created: int, delta: dict, finish_reason: str | None,
               logprobs: dict | None = None) -> dict:
    return {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
            "choices": [{"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}]}


def usage_chunk(rid: str, model: str, created: int, obj: str, prompt_tokens: int, completion_tokens: int,
                cached_tokens: int = 0) -> dict:
    return {"id": rid, "object": obj, "created": created, "model": model, "choices": [],
            "usage": usage(prompt_tokens, completion_tokens, cached_tokens)}
