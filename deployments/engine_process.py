"""The replica's engine in a process of its own.

A Serve replica's Python threads (Ray's event loops, gRPC, Serve's streaming
machinery) would otherwise share one GIL with the decoding loop: each streamed message
costs the engine time, and on a multi-core slot the threads' GIL hand-offs slow the
engine down far more than their CPU time (measured: x1.8 with Serve's threads on
another core). Here the engine process owns the model, is pinned to the replica's
slot, and talks to the replica over a socket pair: the replica sends a request, the
engine sends back its events as tokens are accepted, and a ``stop`` message ends a
request early (after the current step). No model math happens on the replica's side.

    engine = EngineProcess(app_args.model, slot)  # LLMModel.from_config(model); raises ModelLoadError
    engine.send(("generate", request))            # then engine.recv() until a Final or a Failed

Messages from the engine: ("ready", facts) or ("load_error", message) once it is
loaded; then, for each request, the events of ``LLMModel.run`` as they come
(pace_core.outputs: Delta ..., then a Final), or a Failed: ``invalid_request`` (the
client's mistake: a ValueError), ``engine`` (anything else, logged here with the
request's id) or ``cancelled`` (the replica's ``stop``, after the current step).

Nothing a request carries can end the engine process: whatever fails in it ends with a
Failed, and the engine waits for the next one. If the process dies anyway (killed, out
of memory, a crash in native code), the replica notices at once and starts a new one
on the same slot (:mod:`deployments.replica`).
"""
from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import time
from multiprocessing.connection import Connection

from pace_core.configs import ModelConfig
from pace_core.outputs import Delta, Failed

from . import NICENESS_ENV

logger = logging.getLogger("ray.serve")

USER_ERRORS = (ValueError,)  # RequestError, pydantic ValidationError and ModelLoadError are ValueErrors


class EngineError(RuntimeError):
    """The engine process died (or broke the protocol) while serving a request."""


class EngineStalled(EngineError):
    """The engine made no progress (no message) within the replica's step bound."""


class EngineUnavailable(EngineError):
    """The replica has no engine (it is shutting down): the request was not started, and
    the router retries it on another replica."""


class EngineProcess:
    """Start the engine process and (unless ``wait=False``) wait until its model is
    loaded; with ``wait=False`` call :meth:`wait_ready` once :meth:`fileno` is readable."""

    def __init__(self, model: ModelConfig | dict, slot=None, wait: bool = True, first_chunk_pause_s: float = 0.0,
                 start: int = 1):
        model = ModelConfig.model_validate(model)  # the app argument ``model``; a dict is validated here
        ours, theirs = socket.socketpair()
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen([sys.executable, "-m", "deployments.engine_process", str(theirs.fileno())],
                                     pass_fds=[theirs.fileno()], env=env)
        theirs.close()
        self.conn = Connection(ours.detach())
        self.info: dict = {}  # once loaded: its facts (LLMModel.facts_now: the model, the pinning, the counts)
        self.send((model, slot, first_chunk_pause_s, start))
        if wait:
            self.wait_ready()

    def wait_ready(self) -> None:
        """Receive the engine's load result; raises ModelLoadError (or EngineError if
        the process died while loading)."""
        try:
            kind, payload = self.recv()
        except EngineError:
            self.close()
            raise
        if kind == "load_error":
            self.close()
            from pace_core.loading import ModelLoadError

            raise ModelLoadError(payload)
        self.info = payload

    @property
    def pid(self) -> int:
        return self.proc.pid

    def fileno(self) -> int:
        return self.conn.fileno()

    def alive(self) -> bool:
        return self.proc.poll() is None

    def send(self, message) -> None:
        try:
            self.conn.send(message)
        except OSError as err:
            raise EngineError(f"the engine process is gone (exit code {self.proc.poll()}): {err}") from None

    def poll(self) -> bool:
        return self.conn.poll()

    def recv(self):
        try:
            return self.conn.recv()
        except (EOFError, OSError) as err:
            raise EngineError(f"the engine process is gone (exit code {self.proc.poll()}): {err!r}") from None

    def close(self) -> None:
        try:
            self.conn.close()
        except OSError:
            pass
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()


# ------------------------------------------------------------------ the engine side

def _facts(pinned: dict, first_chunk_pause_s: float, start: int) -> dict:
    """This process's facts, which every Final reports beside the model's (LLMModel.facts)."""
    import torch

    return {
        "replica_pid": os.getppid(),
        "engine_start": start,  # 1 for the replica's first engine, 2 for the one it restarted, ...
        "cpu_affinity": sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "torch_threads": torch.get_num_threads(),
        "membind": pinned.get("membind"),
        "priority": pinned.get("priority"),
        "first_chunk_pause_ms": first_chunk_pause_s * 1000,
    }


