"""The replica's engine process, driven directly (no Ray): same tokens as the engine
in-process, user errors as messages, early stop, load errors and a dead engine."""
from __future__ import annotations

import os
import signal

import pytest

from deployments.engine_process import EngineError, EngineProcess
from pace_core import Delta, Failed, Final, LLMModel, ModelConfig, PardSpecDecodeConfig, SamplingConfig, Usage
from pace_core.outputs import GenerationStats
from pace_core.loading import ModelLoadError


def _run(engine: EngineProcess, request: dict, stop_after: int | None = None) -> list:
    """The request's events, to its Final or Failed; ``stop_after`` Deltas, the replica's stop."""
    engine.send(("generate", request))
    events = []
    while True:
        event = engine.recv()
        events.append(event)
        if isinstance(event, Delta) and stop_after is not None and len(events) == stop_after:
            engine.send(("stop", None))
        if not isinstance(event, Delta):
            return events


def test_engine_process_streams_the_engines_events(tiny_pair):
    target, draft = tiny_pair
    model = ModelConfig(model_name_or_path=target, dtype="float32",
                        pard_config=PardSpecDecodeConfig(model_name_or_path=draft, num_speculative_tokens=4))
    engine = EngineProcess(model)  # the app argument ``model``, as the replica passes it
    try:
        assert engine.info["engine_pid"] == engine.pid != os.getpid() and engine.info["replica_pid"] == os.getpid()
        assert engine.info["num_speculative_tokens"] == 4 and engine.info["dtype"] == "float32"
        request = {"prompt": "def add(a, b):", "sampling": {"max_new_tokens": 40, "ignore_eos": True}}
        *deltas, final = _run(engine, request)  # the events of LLMModel.run, unchanged
        local = LLMModel(target, dtype="float32",
                         pard_config=PardSpecDecodeConfig(model_name_or_path=draft, num_speculative_tokens=4))
        expected = local.generate("def add(a, b):", SamplingConfig(max_new_tokens=40, ignore_eos=True))
        assert all(isinstance(d, Delta) for d in deltas) and isinstance(final, Final)
        assert [t for d in deltas for t in d.token_ids] == expected.token_ids
        assert final.finish_reason == "length" and final.stats.steps == len(deltas)
        assert final.usage == Usage(len(local.encode("def add(a, b):")), 40, final.usage.cached_tokens)
        assert final.engine["engine_pid"] == engine.pid and final.engine["engine_start"] == 1

        # a user error is a Failed, and the engine keeps serving
        (failed,) = _run(engine, {"prompt": "x", "sampling": {"max_new_tokens": -1}})
        assert failed.kind == "invalid_request" and "max_new_tokens" in failed.message

        # stop after the first Delta: the engine ends the request within a step
        long = {"prompt": "x", "sampling": {"max_new_tokens": 400, "ignore_eos": True}}
        *deltas, end = _run(engine, long, stop_after=1)
        assert end == Failed("cancelled", "stopped: its caller went away")
        assert sum(len(d.token_ids) for d in deltas) < 60
        assert isinstance(_run(engine, request)[-1], Final)  # and serves the next one

        os.kill(engine.pid, signal.SIGKILL)
        engine.proc.wait(10)
        assert not engine.alive()
        with pytest.raises(EngineError, match="engine process is gone"):
            _run(engine, request)
    finally:
        engine.close()


def test_engine_process_load_error_names_the_problem(tmp_path):
    with pytest.raises(ModelLoadError, match="config.json"):
        EngineProcess({"model_name_or_path": str(tmp_path)})  # a directory without a model (a dict: validated)


def test_engine_raises_its_priority_from_rays_worker_niceness():
    """Ray starts workers at niceness 15, inherited by the engine process: the engine
    returns to normal priority when allowed (root / CAP_SYS_NICE)."""
    import subprocess
    import sys

    code = ("import os; from deployments.engine_process import raise_priority; "
            "print(raise_priority()); print(os.getpriority(os.PRIO_PROCESS, 0))")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                         preexec_fn=lambda: os.nice(15 - os.getpriority(os.PRIO_PROCESS, 0)))
    assert run.returncode == 0, run.stderr
    message, nice = run.stdout.splitlines()
    if nice == "0":
        assert message == "niceness 15 -> 0"
    else:  # unprivileged: unchanged, and the warning names the fix
        assert (message, nice) == ("niceness 15", "15") and "RAY_worker_niceness=0" in run.stderr


def test_engine_priority_unprivileged_names_the_fix(monkeypatch):
    import errno

    from deployments import engine_process

    def refuse(*_):
        raise PermissionError(errno.EPERM, "Operation not permitted")

    warnings = []  # recorded directly: Serve's logger may not propagate to pytest's capture
    monkeypatch.setattr(engine_process.os, "getpriority", lambda *_: 15)
    monkeypatch.setattr(engine_process.os, "setpriority", refuse)
    monkeypatch.setattr(engine_process.logger, "warning", lambda msg, *a: warnings.append(msg % a))
    assert engine_process.raise_priority() == "niceness 15"
    assert len(warnings) == 1 and "RAY_worker_niceness=0" in warnings[0]


def test_engine_survives_any_request(tiny_pair):
    """Requests the router would refuse, sent to the engine directly: each is answered
    as an error (a tokenizer's TypeError for a lone surrogate, garbage payloads), and
    the same engine process serves the next request."""
    target, draft = tiny_pair
    engine = EngineProcess({"model_name_or_path": target, "dtype": "float32",
                            "pard_config": {"model_name_or_path": draft, "num_speculative_tokens": 2}})
    try:
        for request in ({"prompt": "abc\ud800def", "request_id": "r1"},
                        {"messages": [{"role": "user", "content": "\udfff"}]},
                        {"prompt": None}, {"prompt": [[1, 2], 3]}, "garbage", {"sampling": 5, "prompt": "x"},
                        {"prompt": "x", "sampling": {"max_new_tokens": 2, "seed": 2 ** 70}}):
            (failed,) = _run(engine, request)
            assert isinstance(failed, Failed) and failed.kind in ("invalid_request", "engine") and failed.message
            assert engine.alive()
        final = _run(engine, {"prompt": "x", "sampling": {"max_new_tokens": 3, "ignore_eos": True}})[-1]
        assert isinstance(final, Final) and final.engine["engine_pid"] == engine.pid
    finally:
        engine.close()


def test_engine_pauses_after_its_first_delta(monkeypatch):
    """_serve_request with a stand-in model: after the first Delta the engine sleeps
    first_chunk_pause_s (so Serve's lower-priority processes can carry it to the client),
    and never after the others; a pause of 0 is none."""
    from types import SimpleNamespace

    from deployments import engine_process

    events = []
    monkeypatch.setattr(engine_process, "time", SimpleNamespace(sleep=lambda s: events.append(("sleep", s))))

    class Model:
        def __init__(self, n):
            self.n = n

        def prepare(self, *args, **kwargs):
            return None

        def run(self, prepared):
            for i in range(self.n):
                yield Delta([i], str(i))
            yield Final("length", Usage(1, self.n), GenerationStats())

    conn = SimpleNamespace(send=lambda event: events.append(type(event).__name__), poll=lambda: False)
    engine_process._serve_request(Model(3), conn, {"prompt": "x"}, 0.008)
    assert events == ["Delta", ("sleep", 0.008), "Delta", "Delta", "Final"]
    events.clear()
    engine_process._serve_request(Model(3), conn, {"prompt": "x"}, 0.0)
    assert events == ["Delta"] * 3 + ["Final"]
