"""What streaming costs as an answer grows (issue 23): the bytes each chunk takes from
the engine to the router, and the per-token time of a long greedy answer over HTTP,
its last 500 tokens against its first 500, beside the same ratio in process.

A cost of the serving path that grows with the answer (say, every chunk carrying the
whole running statistics) shows as chunks that grow and as an HTTP ratio above the
in-process one; attention over a longer cache makes both ratios exceed 1 alike.

    python benchmarks/stream_cost.py                # demo pair, 1,900-token answers, 3 rounds
    python benchmarks/stream_cost.py --smoke        # tiny models (CI)

It starts its own Ray (2 CPUs, no dashboard) with the app on 127.0.0.1 (1 replica, the
engine pinned to one core), and measures:

- engine -> replica: the pickled size of every message the engine process sends
  (deployments.engine_process.EngineProcess, driven directly);
- replica -> router: the pickled size of every item the replica's ``stream`` yields
  (called through a deployment handle, as the router calls it);
- per-token time over HTTP: streaming /v1/completions with ``logprobs: 0`` (each SSE
  chunk names its tokens), token i's time being its chunk's arrival;
- the same per-token time in process (LLMModel.stream, pinned as the engine is, with
  Serve shut down), rounds interleaved with the HTTP ones.

Writes <out>.json/.md. Traffic goes to 127.0.0.1 only.
"""
from __future__ import annotations

import argparse
import json
import os
import pickle
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from latency import save_table  # noqa: E402
from multi_turn import cpu_info  # noqa: E402

PROMPT = "import os\nimport sys\n\n\ndef main(argv):\n"
WINDOW = 500  # tokens at each end of the answer


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def per_token_ms(arrivals: list[float], window: int) -> tuple[float, float]:
    """Per-token ms over the first and the last ``window`` tokens of an answer whose
    token i arrived at ``arrivals[i]`` (seconds)."""
    n = len(arrivals)
    first = (arrivals[window] - arrivals[0]) / window
    last = (arrivals[n - 1] - arrivals[n - 1 - window]) / window
    return 1000 * first, 1000 * last


def sizes_summary(sizes: list[int]) -> dict:
    """Bytes per chunk, ``sizes`` ending with the request's end (its Final): the chunks
    before it over the first and the last tenth of the answer, and the end's own."""
    chunks = sizes[:-1]
    tenth = max(1, len(chunks) // 10)
    return {"chunks": len(chunks), "bytes_first_tenth_mean": statistics.mean(chunks[:tenth]),
            "bytes_last_tenth_mean": statistics.mean(chunks[-tenth:]), "bytes_max": max(chunks),
            "bytes_end": sizes[-1], "bytes_total": sum(sizes)}


def engine_message_sizes(model: dict, request: dict) -> list[int]:
    """Pickled size of each message the engine process sends for ``request``, its end included."""
    from deployments.engine_process import EngineProcess
    from pace_core.outputs import Delta

    engine = EngineProcess(model, None)
    try:
        engine.send(("generate", request))
        sizes = []
        while True:
            message = engine.recv()
            sizes.append(len(pickle.dumps(message)))
            if not isinstance(message, Delta):
                return sizes
    finally:
        engine.close()


def http_arrivals(url: str, model_name: str, max_tokens: int) -> list[float]:
    """Token arrival times (s since the request) of a streamed greedy completion."""
    import httpx

    body = {"model": model_name, "prompt": PROMPT, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "ignore_eos": True, "logprobs": 0}
    arrivals = []
    t0 = time.perf_counter()
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=600) as r:
        assert r.status_code == 200, r.read()
        for line in r.iter_lines():
            if not line.startswith("data: {"):
                continue
            event = json.loads(line[6:])
            lp = (event.get("choices") or [{}])[0].get("logprobs")
            if lp and lp.get("tokens"):
                arrivals += [time.perf_counter() - t0] * len(lp["tokens"])
    return arrivals


