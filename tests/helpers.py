"""Helpers shared by the slow Ray Serve tests."""
from __future__ import annotations

import contextlib
import json
import os
import socket
import time

import pytest


def sse_events(response, on_first=None) -> list:
    """The events of a streamed response: parsed JSON objects, and "[DONE]"; ``on_first``
    runs right after the first event arrives (e.g. to kill or stop an engine mid-stream)."""
    events = []
    for line in response.iter_lines():
        if line.startswith("data: "):
            events.append(line[6:] if line == "data: [DONE]" else json.loads(line[6:]))
            if len(events) == 1 and on_first is not None:
                on_first()
    return events


def wait_for(pred, timeout, what, interval=0.5):
    """Poll ``pred`` until it returns something truthy; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = pred()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what} (last: {last!r})")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def local_serve(namespace: str, num_cpus: int = 4, env: dict | None = None):
    """A private Ray node (explicit num_cpus, no dashboard) with Serve's HTTP proxy on a
    free 127.0.0.1 port, which it yields; ``env`` and PACE_PIN=0 (the pinning tests live
    in test_cluster_serve_pinning.py) set for its processes. Serve and Ray shut down
    after, the environment restored."""
    import ray
    from ray import serve

    env = {"PACE_PIN": "0", **(env or {})}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, namespace=namespace)
        try:
            port = free_port()
            serve.start(http_options={"host": "127.0.0.1", "port": port})
            yield port
        finally:
            serve.shutdown()
            ray.shutdown()
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def two_slot_serve(tmp_path, monkeypatch, namespace: str):
    """A private Ray node simulating 2 NUMA nodes x 1 core (2 units of the slot resource)
    with Serve started and no HTTP proxy; a generator for a fixture to yield from."""
    import ray
    from ray import serve

    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("needs 2 CPUs")
    # the raylet inherits these, and every replica process from it
    monkeypatch.setenv("PACE_TOPOLOGY", "0-0;1-1")
    monkeypatch.setenv("PACE_SLOT_DIR", str(tmp_path / "slots"))
    monkeypatch.setenv("PACE_SLOT_WAIT_S", "5")
    monkeypatch.delenv("PACE_CORES_PER_SLOT", raising=False)
    monkeypatch.delenv("PACE_PIN", raising=False)
    from cluster.start_node import node_resources
    from pace_core.numa import SLOT_RESOURCE

    ray.init(address="local", num_cpus=2, resources=node_resources(), include_dashboard=False, namespace=namespace)
    assert ray.cluster_resources()[SLOT_RESOURCE] == 2
    serve.start(proxy_location="Disabled")
    try:
        yield
    finally:
        serve.shutdown()
        ray.shutdown()


def engine_pids() -> list[int]:
    """This test process's live engine processes (deployments.engine_process): every
    Ray worker of a Ray started by the test process is a descendant of it."""
    import psutil

    pids = []
    for p in psutil.Process().children(recursive=True):
        try:
            if "deployments.engine_process" in " ".join(p.cmdline()) and p.status() != psutil.STATUS_ZOMBIE:
                pids.append(p.pid)
        except psutil.Error:
            pass
    return sorted(pids)


DROPPED = "\u2063"  # INVISIBLE SEPARATOR: what dropping_tokenizer's normalizer removes


def dropping_tokenizer(model_dir, out_dir) -> str:
    """A copy of ``model_dir``'s tokenizer whose normalizer removes DROPPED, as real
    tokenizers drop characters (control characters, some invisible ones): a prompt of
    only those encodes to zero tokens. Returns the tokenizer directory."""
    import shutil
    from pathlib import Path

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"):
        if (Path(model_dir) / name).is_file():
            shutil.copy(Path(model_dir) / name, out_dir / name)
    spec = json.loads((out_dir / "tokenizer.json").read_text())
    drop = {"type": "Replace", "pattern": {"String": DROPPED}, "content": ""}
    spec["normalizer"] = {"type": "Sequence", "normalizers": [drop] + ([spec["normalizer"]] if spec["normalizer"] else [])}
    (out_dir / "tokenizer.json").write_text(json.dumps(spec))
    # a config.json naming no model type: transformers then keeps tokenizer.json as it is
    # (a model type's own tokenizer class would rebuild the normalizer)
    (out_dir / "config.json").write_text("{}")
    return str(out_dir)
