"""The replica: one LLMModel (target + optional PARD draft) pinned to one NUMA slot,
serving one request at a time. The model lives in the replica's engine process
(:mod:`deployments.engine_process`), so Serve's own threads never share a GIL with
the decoding loop; this actor only claims the slot and relays requests and their events
(pace_core.outputs: Delta ..., then a Final or a Failed) between the router and its engine.

A dead engine costs one request: the replica watches its engine process (a pidfd on
the event loop), so it notices the death at once, not at the next health check. The
request that was on the engine ends with a Failed of kind ``engine`` (the router answers
a 500, or an SSE error event once streaming began), and a new engine starts on the same slot
(the slot stays claimed). Requests that arrive meanwhile wait for it. If it cannot
start, the replica process exits: a replica without an engine would look idle to
Serve's routing and draw every request, so it makes way instead; its waiting requests
fail before anything was sent, the router retries them on another replica, and Serve
starts a new replica. The health check fails only while the replica has no engine.

A stalled engine (no message within ``engine_step_timeout_s`` while it serves a
request: a step, or the prefill, that does not end; a stopped process) is killed, its
request ends with a Failed of kind ``engine``, the health check fails, and the replica process
exits: Serve replaces it, and the router's /health reports it until the replacement
serves. (Not restarted in place: a stall may be the host's or the slot's, and the exit
is what makes it visible to Serve.)"""
from __future__ import annotations

import asyncio
import logging
import os
import time

from ray import serve

from pace_core.outputs import Delta, Failed, Final

from .args import AppArgs
from .engine_process import EngineError, EngineProcess, EngineStalled, EngineUnavailable

logger = logging.getLogger("ray.serve")


async def _readable(fd: int) -> None:
    """Wait until ``fd`` is readable, without blocking the event loop."""
    loop = asyncio.get_running_loop()
    readable = loop.create_future()
    loop.add_reader(fd, lambda: readable.done() or readable.set_result(None))
    try:
        await readable
    finally:
        loop.remove_reader(fd)
        # uvloop (libuv) leaves a watched fd non-blocking; the engine's socket must
        # block, or a large request fails to send with EAGAIN
        os.set_blocking(fd, True)


