"""Where one forward of the lean runner goes: the time of a forward of n new tokens
(after a 60-token prefix) with the C++ layer loop and with the Python one, and the
time of its GEMMs alone (the same weights, in the same order, on random inputs), per
model. The rest of a forward is per-op overhead and the small ops between the GEMMs.

    python benchmarks/forward_profile.py                 # the demo pair, 1 thread
    python benchmarks/forward_profile.py --smoke         # tiny random models (CI)

Prints one JSON line per model and token count (milliseconds, medians of --reps).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def median_ms(fn, reps: int) -> float:
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return 1000 * statistics.median(times)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="models/demo-target,models/demo-draft")
    ap.add_argument("--tokens", default="1,9")
    ap.add_argument("--reps", type=int, default=300)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--smoke", action="store_true")
    a = ap.parse_args(argv)

    import torch
    import torch.nn.functional as F

    from pace_core import LLMModel

    torch.set_num_threads(a.threads)
    paths = a.models.split(",")
    if a.smoke:
        from pace_core.testing import build_pair

        paths, a.reps = list(build_pair(tempfile.mkdtemp(prefix="pace-smoke-"), "qwen2")), 3
    for path in paths:
        runner = LLMModel(path, dtype="float32", runner="lean").target
        gemms = [(w, b) for i, layer in enumerate(runner.layers)
                 for w, b in (runner.qkv[i], (layer.self_attn.o_proj.weight, layer.self_attn.o_proj.bias),
                              runner.gate_up[i], (layer.mlp.down_proj.weight, layer.mlp.down_proj.bias))]
        gemms.append((runner.model.lm_head.weight, None))
        prefix = list(range(1, 61))
        runner.reset()
        runner.forward(prefix, 1)
        for n in (int(t) for t in a.tokens.split(",")):
            new = [(7 + i) % runner.vocab_limit for i in range(n)]
            inputs = [torch.randn(n, w.shape[1]) for w, _ in gemms]

            def step():
                runner.seq_len = len(prefix)
                runner.forward(new, n)

            def gemms_only():
                with torch.inference_mode():
                    for x, (w, b) in zip(inputs, gemms):
                        F.linear(x, w, b)

            row = {"model": path, "tokens": n, "native_available": runner.native}
            for native in ([True, False] if runner.native else [False]):
                runner.native = native
                step()  # warm-up
                row["forward_native_ms" if native else "forward_python_ms"] = median_ms(step, a.reps)
            runner.native = row["native_available"]
            gemms_only()
            row["gemms_only_ms"] = median_ms(gemms_only, a.reps)
            print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
