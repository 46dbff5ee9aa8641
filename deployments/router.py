"""The ingress: OpenAI-compatible HTTP (FastAPI) and the same operations as Python
handle methods. It validates, admits (bounded queue), forwards to a free replica and
formats; it does no model math."""
import asyncio
import contextvars
import hmac
import json
import logging
import os
import time

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import ValidationError
from ray import serve
from ray.exceptions import RayActorError
from starlette.exceptions import HTTPException as StarletteHTTPException

from pace_core.outputs import StreamChunk

from . import NODE_ENV
from .args import AppArgs
from .engine_process import EngineUnavailable
from .metrics import Metrics
from .protocol import (
    APIError,
    ChatCompletionRequest,
    CompletionRequest,
    chat_body,
    chat_chunk,
    chat_logprobs,
    check_generation_request,
    completion_body,
    completion_chunk,
    completion_logprobs,
    new_id,
    plain_messages,
    usage_chunk,
)

logger = logging.getLogger("ray.serve")
app = FastAPI(title="pace-serve", description="PARD speculative decoding on CPU replicas, OpenAI-compatible")

MAX_HEADER_BYTES = 32 * 1024  # all request headers together; beyond: 431
CAPACITY_TTL_S = 1.0  # admission counts the running replicas again (in the background) when older
RETRIES = 3  # a request that had not started on a replica when it failed is tried again, on another one


class _JSON(JSONResponse):
    """JSON with non-ASCII characters escaped, so that any text encodes (even a lone
    surrogate that an error message quotes from a request)."""

    def render(self, content) -> bytes:
        return json.dumps(content, separators=(",", ":")).encode()


def _error_response(err: APIError, headers: dict | None = None) -> JSONResponse:
    headers = dict(headers or {})
    if err.status in (429, 503):
        headers["Retry-After"] = "1"
    if err.status == 401:
        headers["WWW-Authenticate"] = "Bearer"
    return _JSON(err.body(), status_code=err.status, headers=headers)


def _internal_error(rid: str) -> APIError:
    """A server fault, as the client sees it: no detail (that goes to the log, under the same id)."""
    return APIError(500, f"internal server error (request id {rid}); the details are in the server's log. "
                         "Retry the request.", code="internal_error", type_="server_error")


def _handle_error(err: APIError) -> Exception:
    """A handle call's exception for ``err``: TimeoutError for the deadline, else ValueError."""
    return (TimeoutError if err.status == 504 else ValueError)(err.message)


def _not_started(err: Exception) -> bool:
    """The replica failed before this request started on it (its engine could not be
    restarted, or the replica itself is gone): safe to try another replica, since a
    request is idempotent until its first token is out. A request whose engine died
    under it is not retried: it may be what killed the engine."""
    return isinstance(err, (EngineUnavailable, RayActorError))


def _log_count_failure(question: asyncio.Future) -> None:
    if not question.cancelled() and question.exception() is not None:
        logger.warning("could not count the running replicas; admission goes on with the last count",
                       exc_info=question.exception())


def _validation_error(errors: list[dict]) -> APIError:
    parts, params = [], []
    for e in errors:
        loc = ".".join(str(x) for x in e.get("loc", ()) if x != "body")
        params.append(loc)
        parts.append(f"{loc}: {e.get('msg')}" if loc else str(e.get("msg")))
    return APIError(400, "invalid request body: " + "; ".join(parts), param=params[0] if params else None)


async def _body(request: Request, limit: int) -> bytes:
    """The request body, or a 413 as soon as it is known to exceed ``limit`` bytes."""
    length = request.headers.get("content-length", "")
    too_large = f"this server accepts at most {limit:,} bytes (app argument max_request_bytes)"
    if length.isdigit() and int(length) > limit:
        raise APIError(413, f"the request body is {int(length):,} bytes; {too_large}", code="request_too_large")
    body = bytearray()
    async for part in request.stream():
        body += part
        if len(body) > limit:
            raise APIError(413, f"the request body is larger than {limit:,} bytes; {too_large}",
                           code="request_too_large")
    return bytes(body)


