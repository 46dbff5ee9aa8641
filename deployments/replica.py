"""The replica: one LLMModel (target + optional PARD draft) pinned to one NUMA slot,
serving one request at a time. No model math here: it only calls pace_core."""
from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor

from ray import serve

logger = logging.getLogger("ray.serve")

USER_ERRORS = (ValueError,)  # RequestError, pydantic ValidationError and ModelLoadError are ValueErrors


def load_model(args: dict, num_threads: int | None = None):
    """The LLMModel a replica serves, from the app arguments (``AppArgs`` as a dict);
    the benchmarks build their in-process engine with it too."""
    from pace_core import LLMModel, PardSpecDecodeConfig

    pard = None
    if args.get("draft"):
        pard = PardSpecDecodeConfig(model_name_or_path=args["draft"], pard_token=args.get("pard_token"),
                                    num_speculative_tokens=args.get("num_speculative_tokens", 8),
                                    speculation_schedule=args.get("speculation_schedule", "adaptive"))
    return LLMModel(args["target"], dtype=args.get("dtype", "auto"), pard_config=pard,
                    tokenizer_name_or_path=args.get("tokenizer"), num_threads=num_threads,
                    trust_remote_code=args.get("trust_remote_code", False))


@serve.deployment(max_ongoing_requests=1, health_check_period_s=5, graceful_shutdown_timeout_s=5)
class LLMReplica:
    def __init__(self, args: dict):
        from pace_core.numa import claim_slot_and_pin

        # pin BEFORE loading: first-touch then places the weights in the slot's memory
        self.slot = claim_slot_and_pin(cores_per_slot=args.get("cores_per_slot")) if args.get("pin", True) else None
        t0 = time.perf_counter()
        self.model = load_model(args)
        self.load_s = time.perf_counter() - t0
        self.stream_interval_s = args.get("stream_interval_ms", 0) / 1000
        # one thread runs the engine: steps of a request never overlap, and closing a
        # generator waits for its current step
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pace-engine")
        self.requests_served = 0
        self.tokens_generated = 0
        self.last_request: dict = {}  # tokens generated and finish reason of the latest request
        logger.info("replica pid %d: %s loaded in %.1fs; slot %s", os.getpid(), args["target"], self.load_s,
                    self.slot.to_dict() if self.slot else "none (not pinned)")

    def _prompt_ids(self, request: dict) -> list[int]:
        if request.get("messages") is not None:
            return self.model.apply_chat_template(request["messages"])
        return self.model.encode(request["prompt"])

    async def stream(self, request: dict):
        """Yield dicts: {"text", "token_ids", "finish_reason", "num_prompt_tokens"} as
        tokens are accepted (chunks the transport had no time to send yet go out
        together), the last with "stats"; a user error yields one {"error": ...}."""
        from pace_core import SamplingConfig

        loop = asyncio.get_running_loop()
        try:
            prompt_ids = await loop.run_in_executor(self._executor, self._prompt_ids, request)
            fields = dict(request.get("sampling", {}))
            room = (self.model.max_context or 1 << 30) - len(prompt_ids)
            if request.get("max_tokens_is_default") and room > 0:
                fields["max_new_tokens"] = min(fields.get("max_new_tokens", room), room)  # as vLLM: fit the context
            sampling = SamplingConfig(**fields)
            self.model.check_request(prompt_ids, sampling)
        except USER_ERRORS as err:
            yield {"error": _error_message(err)}
            return
        # The engine thread runs the request to its end without waiting for the
        # transport; the event loop sends whatever chunks are ready as one message.
        queue: asyncio.Queue = asyncio.Queue()
        stop = threading.Event()
        self.last_request = {"tokens": 0, "finish_reason": None}
        engine = loop.run_in_executor(self._executor, self._run_engine, prompt_ids, sampling, loop, queue, stop)
        try:
            next_send = 0.0
            while True:
                ready = await _take_ready(queue, next_send)
                next_send = loop.time() + self.stream_interval_s
                if isinstance(ready[-1], BaseException):
                    raise ready[-1]
                chunks = [c for c in ready if c is not None]
                if chunks:
                    out = {"text": "".join(c.text for c in chunks), "token_ids": [t for c in chunks for t in c.token_ids],
                           "finish_reason": chunks[-1].finish_reason, "num_prompt_tokens": len(prompt_ids)}
                    if chunks[-1].finish_reason:
                        out["stats"] = chunks[-1].stats.to_dict()
                    yield out
                if ready[-1] is None:  # the engine is done
                    break
        finally:
            # normal end, or the caller went away (cancellation): the engine stops after
            # its current step, and the replica is free once it has
            stop.set()
            await engine
            self.requests_served += 1

    def _run_engine(self, prompt_ids, sampling, loop, queue: asyncio.Queue, stop: threading.Event) -> None:
        """Engine thread: decode until the end or until ``stop`` is set, handing each
        chunk to the event loop as it is accepted; then None (or the exception)."""
        chunks = self.model.stream(prompt_ids, sampling)
        end = None
        try:
            for chunk in chunks:
                self.last_request["tokens"] += len(chunk.token_ids)
                self.tokens_generated += len(chunk.token_ids)
                self.last_request["finish_reason"] = chunk.finish_reason
                loop.call_soon_threadsafe(queue.put_nowait, chunk)
                if stop.is_set():
                    break
        except Exception as err:  # surfaces in the request, the replica keeps serving
            end = err
        finally:
            chunks.close()
            loop.call_soon_threadsafe(queue.put_nowait, end)

    async def generate(self, request: dict) -> dict:
        """The whole output at once (same dict keys as the stream's chunks, joined)."""
        text, ids, last = [], [], {}
        async for chunk in self.stream(request):
            if "error" in chunk:
                return chunk
            text.append(chunk["text"])
            ids += chunk["token_ids"]
            last = chunk
        return {**last, "text": "".join(text), "token_ids": ids}

    def info(self) -> dict:
        import torch

        return {
            "pid": os.getpid(),
            "target": self.model.config.model_name_or_path,
            "draft": self.model.config.pard_config.model_name_or_path if self.model.draft else None,
            "num_speculative_tokens": self.model.num_speculative_tokens,
            "speculation_schedule": self.model.speculation_schedule if self.model.draft else None,
            "dtype": str(self.model.dtype).removeprefix("torch."),
            "forward": self.model.forward_kind,
            "max_context": self.model.max_context,
            "slot": self.slot.to_dict() if self.slot else None,
            "cpu_affinity": sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
            "torch_threads": torch.get_num_threads(),
            "load_s": self.load_s,
            "requests_served": self.requests_served,
            "tokens_generated": self.tokens_generated,
            "last_request": dict(self.last_request),
        }

    def check_health(self) -> None:
        if self.model is None:
            raise RuntimeError("model not loaded")

    def __del__(self):
        executor = getattr(self, "_executor", None)
        if executor is not None:
            executor.shutdown(wait=False, cancel_futures=True)
        if getattr(self, "slot", None) is not None:
            self.slot.release()


async def _take_ready(queue: asyncio.Queue, not_before: float) -> list:
    """At least one item; then everything that arrives until the loop time
    ``not_before`` (or nothing more, when it has passed), stopping at the end marker
    (None or an exception)."""
    loop = asyncio.get_running_loop()
    ready = [await queue.get()]
    while ready[-1] is not None and not isinstance(ready[-1], BaseException):
        if not queue.empty():
            ready.append(queue.get_nowait())
            continue
        wait = not_before - loop.time()
        if wait <= 0:
            break
        try:
            ready.append(await asyncio.wait_for(queue.get(), wait))
        except asyncio.TimeoutError:
            break
    return ready


def _error_message(err: Exception) -> str:
    """A one-line message for a user error (pydantic errors list each field)."""
    errors = getattr(err, "errors", None)
    if callable(errors):
        try:
            return "; ".join(f"{'.'.join(str(x) for x in e['loc'])}: {e['msg']}".lstrip(": ") for e in errors())
        except Exception:
            pass
    return str(err)
