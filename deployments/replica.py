"""The replica: one LLMModel (target + optional PARD draft) pinned to one NUMA slot,
serving one request at a time. The model lives in the replica's engine process
(:mod:`deployments.engine_process`), so Serve's own threads never share a GIL with
the decoding loop; this actor only claims the slot, relays requests and streams."""
from __future__ import annotations

import asyncio
import logging
import os
import time

from ray import serve

from .engine_process import EngineProcess

logger = logging.getLogger("ray.serve")


def join_chunks(chunks: list[dict]) -> dict:
    """Consecutive chunks of one request as one: the last one's fields, with the text,
    token ids (and logprobs, when the request asked for them) of all."""
    out = {**chunks[-1], "text": "".join(c["text"] for c in chunks),
           "token_ids": [t for c in chunks for t in c["token_ids"]]}
    if "logprobs" in out:
        out["logprobs"] = [e for c in chunks for e in c["logprobs"]]
    return out


@serve.deployment(max_ongoing_requests=1, health_check_period_s=5, graceful_shutdown_timeout_s=5)
class LLMReplica:
    def __init__(self, args: dict):
        from pace_core.numa import claim_slot, pinning_enabled

        # the slot is claimed (locked) here, for as long as this actor lives; the
        # engine process pins itself to it before loading (first touch then places the
        # weights in the slot's memory)
        pin = args.get("pin", True) and pinning_enabled()
        self.slot = claim_slot(cores_per_slot=args.get("cores_per_slot")) if pin else None
        t0 = time.perf_counter()
        try:
            self.engine = EngineProcess(args, self.slot.slot if self.slot else None)
        except BaseException:
            if self.slot:
                self.slot.release()
            raise
        self.load_s = time.perf_counter() - t0
        if self.slot:
            self.slot.affinity = self.engine.info["cpu_affinity"]
            self.slot.torch_threads = self.engine.info["torch_threads"]
            self.slot.membind = self.engine.info.get("membind") or self.slot.membind
        self.stream_interval_s = args.get("stream_interval_ms", 0) / 1000
        self._busy = asyncio.Lock()  # one request at a time on the engine's socket
        self.requests_served = 0
        self.tokens_generated = 0
        self.last_request: dict = {}  # tokens generated and finish reason of the latest request
        logger.info("replica pid %d: engine pid %d loaded %s in %.1fs; slot %s", os.getpid(), self.engine.pid,
                    args["target"], self.load_s, self.slot.to_dict() if self.slot else "none (not pinned)")

    async def stream(self, request: dict):
        """Yield dicts: {"text", "token_ids", "finish_reason", "num_prompt_tokens"} as
        tokens are accepted (chunks the transport had no time to send yet go out
        together), the last with "stats"; a user error yields one {"error": ...}."""
        async with self._busy:
            self.engine.send(("generate", request))
            self.last_request = {"tokens": 0, "finish_reason": None}
            ended = False
            try:
                next_send = 0.0
                while not ended:
                    ready = await self._take_ready(next_send)
                    next_send = asyncio.get_running_loop().time() + self.stream_interval_s
                    chunks = []
                    for kind, payload in ready:
                        if kind == "user_error":
                            ended = True
                            yield {"error": payload}
                        elif kind == "chunk":
                            chunks.append(payload)
                            self._count(payload)
                        elif kind == "end":
                            ended = True
                            if payload is not None:
                                raise RuntimeError(f"generation failed: {payload}")
                    if chunks:
                        yield join_chunks(chunks)
            finally:
                # normal end, or the caller went away (cancellation): the engine stops
                # after its current step, and the replica is free once it has
                if not ended:
                    self.engine.send(("stop", None))
                    while not ended:
                        kind, payload = await self._recv()
                        ended = kind in ("end", "user_error")
                self.requests_served += 1

    def _count(self, chunk: dict) -> None:
        self.last_request["tokens"] += len(chunk["token_ids"])
        self.last_request["finish_reason"] = chunk["finish_reason"]
        self.tokens_generated += len(chunk["token_ids"])

    async def _recv(self):
        """The engine's next message, without blocking the event loop."""
        if not self.engine.poll():
            loop = asyncio.get_running_loop()
            readable = loop.create_future()
            fd = self.engine.fileno()
            loop.add_reader(fd, lambda: readable.done() or readable.set_result(None))
            try:
                await readable
            finally:
                loop.remove_reader(fd)
        return self.engine.recv()

    async def _take_ready(self, not_before: float) -> list:
        """At least one message; then every one already there, and those arriving until
        the loop time ``not_before``, stopping at the end of the request."""
        loop = asyncio.get_running_loop()
        ready = [await self._recv()]
        while ready[-1][0] == "chunk":
            if self.engine.poll():
                ready.append(self.engine.recv())
                continue
            wait = not_before - loop.time()
            if wait <= 0:
                break
            try:
                ready.append(await asyncio.wait_for(self._recv(), wait))
            except asyncio.TimeoutError:
                break
        return ready

    async def generate(self, request: dict) -> dict:
        """The whole output at once (same dict keys as the stream's chunks, joined)."""
        chunks = []
        async for chunk in self.stream(request):
            if "error" in chunk:
                return chunk
            chunks.append(chunk)
        return join_chunks(chunks)

    def info(self) -> dict:
        return {
            **self.engine.info,  # pid (the engine's), model, dtype, forward, cpu_affinity, torch threads
            "replica_pid": os.getpid(),
            "slot": self.slot.to_dict() if self.slot else None,
            "load_s": self.load_s,
            "requests_served": self.requests_served,
            "tokens_generated": self.tokens_generated,
            "last_request": dict(self.last_request),
        }

    def check_health(self) -> None:
        if not self.engine.alive():
            raise RuntimeError(f"the engine process (pid {self.engine.pid}) exited with code "
                               f"{self.engine.proc.returncode}")

    def __del__(self):
        if getattr(self, "engine", None) is not None:
            self.engine.close()
        if getattr(self, "slot", None) is not None:
            self.slot.release()
