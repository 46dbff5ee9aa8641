"""Where HTTP + Serve's per-token overhead comes from: the engine's own decode time
(its GenerationStats) inside a Serve replica, called through a Ray handle with and
without streaming, against the same engine in this process pinned to the replica's
CPU(s), request pairs interleaved. No HTTP, no router: only the replica.

    python benchmarks/replica_overhead.py --pairs 24
    python benchmarks/replica_overhead.py --smoke      # tiny models (CI)
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from latency import load_prompts  # noqa: E402


def engine_tpot(stats: dict) -> float:
    n = sum(stats["tokens_per_step"])
    return (stats["total_time_s"] - stats["time_to_first_token_s"]) / max(n - 1, 1)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pairs", type=int, default=24)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--stream-interval-ms", type=float, default=0.0)
    ap.add_argument("--smoke", action="store_true")
    a = ap.parse_args(argv)
    os.environ.setdefault("RAY_DASHBOARD_ENABLED", "0")
    from deployments import NODE_ENV

    for key, value in NODE_ENV.items():  # as the README's serve command
        os.environ.setdefault(key, value)
    import ray
    from ray import serve

    from deployments.app import build_app
    from deployments.args import AppArgs
    from pace_core import LLMModel, ModelConfig, PardSpecDecodeConfig, SamplingConfig

    args = AppArgs(num_replicas=1, cores_per_slot=1, stream_interval_ms=a.stream_interval_ms)
    if a.smoke:
        from pace_core.testing import build_pair

        target, draft = build_pair(tempfile.mkdtemp(prefix="pace-smoke-"), "qwen2")
        model = ModelConfig(model_name_or_path=target,
                            pard_config=PardSpecDecodeConfig(model_name_or_path=draft, num_speculative_tokens=3))
        args = args.model_copy(update={"model": model})
        a.pairs, a.max_tokens = 2, 8
    prompts = load_prompts(None if a.smoke else ROOT / "benchmarks" / "prompts" / "heldout.txt", 32)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": 0})
        serve.run(build_app(args), name="overhead", route_prefix=None)
        replica = serve.get_deployment_handle("LLMReplica", app_name="overhead")
        cpus = replica.info.remote().result()["cpu_affinity"]
        pool = ThreadPoolExecutor(1, initializer=lambda: os.sched_setaffinity(0, cpus))
        llm = pool.submit(LLMModel.from_config, args.model, len(cpus)).result()  # the replica's engine config
        sampling = SamplingConfig(max_new_tokens=a.max_tokens)
        ratios = {"streamed": [], "not streamed": []}
        for i in range(a.pairs + 1):
            prompt = prompts[i % len(prompts)]
            request = {"prompt": prompt, "sampling": {"max_new_tokens": a.max_tokens}}
            streamed = list(replica.options(stream=True).stream.remote(request))[-1].stats.to_dict()  # the Final's
            whole = replica.generate.remote(request).result()[-1].stats.to_dict()
            local = engine_tpot(pool.submit(lambda: llm.generate(prompt, sampling).stats.to_dict()).result())
            if i:  # the first round is warm-up
                ratios["streamed"].append(engine_tpot(streamed) / local)
                ratios["not streamed"].append(engine_tpot(whole) / local)
        pool.shutdown()
    finally:
        serve.shutdown()
        ray.shutdown()
    result = {k: statistics.median(v) for k, v in ratios.items()}
    print(json.dumps({"pairs": a.pairs, "replica_cpus": cpus, "stream_interval_ms": a.stream_interval_ms,
                      "engine_tpot_in_replica_over_in_process": result}))
    for k, v in result.items():
        print(f"engine time per token inside the replica, {k}: x{v:.3f} of in-process", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