def _serve_request(model, conn: Connection, request, first_chunk_pause_s: float = 0.0) -> None:
    """Answer one request with the events of ``model.run``, ended by its Final, or with a
    Failed (pace_core.outputs). Whatever the request holds, the engine survives it (a Rust
    panic in a tokenizer is a BaseException, hence the wide catches).

    After the first event (unless the request ended with it) the engine sleeps
    ``first_chunk_pause_s`` (app argument first_chunk_pause_ms) before decoding on. It
    decodes at niceness 0 (:func:`raise_priority`) while the processes that carry the
    event to the client (replica, router, HTTP proxy) run at Ray's 15: on a host whose
    cores the engines fill, they waited tens of ms for a time slice; the pause hands them
    the engine's core. Measured with benchmarks/multi_turn.py on 2 cores
    (docs/performance.md): TTFT p50 of cached turns ~140 -> ~105-115 ms (2 ms: no change;
    5 to 10 ms: the same gain). It never delays the first token; a request ends that
    much later."""
    rid = request.get("request_id") if isinstance(request, dict) else None
    try:
        prepared = model.prepare(request.get("prompt"), request.get("sampling") or {}, messages=request.get("messages"))
    except USER_ERRORS as err:
        conn.send(Failed("invalid_request", error_message(err)))
        return
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as err:
        logger.exception("request %s: could not be prepared", rid)
        conn.send(Failed("engine", f"the request could not be prepared: {type(err).__name__}: {err}"))
        return
    events = model.run(prepared)
    end = None
    try:
        for event in events:
            conn.send(event)
            if not isinstance(event, Delta):
                end = event
                break
            if first_chunk_pause_s:
                time.sleep(first_chunk_pause_s)
                first_chunk_pause_s = 0.0
            if conn.poll():  # the only message that can arrive mid-request is "stop"
                conn.recv()
                end = Failed("cancelled", "stopped: its caller went away")
                break
    except (KeyboardInterrupt, SystemExit, BrokenPipeError, ConnectionResetError):
        raise  # stopped, or the replica is gone
    except BaseException as err:  # surfaces in the request; the engine keeps serving
        logger.exception("request %s failed in the engine", rid)
        end = Failed("engine", f"{type(err).__name__}: {err}")
    finally:
        events.close()
    if end is None:  # not expected: run() always ends with a Final
        end = Failed("engine", "the generation ended without its Final")
    if isinstance(end, Failed):
        conn.send(end)


def raise_priority() -> str:
    """Decode at normal priority. Ray starts its workers (our replicas, hence their
    engines) at niceness 15 unless told otherwise (``RAY_worker_niceness``): there, any
    normal-priority process waking on the engine's cores (Ray's GCS and raylet, clients
    on the same host) preempts the decoding loop. The engine returns to niceness 0 when
    allowed (root or CAP_SYS_NICE) while the rest of Serve keeps Ray's niceness;
    otherwise a warning names the fix."""
    if not hasattr(os, "getpriority"):
        return "unknown"
    nice = os.getpriority(os.PRIO_PROCESS, 0)
    if nice <= 0:
        return f"niceness {nice}"
    try:
        os.setpriority(os.PRIO_PROCESS, 0, 0)
        return f"niceness {nice} -> 0"
    except OSError as err:
        logger.warning("the engine runs at niceness %d, inherited from Ray's workers, and may not lower it (%s): "
                       "start Ray with %s=0 (README, Serving) so that other processes do not preempt decoding",
                       nice, err.strerror, NICENESS_ENV)
        return f"niceness {nice}"


def main(fd: int) -> None:
    if sys.platform.startswith("linux"):  # die with the replica, whatever kills it
        import ctypes

        ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    logging.basicConfig(level=logging.INFO, format="%(asctime)s engine %(process)d %(levelname)s %(message)s")
    conn = Connection(fd)
    model_config, slot, first_chunk_pause_s, start = conn.recv()
    pinned: dict = {"priority": raise_priority()}
    try:
        if slot is not None:
            from pace_core.numa import pin_to_slot

            pinned.update(pin_to_slot(slot))  # before loading: first touch places the weights in the slot's memory
        from pace_core import LLMModel

        model = LLMModel.from_config(model_config)
    except Exception as err:
        conn.send(("load_error", f"{type(err).__name__}: {err}"))
        return
    model.facts.update(_facts(pinned, first_chunk_pause_s, start))
    conn.send(("ready", model.facts_now()))
    while True:
        try:
            kind, payload = conn.recv()
        except (EOFError, OSError):
            return  # the replica is gone
        if kind == "generate":
            try:
                _serve_request(model, conn, payload, first_chunk_pause_s)
            except (BrokenPipeError, ConnectionResetError):
                return  # the replica is gone
        # a "stop" that raced with the end of its request: nothing to stop


def error_message(err: Exception) -> str:
    """A one-line message for a user error (pydantic errors list each field)."""
    errors = getattr(err, "errors", None)
    if callable(errors):
        try:
            return "; ".join(f"{'.'.join(str(x) for x in e['loc'])}: {e['msg'].removeprefix('Value error, ')}"
                             .lstrip(": ") for e in errors())
        except Exception:
            pass
    return str(err)


if __name__ == "__main__":
    main(int(sys.argv[1]))