@serve.deployment(max_ongoing_requests=1, health_check_period_s=5, graceful_shutdown_timeout_s=5)
class LLMReplica:
    step_timeout_s: float | None = None  # the engine's liveness bound (app argument engine_step_timeout_s)
    stalled: str | None = None  # why this replica is going away

    async def __init__(self, args: AppArgs | dict):
        from pace_core.numa import claim_slot, pinning_enabled

        args = AppArgs.model_validate(args)  # build_app passes the validated AppArgs itself

        # the slot is claimed (locked) here, for as long as this actor lives; the
        # engine process pins itself to it before loading (first touch then places the
        # weights in the slot's memory), and so does a restarted engine
        pin = args.pin and pinning_enabled()
        self.slot = claim_slot(cores_per_slot=args.cores_per_slot) if pin else None
        self.args = args
        self.engine: EngineProcess | None = None
        self.engine_starts = 0
        self._restarting: asyncio.Task | None = None
        self._busy = asyncio.Lock()  # one request at a time on the engine's socket
        try:
            await self._start_engine()
        except BaseException:
            if self.slot:
                self.slot.release()
            raise
        if self.slot:
            self.slot.affinity = self.engine.info["cpu_affinity"]
            self.slot.torch_threads = self.engine.info["torch_threads"]
            self.slot.membind = self.engine.info.get("membind") or self.slot.membind
        self.stream_interval_s = args.stream_interval_ms / 1000
        self.step_timeout_s = args.engine_step_timeout_s
        # the engine's facts (model, pinning, counts, prefix cache), as of its latest Final
        self.engine_facts: dict = dict(self.engine.info)
        logger.info("replica pid %d: engine pid %d loaded %s in %.1fs; slot %s", os.getpid(), self.engine.pid,
                    args.model.model_name_or_path, self.load_s, self.slot.to_dict() if self.slot else "none (not pinned)")

    # ------------------------------------------------------------------ the engine's life
    async def _start_engine(self) -> None:
        """Start an engine process and wait for its model, without blocking the loop.
        The process is started from the loop's thread, which lives as long as the
        replica (the engine's parent-death signal follows the thread that started it)."""
        t0 = time.perf_counter()
        engine = EngineProcess(self.args.model, self.slot.slot if self.slot else None, wait=False,
                               first_chunk_pause_s=self.args.first_chunk_pause_ms / 1000, start=self.engine_starts + 1)
        try:
            await _readable(engine.fileno())
            engine.wait_ready()
        except BaseException:
            engine.close()
            raise
        self.load_s = time.perf_counter() - t0
        self.engine_starts += 1
        self.engine = engine
        self.engine_facts = dict(engine.info)
        self._watch(engine)

    def _watch(self, engine: EngineProcess) -> None:
        """Call :meth:`_engine_gone` as soon as the engine process exits."""
        try:
            pidfd = os.pidfd_open(engine.pid)
        except (AttributeError, OSError):  # no pidfd (old kernel): the socket's EOF still tells, at the next request
            return
        loop = asyncio.get_running_loop()

        def exited():
            loop.remove_reader(pidfd)
            os.close(pidfd)
            self._engine_gone(engine)

        loop.add_reader(pidfd, exited)

    def _engine_gone(self, engine: EngineProcess) -> None:
        """The engine died: start a new one (once per dead engine). Only the user of
        the dead engine's socket closes it: this method when idle, else the request on
        it, which sees EOF at once."""
        if engine is not self.engine:
            return
        self.engine = None
        if not self._busy.locked():
            engine.close()
        engine.proc.poll()
        logger.error("the engine process (pid %d) exited with code %s; starting a new one on the same slot",
                     engine.pid, engine.proc.returncode)
        self._restarting = asyncio.get_running_loop().create_task(self._restart())

    async def _restart(self) -> None:
        try:
            await self._start_engine()
        except Exception:
            logger.exception("the engine could not be restarted: this replica exits; Serve replaces it, and the "
                             "router retries its requests on other replicas")
            os._exit(1)  # the slot's locks go with the process
        logger.info("engine pid %d restarted in %.1fs", self.engine.pid, self.load_s)

    # ------------------------------------------------------------------ requests
    async def stream(self, request: dict):
        """The request's events, as its engine sends them (pace_core.outputs): Deltas (those
        the transport had no time to send yet go out joined), then its Final, or a Failed
        (the engine's, or ``engine`` when the engine process died or stalled under it).
        Raises EngineUnavailable when nothing started (the router retries elsewhere)."""
        async with self._busy:
            if self.engine is None and self._restarting is not None:
                await asyncio.shield(self._restarting)  # a new engine is loading: wait for it
            engine = self.engine
            if engine is None:  # not expected: a replica whose engine cannot restart exits
                raise EngineUnavailable("this replica has no engine")
            rid = request.get("request_id")
            ended = False
            try:
                engine.send(("generate", request))
                next_send = 0.0
                while not ended:
                    ready = await self._take_ready(engine, next_send)
                    next_send = asyncio.get_running_loop().time() + self.stream_interval_s
                    deltas = [event for event in ready if isinstance(event, Delta)]
                    if deltas:
                        yield Delta.join(deltas)
                    if not isinstance(ready[-1], Delta):
                        ended = True
                        yield self._ended(ready[-1], rid)
            except EngineStalled as err:
                ended = True
                self._stalled(engine, rid, err)
                yield Failed("engine", f"request {rid}: {err}; the engine was stopped and its replica is being replaced")
            except EngineError as err:
                ended = True
                logger.error("request %s: %s", rid, err)
                self._engine_gone(engine)
                engine.close()
                yield Failed("engine", f"the engine process stopped while serving request {rid}; it is restarting")
            finally:
                # the caller went away (cancellation) before the end: the engine stops after
                # its current step, and the replica is free once it has
                if not ended:
                    try:
                        engine.send(("stop", None))
                        while isinstance(await self._recv(engine), Delta):
                            pass
                    except EngineStalled as err:
                        self._stalled(engine, rid, err)
                    except EngineError:
                        self._engine_gone(engine)
                        engine.close()

    def _ended(self, event: Final | Failed, rid) -> Final | Failed:
        """A request's last event: note the engine's facts, log an engine failure."""
        if isinstance(event, Final):
            self.engine_facts = event.engine
        elif event.kind == "engine":
            logger.error("request %s failed in the engine: %s", rid, event.message)
        return event

    def _stalled(self, engine: EngineProcess, rid, err: Exception) -> None:
        """The engine made no progress within the step bound: kill it (a stopped or
        wedged process may never answer a stop), fail the health check from now on, and
        exit shortly (once the request's error is on its way): Serve replaces this
        replica, and the slot's locks go with the process."""
        self.stalled = f"the engine process (pid {engine.pid}) stalled: {err}"
        logger.error("request %s: %s; this replica exits and Serve replaces it", rid, self.stalled)
        self.engine = None  # no restart in place
        engine.proc.kill()  # SIGKILL also ends a stopped process
        engine.close()
        asyncio.get_running_loop().call_later(1.0, os._exit, 1)

    async def _recv(self, engine):
        """The engine's next message, without blocking the event loop; EngineStalled if
        none comes within the step bound."""
        if not engine.poll():
            try:
                await asyncio.wait_for(_readable(engine.fileno()), self.step_timeout_s)
            except asyncio.TimeoutError:
                raise EngineStalled(f"no progress for {self.step_timeout_s:g} s (app argument "
                                    "engine_step_timeout_s)") from None
        return engine.recv()

    async def _take_ready(self, engine, not_before: float) -> list:
        """At least one event; then every one already there, and those arriving until the
        loop time ``not_before``, stopping at the end of the request."""
        loop = asyncio.get_running_loop()
        ready = [await self._recv(engine)]
        while isinstance(ready[-1], Delta):
            if engine.poll():
                ready.append(engine.recv())
                continue
            wait = not_before - loop.time()
            if wait <= 0:
                break
            try:
                ready.append(await asyncio.wait_for(self._recv(engine), wait))
            except asyncio.TimeoutError:
                break
        return ready

    async def generate(self, request: dict) -> list:
        """The whole output at once: [the joined Delta (if any), then the Final or Failed]."""
        events = [event async for event in self.stream(request)]
        deltas = [event for event in events if isinstance(event, Delta)]
        return ([Delta.join(deltas)] if deltas else []) + [event for event in events if not isinstance(event, Delta)]

    def info(self) -> dict:
        """This replica and its engine, for operations (a direct call through the
        LLMReplica deployment's handle takes the replica's request slot; the router's
        info() does not call it)."""
        return {
            **(self.engine_facts if self.engine else {"engine_pid": None}),
            "replica_pid": os.getpid(),
            "slot": self.slot.to_dict() if self.slot else None,
            "load_s": self.load_s,
            "engine_starts": self.engine_starts,
        }

    def check_health(self) -> None:
        if self.stalled:
            raise RuntimeError(self.stalled)
        if self.engine is None:
            raise RuntimeError("this replica has no engine process (it is restarting, or its restart failed)")

    def __del__(self):  # Serve calls it on shutdown
        engine, self.engine = getattr(self, "engine", None), None  # no restart for an engine stopped here
        if engine is not None:
            engine.close()
        if getattr(self, "slot", None) is not None:
            self.slot.release()
