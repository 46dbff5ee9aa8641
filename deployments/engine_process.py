"""The replica's engine in a process of its own.

A Serve replica's Python threads (Ray's event loops, gRPC, Serve's streaming
machinery) would otherwise share one GIL with the decoding loop: each streamed message
costs the engine time, and on a multi-core slot the threads' GIL hand-offs slow the
engine down far more than their CPU time (measured: x1.8 with Serve's threads on
another core). Here the engine process owns the model, is pinned to the replica's
slot, and talks to the replica over a socket pair: the replica sends a request, the
engine sends back its chunks as they are accepted, and a ``stop`` message ends a
request early (after the current step). No model math happens on the replica's side.

    engine = EngineProcess(app_args.model, slot)  # LLMModel.from_config(model); raises ModelLoadError
    engine.send(("generate", request))            # then engine.recv() until ("end", ...)

Messages from the engine: ("ready", info), ("load_error", message),
("chunk", pace_core.outputs.StreamChunk), ("user_error", message), ("end", error message or None).

Nothing a request carries can end the engine process: a request that fails in any
way is answered with ("user_error", ...) (a ValueError: the client's mistake) or
("end", message) (anything else, logged here with the request's id), and the engine
waits for the next one. If the process dies anyway (killed, out of memory, a crash in
native code), the replica notices at once and starts a new one on the same slot
(:mod:`deployments.replica`).
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

    def __init__(self, model: ModelConfig | dict, slot=None, wait: bool = True, first_chunk_pause_s: float = 0.0):
        model = ModelConfig.model_validate(model)  # the app argument ``model``; a dict is validated here
        ours, theirs = socket.socketpair()
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen([sys.executable, "-m", "deployments.engine_process", str(theirs.fileno())],
                                     pass_fds=[theirs.fileno()], env=env)
        theirs.close()
        self.conn = Connection(ours.detach())
        self.info: dict = {}  # once loaded: pid, model description, pinning
        self.send((model, slot, first_chunk_pause_s))
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

def _describe(model, pinned: dict, first_chunk_pause_s: float) -> dict:
    import torch

    return {
        "engine_pid": os.getpid(),
        "target": model.config.model_name_or_path,
        "draft": model.config.pard_config.model_name_or_path if model.draft else None,
        "num_speculative_tokens": model.num_speculative_tokens,
        "speculation_schedule": model.speculation_schedule if model.draft else None,
        "dtype": str(model.dtype).removeprefix("torch."),
        "weights": model.weight_format,
        "draft_weights": model.draft.weight_format if model.draft else None,
        "forward": model.forward_kind,
        "max_context": model.max_context,
        "cpu_affinity": sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "torch_threads": torch.get_num_threads(),
        "membind": pinned.get("membind"),
        "priority": pinned.get("priority"),
        "first_chunk_pause_ms": first_chunk_pause_s * 1000,
        "prefix_cache": model.prefix_cache_stats(),
    }


def _serve_request(model, conn: Connection, request, first_chunk_pause_s: float = 0.0) -> None:
    """Answer one request: ("user_error", message) if it cannot be served as asked, else
    its chunks, then ("end", None or an error message). Whatever the request holds, the
    engine survives it (a Rust panic in a tokenizer is a BaseException, hence the wide
    catches).

    After the first chunk (unless it is also the last) the engine sleeps
    ``first_chunk_pause_s`` (app argument first_chunk_pause_ms) before decoding on. It
    decodes at niceness 0 (:func:`raise_priority`) while the processes that carry the
    chunk to the client (replica, router, HTTP proxy) run at Ray's 15: on a host whose
    cores the engines fill, they waited tens of ms for a time slice; the pause hands them
    the engine's core. Measured with benchmarks/multi_turn.py on 2 cores
    (docs/performance.md): TTFT p50 of cached turns ~140 -> ~105-115 ms (2 ms: no change;
    5 to 10 ms: the same gain). It never delays the first token; a request ends that
    much later."""
    rid = request.get("request_id") if isinstance(request, dict) else None
    try:
        prepared = model.prepare(request.get("prompt"), request.get("sampling") or {}, messages=request.get("messages"),
                                 fit_context=bool(request.get("max_tokens_is_default")))
    except USER_ERRORS as err:
        conn.send(("user_error", error_message(err)))
        return
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException:
        logger.exception("request %s: could not be prepared", rid)
        conn.send(("end", "the request could not be prepared"))
        return
    error = None
    chunks = model.run(prepared)
    first = True
    try:
        for chunk in chunks:
            if chunk.finish_reason:
                chunk.engine = {"engine_pid": os.getpid(), "prefix_cache": model.prefix_cache_stats()}
            conn.send(("chunk", chunk))
            if first and first_chunk_pause_s and not chunk.finish_reason:
                time.sleep(first_chunk_pause_s)
            first = False
            if conn.poll():  # the only message that can arrive mid-request is "stop"
                conn.recv()
                break
    except (KeyboardInterrupt, SystemExit, BrokenPipeError, ConnectionResetError):
        raise  # stopped, or the replica is gone
    except BaseException as err:  # surfaces in the request; the engine keeps serving
        logger.exception("request %s failed in the engine", rid)
        error = f"{type(err).__name__}: {err}"
    finally:
        chunks.close()
    conn.send(("end", error))


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
    model_config, slot, first_chunk_pause_s = conn.recv()
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
    conn.send(("ready", _describe(model, pinned, first_chunk_pause_s)))
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
            return "; ".join(f"{'.'.join(str(x) for x in e['loc'])}: {e['msg']}".lstrip(": ") for e in errors())
        except Exception:
            pass
    return str(err)


if __name__ == "__main__":
    main(int(sys.argv[1]))