async def _parse(request: Request, model, limit: int):
    """The body, whatever its Content-Type, as JSON validated into ``model``."""
    body = await _body(request, limit)
    try:
        data = json.loads(body)
    except (ValueError, RecursionError):  # bytes that are not UTF-8 too; nesting too deep
        raise APIError(400, "the request body is not valid JSON") from None
    if not isinstance(data, dict):
        raise APIError(400, "the request body must be a JSON object")
    try:
        return model.model_validate(data)
    except ValidationError as err:
        raise _validation_error(err.errors()) from None


@app.exception_handler(RequestValidationError)
async def _invalid_request(request: Request, exc: RequestValidationError):
    return _error_response(_validation_error(exc.errors()))


@app.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException):
    return _error_response(APIError(exc.status_code, str(exc.detail)), exc.headers)  # 405 keeps its Allow


@app.exception_handler(Exception)
async def _unexpected(request: Request, exc: Exception):
    rid = new_id("req")
    logger.error("request %s failed", rid, exc_info=exc)
    return _error_response(_internal_error(rid))


class _HeaderLimit:
    """431 for requests whose headers (all together) exceed MAX_HEADER_BYTES, before any
    route runs. (Serve's own proxy cannot forward headers beyond ~4 MiB: it answers
    those with a plain 500 before this app sees them.)"""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and sum(len(k) + len(v) for k, v in scope["headers"]) > MAX_HEADER_BYTES:
            err = APIError(431, f"the request headers exceed {MAX_HEADER_BYTES:,} bytes", code="headers_too_large")
            return await _error_response(err)(scope, receive, send)
        await self.app(scope, receive, send)


app.add_middleware(_HeaderLimit)


def _session(session_id) -> dict:
    """A request's session key, for cache-aware routing (deployments.routing): over HTTP
    the X-Session-ID header, else the body's OpenAI ``user`` field; a handle call's
    ``session_id=``. {} when none."""
    return {"session_id": str(session_id)} if session_id else {}


def _log_timing(request_id: str, prompt_tokens: int, stats, router_s: float, sent_at: float, ttft_s: float) -> None:
    """One log line per finished generation: where the time to its first token went, in
    ms. ``router``: here before the call to a replica (checks, admission); ``to_engine``:
    from that call to the engine beginning the request (waiting for a replica, the hops
    there; wall clocks of two processes); then the engine's ``prepare`` (tokenizing or
    templating), ``kv_load`` (reusing the cached prefix's KV), ``first_step`` (the
    prefill of the uncached tokens with the first proposals) and ``engine_other``; and
    ``back``, the first tokens' way back here. benchmarks/multi_turn.py reads these."""
    engine_ttft = stats.time_to_first_token_s
    to_engine = stats.started_at - sent_at
    ms = {"ttft": ttft_s, "router": router_s, "to_engine": to_engine, "prepare": stats.prepare_s,
          "kv_load": stats.prefix_cache_load_s, "first_step": stats.first_step_s,
          "engine_other": engine_ttft - stats.prefix_cache_load_s - stats.first_step_s,
          "back": ttft_s - router_s - to_engine - stats.prepare_s - engine_ttft}
    fields = {k: round(1000 * v, 2) for k, v in ms.items()}
    fields.update(request_id=request_id, prompt_tokens=prompt_tokens, cached_tokens=stats.num_cached_tokens,
                  arrived_at=round(sent_at - router_s, 4))  # wall clock: the HTTP proxy's part, in and out
    logger.info("timing %s", json.dumps(fields))


def _sse(obj) -> str:
    return f"data: {json.dumps(obj)}\n\n"


