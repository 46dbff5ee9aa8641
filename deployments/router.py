"""The ingress: OpenAI-compatible HTTP (FastAPI) and the same operations as Python
handle methods. It validates, admits (bounded queue), forwards to a free replica and
formats the generation's events (pace_core.outputs: Delta ..., then a Final or a
Failed); it does no model math. The app runs ``router_replicas`` of it."""
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

from pace_core.outputs import (
    DeadlineExceeded,
    Delta,
    EngineFailure,
    Failed,
    Final,
    GenerationError,
    Overloaded,
    RequestError,
)

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
    validation_error,
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


def _internal_message(rid: str) -> str:
    """A server fault, as its caller sees it: no detail (that goes to the log, under the same id)."""
    return f"internal server error (request id {rid}); the details are in the server's log. Retry the request."


def _api_error(err: GenerationError, rid: str) -> APIError:
    """The HTTP answer to a generation that could not be done."""
    if isinstance(err, RequestError):
        return APIError(400, str(err))
    if isinstance(err, Overloaded):
        return APIError(503, str(err), code="overloaded", type_="server_error")
    if isinstance(err, DeadlineExceeded):
        return APIError(504, str(err), code="timeout", type_="server_error")
    return APIError(500, _internal_message(rid), code="internal_error", type_="server_error")


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
        raise validation_error(err.errors()) from None


@app.exception_handler(RequestValidationError)
async def _invalid_request(request: Request, exc: RequestValidationError):
    return _error_response(validation_error(exc.errors()))


@app.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException):
    return _error_response(APIError(exc.status_code, str(exc.detail)), exc.headers)  # 405 keeps its Allow


@app.exception_handler(Exception)
async def _unexpected(request: Request, exc: Exception):
    rid = new_id("req")
    logger.error("request %s failed", rid, exc_info=exc)
    return _error_response(_api_error(EngineFailure(), rid))


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


def _log_timing(request_id: str, final: Final, ttft_s: float, router_s: float, sent_at: float) -> None:
    """One log line per finished generation: where the time to its first token went, in
    ms. ``router``: here before the call to a replica (checks, admission); ``to_engine``:
    from that call to the engine beginning the request (waiting for a replica, the hops
    there; wall clocks of two processes); then the engine's ``prepare`` (tokenizing or
    templating), ``kv_load`` (reusing the cached prefix's KV), ``first_step`` (the
    prefill of the uncached tokens with the first proposals) and ``engine_other``; and
    ``back``, the first tokens' way back here. benchmarks/multi_turn.py reads these."""
    stats = final.stats
    to_engine = stats.started_at - sent_at
    engine_ttft = stats.time_to_first_token_s
    ms = {"ttft": ttft_s, "router": router_s, "to_engine": to_engine, "prepare": stats.prepare_s,
          "kv_load": stats.prefix_cache_load_s, "first_step": stats.first_step_s,
          "engine_other": engine_ttft - stats.prefix_cache_load_s - stats.first_step_s,
          "back": ttft_s - router_s - to_engine - stats.prepare_s - engine_ttft}
    fields = {k: round(1000 * v, 2) for k, v in ms.items()}
    fields.update(request_id=request_id, prompt_tokens=final.usage.prompt_tokens,
                  cached_tokens=final.usage.cached_tokens,
                  arrived_at=round(sent_at - router_s, 4))  # wall clock: the HTTP proxy's part, in and out
    logger.info("timing %s", json.dumps(fields))


def _sse(obj) -> str:
    return f"data: {json.dumps(obj)}\n\n"


