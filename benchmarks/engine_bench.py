"""pace_core under the same measuring protocol as benchmarks/pace/pace_bench.py (AMD
PACE's runner): a fresh process, one untimed warm-up generate on each prompt right
before its timed run(s), the best of --repeats, one JSON line on stdout with the same
fields. `latency.py` runs it next to AMD PACE in every round, so the two engines are
compared under one protocol.

    python benchmarks/engine_bench.py --target models/demo-target --draft models/demo-draft --k 8 \\
        --prompts benchmarks/prompts/heldout.txt --threads 1
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target", required=True)
    ap.add_argument("--draft")
    ap.add_argument("--k", type=int, default=8)
    ap.add_argument("--schedule", default="adaptive", choices=["adaptive", "fixed"])
    ap.add_argument("--prompts", required=True, help="prompts separated by blank lines")
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=1, help="timed runs per prompt (after one warm-up run)")
    a = ap.parse_args(argv)

    from pace_core import LLMModel, PardSpecDecodeConfig, SamplingConfig

    pard = (PardSpecDecodeConfig(model_name_or_path=a.draft, num_speculative_tokens=a.k, speculation_schedule=a.schedule)
            if a.draft else None)
    t0 = time.perf_counter()
    # no prefix cache: prompts repeat (warm-up, references), and the peers re-read them
    llm = LLMModel(a.target, dtype=a.dtype, pard_config=pard, num_threads=a.threads, prefix_cache_gb=0)
    load_s = time.perf_counter() - t0
    prompts = [p for p in Path(a.prompts).read_text(encoding="utf-8").split("\n\n") if p.strip()]
    sampling = SamplingConfig(max_new_tokens=a.max_new_tokens, return_text=False)
    results, accepted = [], []
    for p in prompts:
        ids = llm.encode(p)
        llm.generate(ids, sampling)  # warm-up, as pace_bench.py does
        best, out = None, None
        for _ in range(a.repeats):
            t = time.perf_counter()
            out = llm.generate(ids, sampling)
            dt = time.perf_counter() - t
            best = dt if best is None else min(best, dt)
        accepted.append(out.stats.mean_accepted_length)
        results.append({"prompt": p, "new_token_ids": out.token_ids, "seconds": best})
    tokens, seconds = sum(len(r["new_token_ids"]) for r in results), sum(r["seconds"] for r in results)
    print(json.dumps({
        "engine": "pace_core", "mode": f"pard-{a.schedule}" if a.draft else "autoregressive", "k": a.k if a.draft else 0,
        "dtype": a.dtype, "load_seconds": load_s, "tokens": tokens, "seconds": seconds,
        "tokens_per_second": tokens / seconds if seconds else None,
        "mean_accepted_tokens_incl_bonus": sum(accepted) / len(accepted) if a.draft and accepted else None,
        "results": results,
    }), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