def in_process_arrivals(llm, max_tokens: int) -> list[float]:
    from pace_core import SamplingConfig

    arrivals = []
    t0 = time.perf_counter()
    for chunk in llm.stream(PROMPT, SamplingConfig(max_new_tokens=max_tokens, ignore_eos=True, logprobs=0)):
        n = len(getattr(chunk, "token_ids", None) or ())
        arrivals += [time.perf_counter() - t0] * n
    return arrivals


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--max-tokens", type=int, default=1900)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "stream_cost"))
    ap.add_argument("--smoke", action="store_true", help="tiny models, 300 tokens, 1 round, a temp dir")
    args = ap.parse_args(argv)
    import yaml

    base = yaml.safe_load((ROOT / "serve_config.yaml").read_text())["applications"][0]["args"]
    model = base["model"]
    window = WINDOW
    if args.smoke:
        from pace_core.testing import build_pair

        target, draft = build_pair(tempfile.mkdtemp(prefix="pace-smoke-"), "qwen2")
        model = {"model_name_or_path": target, "dtype": "float32",
                 "pard_config": {"model_name_or_path": draft, "num_speculative_tokens": 3}}
        args.max_tokens, args.rounds, window = 300, 1, 100
        if args.out == ap.get_default("out"):
            args.out = str(Path(tempfile.mkdtemp(prefix="pace-stream-cost-")) / "stream_cost")
    from deployments.args import AppArgs

    model = AppArgs.model_validate({"model": model}).model.model_dump()
    request = {"prompt": PROMPT, "sampling": {"max_new_tokens": args.max_tokens, "ignore_eos": True},
               "request_id": "stream-cost"}

    log("engine -> replica: message sizes")
    engine_sizes = engine_message_sizes(model, request)

    import ray
    from ray import serve

    from deployments import NODE_ENV
    from deployments.app import build_app
    from pace_core import LLMModel

    os.environ.update({k: os.environ.get(k, v) for k, v in NODE_ENV.items()})  # as the README's serve command
    os.environ.setdefault("PACE_SLOT_DIR", tempfile.mkdtemp(prefix="pace-slots-"))
    cpus = sorted(os.sched_getaffinity(0))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ray.init(address="local", num_cpus=2, include_dashboard=False, namespace="pace-stream-cost")
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        app_args = {"model": model, "num_replicas": 1, "cores_per_slot": 1, "slot_resource": "never"}
        serve.run(build_app(app_args), name="pace", route_prefix="/")
        url = f"http://127.0.0.1:{port}"
        replica = serve.get_deployment_handle("LLMReplica", "pace")
        log("replica -> router: item sizes")
        replica_sizes = [len(pickle.dumps(item)) for item in replica.options(stream=True).stream.remote(request)]
        http_arrivals(url, "pace-demo", 64)  # warm-up
        http_runs = []
        for r in range(args.rounds):
            arrivals = http_arrivals(url, "pace-demo", args.max_tokens)
            http_runs.append(per_token_ms(arrivals, window))
            log(f"HTTP round {r + 1}: {len(arrivals)} tokens, per-token ms first {window} "
                f"{http_runs[-1][0]:.2f}, last {window} {http_runs[-1][1]:.2f}")
    finally:
        serve.shutdown()
        ray.shutdown()
    # in process, pinned as the replica's engine was (this host's last CPU, 1 thread)
    os.sched_setaffinity(0, cpus[-1:])
    llm = LLMModel.from_config(model, 1)
    in_process_arrivals(llm, 64)  # warm-up
    local_runs = []
    for r in range(args.rounds):
        arrivals = in_process_arrivals(llm, args.max_tokens)
        local_runs.append(per_token_ms(arrivals, window))
        log(f"in process round {r + 1}: per-token ms first {window} {local_runs[-1][0]:.2f}, "
            f"last {window} {local_runs[-1][1]:.2f}")
    os.sched_setaffinity(0, cpus)

    def ratios(runs):
        return {"first_ms_median": statistics.median(f for f, _ in runs),
                "last_ms_median": statistics.median(last for _, last in runs),
                "last_over_first_median": statistics.median(last / f for f, last in runs)}

    http, local = ratios(http_runs), ratios(local_runs)
    result = {"command": "python benchmarks/stream_cost.py " + " ".join(sys.argv[1:]), "cpu": cpu_info(),
              "max_tokens": args.max_tokens, "window": window, "rounds": args.rounds,
              "engine_to_replica": sizes_summary(engine_sizes), "replica_to_router": sizes_summary(replica_sizes),
              "http": {**http, "runs": http_runs}, "in_process": {**local, "runs": local_runs},
              "http_ratio_over_in_process_ratio": http["last_over_first_median"] / local["last_over_first_median"]}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=1))  # (before the typed stream: see results/stream_cost_before)
    e, rr = result["engine_to_replica"], result["replica_to_router"]
    lines = [f"A {args.max_tokens}-token greedy answer, {args.rounds} round(s); CPU: {result['cpu']['model_name']} "
             f"({result['cpu']['isa']}, {result['cpu']['cpus']} CPUs). `{result['command']}`", "",
             "| hop | chunks | bytes per chunk, first tenth | last tenth | max | the end (Final) |",
             "|---|---:|---:|---:|---:|---:|",
             f"| engine -> replica | {e['chunks']} | {e['bytes_first_tenth_mean']:.0f} | "
             f"{e['bytes_last_tenth_mean']:.0f} | {e['bytes_max']} | {e['bytes_end']} |",
             f"| replica -> router | {rr['chunks']} | {rr['bytes_first_tenth_mean']:.0f} | "
             f"{rr['bytes_last_tenth_mean']:.0f} | {rr['bytes_max']} | {rr['bytes_end']} |", "",
             f"| per-token ms (median of rounds) | first {window} tokens | last {window} | last / first |",
             "|---|---:|---:|---:|",
             f"| HTTP | {http['first_ms_median']:.2f} | {http['last_ms_median']:.2f} | "
             f"{http['last_over_first_median']:.3f} |",
             f"| in process | {local['first_ms_median']:.2f} | {local['last_ms_median']:.2f} | "
             f"{local['last_over_first_median']:.3f} |", "",
             f"HTTP's last/first over in-process's: x{result['http_ratio_over_in_process_ratio']:.3f}."]
    save_table(out, "\n".join(lines) + "\n")
    log(f"wrote {out}.json/.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