class _Generation:
    """One generation a replica runs for the router: its events (Deltas, then the Final)
    as they come, ending with the metrics, the timing line and the end of its admission;
    a Failed raises its GenerationError; leaving early (the client gone, the deadline)
    cancels it on the replica, which stops after the current step."""

    def __init__(self, router: "Router", request: dict, arrived: float):
        self.router, self.request, self.rid = router, request, request["request_id"]
        self.arrived, self.sent, self.sent_at = arrived, arrived, 0.0
        self.response = None  # the replica's (streamed or unary) response
        self.first = None  # its first event; unary: its whole result, [Delta, Final] or [Failed]
        self.ttft: float | None = None  # streamed: when the first event came

    async def start(self, deadline: float | None, stream: bool) -> None:
        """Until the replica's first event (the whole result, unary), on another replica
        while the one tried failed before starting it (:func:`_not_started`)."""
        router = self.router
        self.sent = time.perf_counter()
        for attempt in range(RETRIES + 1):
            timeout = None
            try:
                self.sent_at = time.time()
                async with asyncio.timeout_at(deadline) as timeout:
                    if stream:
                        self.response = router.replica.options(stream=True).stream.remote(self.request)
                        self.first = await self.response.__anext__()
                    else:
                        self.response = router.replica.generate.remote(self.request)
                        self.first = await self.response
                if stream:
                    self.ttft = time.perf_counter() - self.arrived
                elif isinstance(self.first[-1], Failed):  # raised at once: a request's other prompts stop
                    raise router.failure(self.first[-1], self.rid)
                return
            except GenerationError:
                raise
            except BaseException as err:
                if self.response is not None:
                    self.response.cancel()  # awaiting a response does not cancel it by itself
                if isinstance(err, TimeoutError) and timeout is not None and timeout.expired():
                    raise router.timed_out() from None
                if attempt == RETRIES or not _not_started(err):
                    raise
                logger.warning("request %s: its replica failed before starting it (%s); retrying on another",
                               self.rid, type(err).__name__)
                await asyncio.sleep(0.1 * 3 ** attempt)

    async def events(self, deadline: float | None):
        """The streamed events, Deltas then the Final; records the generation once done."""
        router, tokens, final, done = self.router, 0, None, False
        try:
            event = self.first
            while True:
                if isinstance(event, Failed):
                    raise router.failure(event, self.rid)
                yield event
                if isinstance(event, Final):
                    final = event
                    async for _ in self.response:  # its end: the replica is free (as the request router counts) from here
                        pass
                    break
                tokens += len(event.token_ids)
                try:
                    async with asyncio.timeout_at(deadline) as timeout:
                        event = await self.response.__anext__()
                except StopAsyncIteration:
                    raise EngineFailure(f"request {self.rid}: the replica's stream ended without a Final") from None
                except TimeoutError:
                    if timeout.expired():
                        raise router.timed_out() from None
                    raise
            done = True
        finally:
            if not done:
                self.response.cancel()
            self.record(final, tokens)

    def result(self) -> tuple[Delta, Final]:
        """The unary result (:meth:`start` with stream=False): the joined Delta and the Final."""
        *deltas, end = self.first
        self.record(end, end.usage.completion_tokens)
        return (deltas[0] if deltas else Delta([], "")), end

    def record(self, final: Final | None, tokens: int) -> None:
        e2e = time.perf_counter() - self.arrived
        ttft = self.ttft
        if ttft is None and final is not None:  # unary: the engine's time from its first token to its end, less
            ttft = e2e - (final.stats.total_time_s - final.stats.time_to_first_token_s)
        self.router.generation_done(final, tokens, ttft, e2e)
        if final is not None:
            _log_timing(self.rid, final, ttft, self.sent - self.arrived, self.sent_at)