@serve.deployment(max_ongoing_requests=1024, num_replicas=1, ray_actor_options={"num_cpus": 0})
@serve.ingress(app)
class Router:
    def __init__(self, replica, args: dict):
        # by value over gRPC, not through Ray's object store: each streamed chunk is one
        # small message (alone within noise, +11% vs +12%; with the proxy also on gRPC,
        # NODE_ENV, the HTTP overhead measured +4..10%: README, Serving)
        self.replica = replica.options(_by_reference=False)
        self.args = AppArgs(**args)
        self.model_name = self.args.served_model_name
        self.api_key = self.args.resolved_api_key()
        self.metrics = Metrics(self.model_name)
        self.metrics.running_capacity = 0  # until Serve is asked (Router._admit)
        self._capacity_checked_at = -CAPACITY_TTL_S  # monotonic time of the last running-replica count
        self._capacity_check: asyncio.Future | None = None
        self._replica_info: dict | None = None
        missing = " ".join(f"{k}={v}" for k, v in NODE_ENV.items() if os.environ.get(k) != v)
        if missing:
            logger.info("tip: start Ray with %s (`%s serve run serve_config.yaml`, or `python -m cluster.start_node`): "
                        "Serve's HTTP proxy then streams to this router over gRPC, which measurably lowers "
                        "per-token HTTP overhead (README, Serving)", missing, missing)

    # ------------------------------------------------------------------ plumbing
    def _check_auth(self, request: Request) -> None:
        if not self.api_key:
            return
        given = request.headers.get("authorization", "").encode("latin-1")  # as Starlette decoded it
        if not hmac.compare_digest(given, f"Bearer {self.api_key}".encode()):  # constant time
            raise APIError(401, "missing or invalid API key: send the header 'Authorization: Bearer <key>'",
                           code="invalid_api_key", type_="authentication_error")

    def _check_model(self, model: str | None) -> None:
        if model is not None and model != self.model_name:
            raise APIError(400, f"model {model!r} is not served here: use {self.model_name!r} (see /v1/models)",
                           param="model", code="model_not_found")

    def _sampling(self, body) -> dict:
        max_tokens = getattr(body, "max_completion_tokens", None) or body.max_tokens
        sampling = body.sampling(self.args.default_max_tokens, max_tokens)
        return {"sampling": sampling, "max_tokens_is_default": max_tokens is None}

    async def _admit(self, n: int = 1) -> None:
        """Count ``n`` generations in flight, or refuse them all (503 + Retry-After) when
        the requests waiting for a replica (in flight beyond the running replicas, which
        take one each) would pass max_queued_requests. Checked and counted in one step,
        so a burst is bounded exactly; Serve's own max_queued_requests is not used: its
        count leaves out requests in a send-and-reject round trip with a busy replica,
        and a burst of 14 on 2 replicas with a bound of 8 was queued whole.
        The running replicas are Serve's count, asked again in the background once older
        than CAPACITY_TTL_S; a request waits for a fresh count only before a refusal (so
        a replica that autoscaling just added is never missed)."""
        limit = self.args.max_queued_requests
        self._count_replicas(CAPACITY_TTL_S)
        if self.metrics.waiting(n) > limit:
            question = self._count_replicas(max_age_s=0.1)
            if question is not None:
                await asyncio.wait([question])  # a failure is logged; the last count stands
            if self.metrics.waiting(n) > limit:
                raise APIError(503, f"server busy: every replica is busy and {limit} requests are waiting (app "
                                    "argument max_queued_requests); retry later", code="overloaded",
                               type_="server_error")
        self.metrics.in_flight += n

    def _count_replicas(self, max_age_s: float) -> asyncio.Future | None:
        """Ask Serve for the running replicas (:meth:`_replicas_problem`) if the last
        count is older than ``max_age_s``, one question at a time; returns the question
        under way, if any."""
        question = self._capacity_check
        if time.monotonic() - self._capacity_checked_at >= max_age_s and (question is None or question.done()):
            question = self._capacity_check = asyncio.ensure_future(asyncio.to_thread(self._replicas_problem))
            question.add_done_callback(_log_count_failure)
        return None if question is None or question.done() else question

    def _untrack(self, n: int = 1) -> None:
        self.metrics.in_flight -= n

    def _deadline(self) -> float | None:
        """The loop time by which a request arriving now must be done (request_timeout_s)."""
        timeout = self.args.request_timeout_s
        return None if timeout is None else asyncio.get_running_loop().time() + timeout

    def _timed_out(self) -> APIError:
        return APIError(504, f"the request did not finish within {self.args.request_timeout_s:g} s (app argument "
                             "request_timeout_s); its generation was stopped", code="timeout", type_="server_error")

    async def _route(self, route: str, request: Request, fn, prefix: str = "req"):
        """Run ``fn(request_id)``: its response, or the error response; 500s say only the
        request id, under which the log has the detail."""
        rid = new_id(prefix)
        try:
            self._check_auth(request)
            response = await fn(rid)
        except APIError as err:
            response = _error_response(err)
        except Exception:  # a replica or engine failed: not the client's fault
            logger.exception("request %s failed", rid)
            response = _error_response(_internal_error(rid))
        response.headers["X-Request-Id"] = rid
        self.metrics.request_done(route, response.status_code)
        return response

    def _checked(self, request: dict) -> dict:
        """The request with its id, after the checks every generation passes
        (protocol.check_generation_request); raises APIError."""
        prompt = request.get("prompt")
        if hasattr(prompt, "tolist"):  # a tensor or array of token ids, from a handle call
            request = {**request, "prompt": prompt.tolist()}
        check_generation_request(request, self.args.max_prompt_chars)
        return {"request_id": new_id("req"), **request}

    async def _until_started(self, request: dict, start):
        """``await start()``, tried again on another replica (up to RETRIES times) while
        the failure says the request never started (:func:`_not_started`)."""
        for attempt in range(RETRIES + 1):
            try:
                return await start()
            except Exception as err:
                if attempt == RETRIES or not _not_started(err):
                    raise
                logger.warning("request %s: its replica failed before starting it (%s); retrying on another",
                               request["request_id"], type(err).__name__)
                await asyncio.sleep(0.1 * 3 ** attempt)

    async def _generate(self, request: dict) -> StreamChunk:
        """One unary generation on a free replica; raises APIError on user errors."""
        return (await self._generate_all([request]))[0]

    async def _generate_all(self, requests: list[dict]) -> list[StreamChunk]:
        """Unary generations, admitted as a whole or not at all, run on free replicas at
        once. The first failure (a user error in one of them, a server fault) and a
        cancellation (the client went away) cancel the others at once: their replicas
        stop after the current decode step."""
        arrived = time.perf_counter()
        requests = [self._checked(r) for r in requests]
        deadline = self._deadline()
        await self._admit(len(requests))
        # each prompt's call from a context of its own: calls made in one request's context
        # share its internal request id, by which Serve's request routers give a replica to
        # the request it was chosen for (with one id for two waiting calls, one of them never gets one)
        loop = asyncio.get_running_loop()
        tasks = [loop.create_task(self._generate_one(r, arrived), context=contextvars.Context() if len(requests) > 1
                                  else None) for r in requests]
        try:
            async with asyncio.timeout_at(deadline) as timeout:
                return await asyncio.gather(*tasks)
        except TimeoutError:
            if timeout.expired():
                raise self._timed_out() from None
            raise
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            self._untrack(len(requests))

    async def _generate_one(self, request: dict, arrived: float) -> StreamChunk:
        t0 = time.perf_counter()
        sent_at = []

        async def start():
            sent_at.append(time.time())
            response = self.replica.generate.remote(request)
            try:
                return await response
            except asyncio.CancelledError:
                response.cancel()  # awaiting a response does not cancel it by itself
                raise

        out = await self._until_started(request, start)
        if isinstance(out, dict):  # a user error
            raise APIError(400, out["error"])
        e2e = time.perf_counter() - t0
        ttft = e2e - (out.stats.total_time_s - out.stats.time_to_first_token_s)
        self.metrics.generation_done(out.num_prompt_tokens, len(out.token_ids), out.stats, ttft, e2e,
                                     out.num_cached_tokens)
        _log_timing(request["request_id"], out.num_prompt_tokens, out.stats, t0 - arrived, sent_at[-1], ttft)
        return out

    async def _open_stream(self, request: dict):
        """Start a streaming generation; returns (first chunk, generator, t0, deadline).
        User errors surface here, before any response header is sent, as a proper 400
        (the deadline, as a 504)."""
        arrived = time.perf_counter()
        request = self._checked(request)
        deadline = self._deadline()
        await self._admit()
        t0 = time.perf_counter()
        sent_at = []

        async def start():
            sent_at.append(time.time())
            gen = self.replica.options(stream=True).stream.remote(request)
            try:
                return await gen.__anext__(), gen
            except BaseException:
                gen.cancel()
                raise

        try:
            async with asyncio.timeout_at(deadline) as timeout:
                first, gen = await self._until_started(request, start)
        except BaseException as err:
            self._untrack()
            if isinstance(err, TimeoutError) and timeout.expired():
                raise self._timed_out() from None
            raise
        if isinstance(first, dict):  # a user error
            self._untrack()
            raise APIError(400, first["error"])
        timing = (request["request_id"], t0 - arrived, sent_at[-1])
        return first, gen, t0, deadline, timing

    async def _chunks(self, first, gen, t0, deadline, timing):
        """All chunks of an open stream; records metrics; on early exit (client gone,
        deadline passed: APIError 504) cancels the replica's generation, which stops
        within one decode step."""
        n_tokens, done, last = 0, False, first
        ttft = time.perf_counter() - t0
        try:
            chunk = first
            while True:
                n_tokens += len(chunk.token_ids)
                last = chunk
                yield chunk
                if chunk.finish_reason:
                    async for _ in gen:  # its end: the replica is free (as the request router counts) from here
                        pass
                    break
                try:
                    async with asyncio.timeout_at(deadline) as timeout:
                        chunk = await gen.__anext__()
                except StopAsyncIteration:
                    break
                except TimeoutError:
                    if timeout.expired():
                        raise self._timed_out() from None
                    raise
            done = True
        finally:
            if not done:
                gen.cancel()
            self._untrack()
            self.metrics.generation_done(first.num_prompt_tokens, n_tokens, last.stats if last.finish_reason else None,
                                         ttft, time.perf_counter() - t0, first.num_cached_tokens)
            if last.finish_reason:
                _log_timing(timing[0], first.num_prompt_tokens, last.stats, timing[1], timing[2], ttft)

    # ------------------------------------------------------------------ HTTP
    @app.get("/health")
    async def health(self):
        """200 while Serve counts this app's replicas healthy (or scaling), else 503
        saying why: an engine that stalled takes its replica out (deployments.replica),
        until Serve's replacement serves."""
        problem = await asyncio.to_thread(self._replicas_problem)
        if problem:
            return _error_response(APIError(503, problem, code="unhealthy", type_="server_error"))
        return {"status": "ok"}

    def _replicas_problem(self) -> str | None:
        """Why the replicas cannot serve (None: they can), as Serve's controller sees
        them; also refreshes the running-replica count behind pace_queue_depth."""
        app_status = serve.status().applications.get(self.replica.app_name)
        status = app_status and app_status.deployments.get(self.replica.deployment_name)
        if status is None:
            return "the replicas are not deployed"
        self.metrics.running_capacity = status.replica_states.get("RUNNING", 0)
        self._capacity_checked_at = time.monotonic()
        if status.status in ("HEALTHY", "UPSCALING", "DOWNSCALING"):
            return None
        return f"replicas {status.status.value}: {status.message}".rstrip(": ")

    @app.get("/metrics")
    async def metrics_route(self, request: Request):
        await asyncio.to_thread(self._replicas_problem)  # the running replicas, for pace_queue_depth
        body, content_type = self.metrics.render(request.headers.get("accept"))
        return Response(body, headers={"Content-Type": content_type})

    @app.get("/v1/models")
    async def models(self, request: Request):
        async def fn(rid):
            info = await self._info()
            return _JSON({"object": "list", "data": [{
                "id": self.model_name, "object": "model", "created": int(time.time()), "owned_by": "pace-serve",
                "max_model_len": info.get("max_context"), "root": self.model_name,  # no server paths
                "speculative_decoding": "pard" if info.get("draft") else None,
                "num_speculative_tokens": info.get("num_speculative_tokens")}]})
        return await self._route("/v1/models", request, fn)

    @app.post("/v1/completions")
    async def completions(self, request: Request):
        async def fn(rid):
            body = await _parse(request, CompletionRequest, self.args.max_request_bytes)
            body.refuse_unsupported()
            self._check_model(body.model)
            prompts = body.prompts()
            common = {**self._sampling(body), "request_id": rid}
            if len(prompts) == 1:  # several prompts are siblings, not one session's turns
                common.update(_session(request.headers.get("x-session-id") or body.user))
            model = self.model_name
            if body.stream:
                if len(prompts) != 1:
                    raise APIError(400, "streaming takes one prompt per request", "prompt")
                return await self._stream_response("completion", rid, {"prompt": prompts[0], **common}, body)
            limit = self.args.max_prompts_per_request
            if len(prompts) > limit:
                raise APIError(400, f"the request has {len(prompts)} prompts; this server takes at most {limit} per "
                                    "request (app argument max_prompts_per_request): send them in several requests",
                               "prompt", code="too_many_prompts")
            outs = await self._generate_all([{"prompt": p, **common} for p in prompts])
            return _JSON(completion_body(rid, model, outs))
        return await self._route("/v1/completions", request, fn, "cmpl")

    @app.post("/v1/chat/completions")
    async def chat_completions(self, request: Request):
        async def fn(rid):
            body = await _parse(request, ChatCompletionRequest, self.args.max_request_bytes)
            body.refuse_unsupported()
            self._check_model(body.model)
            req = {"messages": body.plain_messages(), **self._sampling(body), "request_id": rid,
                   **_session(request.headers.get("x-session-id") or body.user)}
            model = self.model_name
            if body.stream:
                return await self._stream_response("chat", rid, req, body)
            return _JSON(chat_body(rid, model, await self._generate(req)))
        return await self._route("/v1/chat/completions", request, fn, "chatcmpl")

    async def _stream_response(self, kind: str, rid: str, request: dict, body) -> StreamingResponse:
        """Open the generation (user errors raise here, as a 400) and stream it as SSE."""
        first, gen, t0, deadline, timing = await self._open_stream(request)
        usage = bool(body.stream_options and body.stream_options.include_usage)
        return StreamingResponse(self._sse_events(kind, rid, first, gen, t0, deadline, timing, usage),
                                 media_type="text/event-stream")

    async def _sse_events(self, kind: str, rid: str, first, gen, t0, deadline, timing, include_usage: bool):
        """OpenAI's chunk format for ``kind`` "completion" or "chat": text chunks, a final
        chunk with the finish reason, optionally a usage chunk, then [DONE]. A server
        fault or the deadline after the first chunk ends the stream with an error event
        in OpenAI's error shape, then [DONE]."""
        model, created, n, finish = self.model_name, int(time.time()), 0, None
        chat = kind == "chat"

        offset = 0  # the token strings' length so far: the text_offset of the next logprobs

        def piece(text: str, finish_reason, logprobs=None):
            if chat:
                return _sse(chat_chunk(rid, model, created, {"content": text} if text else {}, finish_reason,
                                       chat_logprobs(logprobs)))
            return _sse(completion_chunk(rid, model, created, text, finish_reason,
                                         completion_logprobs(logprobs, offset)))

        if chat:
            yield _sse(chat_chunk(rid, model, created, {"role": "assistant", "content": ""}, None))
        try:
            async for chunk in self._chunks(first, gen, t0, deadline, timing):
                n += len(chunk.token_ids)
                finish = chunk.finish_reason
                if chunk.text or chunk.logprobs:
                    yield piece(chunk.text, None, chunk.logprobs)
                    offset += sum(len(e["token"]) for e in chunk.logprobs or ())
        except APIError as err:  # the deadline
            yield _sse(err.body())
            yield "data: [DONE]\n\n"
            return
        except Exception:
            logger.exception("request %s failed after its first chunk", rid)
            self.metrics.stream_error()
            yield _sse(_internal_error(rid).body())
            yield "data: [DONE]\n\n"
            return
        yield piece("", finish)
        if include_usage:
            obj = "chat.completion.chunk" if chat else "text_completion"
            yield _sse(usage_chunk(rid, model, created, obj, first.num_prompt_tokens, n, first.num_cached_tokens))
        yield "data: [DONE]\n\n"

    # ------------------------------------------------------------------ Python handle methods
    async def _info(self) -> dict:
        if self._replica_info is None:
            self._replica_info = await self.replica.info.remote()
        return self._replica_info

    @staticmethod
    def _sampling_dict(sampling) -> dict:
        if sampling is None:
            return {}
        if hasattr(sampling, "model_dump"):
            return sampling.model_dump(exclude_unset=True)
        if not isinstance(sampling, dict):
            raise ValueError(f"sampling must be a SamplingConfig or a dict of its fields (got {type(sampling).__name__})")
        return dict(sampling)

    async def generate(self, prompt, sampling=None, session_id=None) -> dict:
        """handle.generate.remote("def f():", {"max_new_tokens": 32}) -> {"text", "token_ids",
        "finish_reason", "num_prompt_tokens", "stats"}. Raises ValueError on bad input.
        ``session_id`` (every method): requests with one go to the same replica when it is free."""
        try:
            return (await self._generate({"prompt": prompt, "sampling": self._sampling_dict(sampling),
                                          **_session(session_id)})).to_dict()
        except APIError as err:
            raise _handle_error(err) from None

    async def chat(self, messages: list[dict], sampling=None, session_id=None) -> dict:
        try:
            return (await self._generate({"messages": self._messages(messages),
                                          "sampling": self._sampling_dict(sampling), **_session(session_id)})).to_dict()
        except APIError as err:
            raise _handle_error(err) from None

    @staticmethod
    def _messages(messages) -> list[dict]:
        """A handle call's messages, validated as an HTTP body's are; raises APIError."""
        try:
            return plain_messages(messages)
        except ValidationError as err:
            raise _validation_error([{**e, "loc": ("messages", *e["loc"])} for e in err.errors()]) from None

    async def generate_stream(self, prompt, sampling=None, session_id=None):
        """handle.options(stream=True).generate_stream.remote(prompt, sampling): yields chunk dicts."""
        async for chunk in self._stream_handle({"prompt": prompt, "sampling": self._sampling_dict(sampling),
                                                **_session(session_id)}):
            yield chunk

    async def chat_stream(self, messages: list[dict], sampling=None, session_id=None):
        async for chunk in self._stream_handle({"messages": messages, "sampling": self._sampling_dict(sampling),
                                                **_session(session_id)}):
            yield chunk

    async def _stream_handle(self, request: dict):
        try:
            if "messages" in request:
                request = {**request, "messages": self._messages(request["messages"])}
            first, gen, t0, deadline, timing = await self._open_stream(request)
        except APIError as err:
            raise _handle_error(err) from None
        try:
            async for chunk in self._chunks(first, gen, t0, deadline, timing):
                yield chunk.to_dict()
        except APIError as err:
            raise _handle_error(err) from None

    async def info(self) -> dict:
        """Served model, arguments and a replica's info."""
        return {"served_model_name": self.model_name, "args": self.args.model_dump(),
                "replica": await self.replica.info.remote(), "in_flight": self.metrics.in_flight}