@serve.deployment(max_ongoing_requests=1024, num_replicas=1, ray_actor_options={"num_cpus": 0})
@serve.ingress(app)
class Router:
    def __init__(self, replica, args: dict, model_card: dict | None = None):
        # by value over gRPC, not through Ray's object store: each streamed event is one
        # small message (alone within noise, +11% vs +12%; with the proxy also on gRPC,
        # NODE_ENV, the HTTP overhead measured +4..10%: README, Serving)
        self.replica = replica.options(_by_reference=False)
        self.args = AppArgs(**args)
        self.model_name = self.args.served_model_name
        self.model_card = model_card or {}  # deployments.app.model_card: what /v1/models says of the model
        self.created = int(time.time())
        self.api_key = self.args.resolved_api_key()
        self.metrics = Metrics(self.model_name)
        self.metrics.running_capacity = 0  # until Serve is asked (Router._admit)
        # the app's running router replicas, as Serve last counted them (until then, as many
        # as configured: each admits its share, never more)
        self.routers = self.args.router_replicas
        self._capacity_checked_at = -CAPACITY_TTL_S  # monotonic time of the last running-replica count
        self._capacity_check: asyncio.Future | None = None
        self.replicas_seen: dict[int, dict] = {}  # replica pid -> its engine's facts, from its latest Final here
        self.deployment_name = serve.get_replica_context().deployment  # the routers' own, whose replicas it counts
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

    async def _admit(self, n: int = 1) -> None:
        """Count ``n`` generations in flight, or refuse them all (Overloaded: a 503 with
        Retry-After) when the requests waiting for a replica would pass this router's
        share of max_queued_requests. With R router replicas, each admits against 1/R of
        the running replicas and 1/R of the bound, so that together they never queue
        more than max_queued_requests (Serve's proxy spreads requests evenly over them;
        a skewed spread refuses a little early, never late). Checked and counted in one
        step, so a burst is bounded exactly; Serve's own max_queued_requests is not used:
        its count leaves out requests in a send-and-reject round trip with a busy
        replica, and a burst of 14 on 2 replicas with a bound of 8 was queued whole.
        The counts are Serve's, asked again in the background once older than
        CAPACITY_TTL_S; a request waits for a fresh count only before a refusal (so a
        replica that autoscaling just added is never missed)."""
        self._count_replicas(CAPACITY_TTL_S)
        if self._waiting(n) > self._bound():
            question = self._count_replicas(max_age_s=0.1)
            if question is not None:
                await asyncio.wait([question])  # a failure is logged; the last count stands
            if self._waiting(n) > self._bound():
                raise Overloaded(f"server busy: every replica is busy and {self.args.max_queued_requests} requests are "
                                 "waiting (app argument max_queued_requests); retry later")
        self.metrics.in_flight += n

    def _waiting(self, n: int) -> float:
        """This router's requests waiting for a replica with ``n`` more: in flight beyond its share of the running ones."""
        return self.metrics.in_flight + n - self.metrics.running_capacity / self.routers

    def _bound(self) -> float:
        return self.args.max_queued_requests / self.routers

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

    def timed_out(self) -> DeadlineExceeded:
        return DeadlineExceeded(f"the request did not finish within {self.args.request_timeout_s:g} s (app argument "
                                "request_timeout_s); its generation was stopped")

    def failure(self, failed: Failed, rid: str) -> GenerationError:
        """The error a Failed event raises here; an engine's is logged, its caller sees the request id only."""
        if failed.kind == "engine":
            logger.error("request %s failed: %s", rid, failed.message)
            return EngineFailure(_internal_message(rid))
        return failed.error()

    def generation_done(self, final: Final | None, tokens: int, ttft: float | None, e2e: float) -> None:
        self.metrics.generation_done(final, tokens, ttft, e2e)
        if final is not None and final.engine.get("replica_pid"):
            self.replicas_seen[final.engine["replica_pid"]] = final.engine

    async def _route(self, route: str, request: Request, fn, prefix: str = "req"):
        """Run ``fn(request_id)``: its response, or the error response; 500s say only the
        request id, under which the log has the detail."""
        rid = new_id(prefix)
        try:
            self._check_auth(request)
            response = await fn(rid)
        except APIError as err:
            response = _error_response(err)
        except GenerationError as err:
            response = _error_response(_api_error(err, rid))
        except Exception:  # a replica or engine failed: not the client's fault
            logger.exception("request %s failed", rid)
            response = _error_response(_api_error(EngineFailure(), rid))
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

    async def _generate(self, request: dict) -> tuple[Delta, Final]:
        """One unary generation on a free replica."""
        return (await self._generate_all([request]))[0]

    async def _generate_all(self, requests: list[dict]) -> list[tuple[Delta, Final]]:
        """Unary generations, admitted as a whole or not at all, run on free replicas at
        once. The first failure (a user error in one of them, a server fault) and a
        cancellation (the client went away) cancel the others at once: their replicas
        stop after the current decode step."""
        arrived = time.perf_counter()
        generations = [_Generation(self, self._checked(r), arrived) for r in requests]
        deadline = self._deadline()
        await self._admit(len(generations))
        # each prompt's call from a context of its own: calls made in one request's context
        # share its internal request id, by which Serve's request routers give a replica to
        # the request it was chosen for (with one id for two waiting calls, one of them never gets one)
        loop = asyncio.get_running_loop()
        tasks = [loop.create_task(g.start(deadline, stream=False),
                                  context=contextvars.Context() if len(generations) > 1 else None) for g in generations]
        try:
            await asyncio.gather(*tasks)
            return [g.result() for g in generations]
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            self._untrack(len(generations))

    async def _open_stream(self, request: dict) -> tuple[_Generation, float | None]:
        """Start a streaming generation, until its first event: errors raise here, before
        any response header is sent (a user error as a 400, the deadline as a 504)."""
        generation = _Generation(self, self._checked(request), time.perf_counter())
        deadline = self._deadline()
        await self._admit()
        try:
            await generation.start(deadline, stream=True)
            if isinstance(generation.first, Failed):
                raise self.failure(generation.first, generation.rid)
        except BaseException:
            self._untrack()
            raise
        return generation, deadline

    async def _events(self, generation: _Generation, deadline: float | None):
        """An open stream's events until its Final, the admission released at its end."""
        try:
            async for event in generation.events(deadline):
                yield event
        finally:
            self._untrack()

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
        them; also refreshes the running replicas and routers admission divides by."""
        app_status = serve.status().applications.get(self.replica.app_name)
        status = app_status and app_status.deployments.get(self.replica.deployment_name)
        if status is None:
            return "the replicas are not deployed"
        self.metrics.running_capacity = status.replica_states.get("RUNNING", 0)
        routers = app_status.deployments.get(self.deployment_name)
        self.routers = max(1, routers.replica_states.get("RUNNING", 0) if routers else 1)
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
            card = self.model_card
            return _JSON({"object": "list", "data": [{
                "id": self.model_name, "object": "model", "created": self.created, "owned_by": "pace-serve",
                "max_model_len": card.get("max_context"), "root": self.model_name,  # no server paths
                "speculative_decoding": "pard" if card.get("num_speculative_tokens") else None,
                "num_speculative_tokens": card.get("num_speculative_tokens")}]})
        return await self._route("/v1/models", request, fn)

    @app.post("/v1/completions")
    async def completions(self, request: Request):
        async def fn(rid):
            body = await _parse(request, CompletionRequest, self.args.max_request_bytes)
            body.refuse_unsupported()
            self._check_model(body.model)
            prompts = body.prompts()
            common = {"sampling": body.sampling(), "request_id": rid}
            if len(prompts) == 1:  # several prompts are siblings, not one session's turns
                common.update(_session(request.headers.get("x-session-id") or body.user))
            if body.stream:
                if len(prompts) != 1:
                    raise APIError(400, "streaming takes one prompt per request", "prompt")
                return await self._stream_response("completion", rid, {"prompt": prompts[0], **common}, body)
            limit = self.args.max_prompts_per_request
            if len(prompts) > limit:
                raise APIError(400, f"the request has {len(prompts)} prompts; this server takes at most {limit} per "
                                    "request (app argument max_prompts_per_request): send them in several requests",
                               "prompt", code="too_many_prompts")
            results = await self._generate_all([{"prompt": p, **common} for p in prompts])
            return _JSON(completion_body(rid, self.model_name, results))
        return await self._route("/v1/completions", request, fn, "cmpl")

    @app.post("/v1/chat/completions")
    async def chat_completions(self, request: Request):
        async def fn(rid):
            body = await _parse(request, ChatCompletionRequest, self.args.max_request_bytes)
            body.refuse_unsupported()
            self._check_model(body.model)
            req = {"messages": body.plain_messages(), "sampling": body.sampling(), "request_id": rid,
                   **_session(request.headers.get("x-session-id") or body.user)}
            if body.stream:
                return await self._stream_response("chat", rid, req, body)
            return _JSON(chat_body(rid, self.model_name, *await self._generate(req)))
        return await self._route("/v1/chat/completions", request, fn, "chatcmpl")

    async def _stream_response(self, kind: str, rid: str, request: dict, body) -> StreamingResponse:
        """Open the generation (errors raise here, as their status) and stream it as SSE."""
        generation, deadline = await self._open_stream(request)
        usage = bool(body.stream_options and body.stream_options.include_usage)
        return StreamingResponse(self._sse_events(kind, rid, generation, deadline, usage),
                                 media_type="text/event-stream")

    async def _sse_events(self, kind: str, rid: str, generation: _Generation, deadline, include_usage: bool):
        """OpenAI's chunk format for ``kind`` "completion" or "chat": a chunk per Delta,
        a final chunk with the finish reason, optionally a usage chunk, then [DONE]. A
        failure after the first event ends the stream with an error event in OpenAI's
        error shape, then [DONE]."""
        model, created = self.model_name, int(time.time())
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
            async for event in self._events(generation, deadline):
                if isinstance(event, Final):
                    yield piece("", event.finish_reason)
                    if include_usage:
                        u = event.usage
                        yield _sse(usage_chunk(rid, model, created, "chat.completion.chunk" if chat else
                                               "text_completion", u.prompt_tokens, u.completion_tokens,
                                               u.cached_tokens))
                elif event.text or event.logprobs:
                    yield piece(event.text, None, event.logprobs)
                    offset += sum(len(e["token"]) for e in event.logprobs or ())
        except GenerationError as err:
            if isinstance(err, EngineFailure):
                self.metrics.stream_error()
            yield _sse(_api_error(err, rid).body())
        except Exception:
            logger.exception("request %s failed after its first event", rid)
            self.metrics.stream_error()
            yield _sse(_api_error(EngineFailure(), rid).body())
        yield "data: [DONE]\n\n"

    # ------------------------------------------------------------------ Python handle methods
    # The same operations for a DeploymentHandle: results are the events' dicts
    # (Delta.to_dict, Final.to_dict); a failure raises its pace_core.outputs.GenerationError
    # (RequestError for bad input, Overloaded, DeadlineExceeded, EngineFailure).
    @staticmethod
    def _sampling_dict(sampling) -> dict:
        if sampling is None:
            return {}
        if hasattr(sampling, "model_dump"):
            return sampling.model_dump(exclude_unset=True)
        if not isinstance(sampling, dict):
            raise RequestError(f"sampling must be a SamplingConfig or a dict of its fields (got {type(sampling).__name__})")
        return dict(sampling)

    @staticmethod
    def _messages(messages) -> list[dict]:
        """A handle call's messages, validated as an HTTP body's are; raises APIError."""
        try:
            return plain_messages(messages)
        except ValidationError as err:
            raise validation_error([{**e, "loc": ("messages", *e["loc"])} for e in err.errors()]) from None

    def _handle_request(self, sampling, session_id, prompt=None, messages=None) -> dict:
        request = {"sampling": self._sampling_dict(sampling), **_session(session_id)}
        if messages is not None:
            return {**request, "messages": self._messages(messages)}
        return {**request, "prompt": prompt}

    @staticmethod
    def _typed(err: Exception) -> Exception:
        """The exception a handle caller gets: a GenerationError, never a raw one."""
        if isinstance(err, GenerationError):
            return err
        if isinstance(err, APIError):  # the request's checks
            return RequestError(err.message)
        rid = new_id("req")
        logger.error("request %s failed", rid, exc_info=err)
        return EngineFailure(_internal_message(rid))

    async def _unary(self, **request) -> dict:
        try:
            delta, final = await self._generate(self._handle_request(**request))
        except Exception as err:
            raise self._typed(err) from None
        return {**delta.to_dict(), **final.to_dict(), "type": "completion"}

    async def _stream(self, **request):
        try:
            generation, deadline = await self._open_stream(self._handle_request(**request))
            async for event in self._events(generation, deadline):
                yield event.to_dict()
        except Exception as err:
            raise self._typed(err) from None

    async def generate(self, prompt, sampling=None, session_id=None) -> dict:
        """handle.generate.remote("def f():", {"max_new_tokens": 32}) -> {"type": "completion",
        "text", "token_ids", "finish_reason", "usage", "stats", "engine"} (+ "logprobs" when
        asked). ``session_id`` (every method): requests with one go to the same replica when it is free."""
        return await self._unary(prompt=prompt, sampling=sampling, session_id=session_id)

    async def chat(self, messages: list[dict], sampling=None, session_id=None) -> dict:
        return await self._unary(messages=messages, sampling=sampling, session_id=session_id)

    async def generate_stream(self, prompt, sampling=None, session_id=None):
        """handle.options(stream=True).generate_stream.remote(prompt, sampling): yields
        {"type": "delta", "text", "token_ids"} dicts, then one {"type": "final", ...}."""
        async for event in self._stream(prompt=prompt, sampling=sampling, session_id=session_id):
            yield event

    async def chat_stream(self, messages: list[dict], sampling=None, session_id=None):
        async for event in self._stream(messages=messages, sampling=sampling, session_id=session_id):
            yield event

    async def info(self) -> dict:
        """This router and what it knows of the replicas, asking none of them (their engines'
        facts as their latest Final here reported them)."""
        return {"served_model_name": self.model_name, "args": self.args.model_dump(), "model": self.model_card,
                "router_pid": os.getpid(), "in_flight": self.metrics.in_flight, "routers": self.routers,
                "replicas": dict(self.replicas_seen)}
