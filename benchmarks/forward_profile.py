"""Where one forward goes: the native forward's time by stage (norms, each linear, rotary
and cache writes, attention, input preparation of int8/int4/bf16 linears, the output
projection), for n new tokens after a --prefix-token prefix, beside the GB/s the weights
stream and the host's read bandwidth; and the kernels' arithmetic rate against this core's
peak (weights in L2: what a verify of n rows can reach when memory is not the limit).

    python benchmarks/forward_profile.py --models ~/.cache/pace_core/real_shapes/qwen2.5-0.5b \\
        --formats bfloat16,int8 --prefix 256 --tokens 1,9 --threads 2 --reps 20
    PACE_KERNEL_ISA=avx512 python benchmarks/forward_profile.py ...   # AVX-512 without BF16 dot products
    python benchmarks/forward_profile.py                 # the demo pair, 1 thread
    python benchmarks/forward_profile.py --smoke         # tiny random models (CI)

Prints one JSON line per model, format and token count (milliseconds: median of --reps;
stage times are thread 0's: a stage's includes waiting at its closing barrier), then one
line of kernel rates (GMAC/s per core, by rows per pass) with the measured peaks.
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
FORMATS = {"float32": 0, "bfloat16": 1, "int8": 2, "int4": 3}


def median_ms(fn, reps: int) -> float:
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return 1000 * statistics.median(times)


def kernel_rates(formats: list[str], rows: list[int]) -> dict:
    """GMAC/s of one thread's kernel for a (256, 896) weight in L2, by rows, and the peaks."""
    import torch

    ops = torch.ops.pace_core
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    out = {"peak_gmacs": {kind: round(ops.peak_rate(kind) / 1e9, 1) for kind in ("fma", "bf16", "int8")}}
    for fmt in formats:
        out[fmt] = {n: round(n * 256 * 896 / min(ops.kernel_seconds(FORMATS[fmt], n, 256, 896, 200)
                                                 for _ in range(3)) / 1e9, 1) for n in rows}
    torch.set_num_threads(threads)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="models/demo-target,models/demo-draft")
    ap.add_argument("--formats", default="float32", help="comma list of " + ", ".join(FORMATS))
    ap.add_argument("--tokens", default="1,9")
    ap.add_argument("--reps", type=int, default=100)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--prefix", type=int, default=60, help="tokens in the cache before the timed forwards")
    ap.add_argument("--smoke", action="store_true")
    a = ap.parse_args(argv)

    import torch

    from pace_core import LLMModel

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from real_shapes import engine_kwargs, read_bandwidth_gbs

    torch.set_num_threads(a.threads)
    bandwidth = read_bandwidth_gbs(a.threads)
    paths = a.models.split(",")
    if a.smoke:
        from pace_core.testing import build_pair

        paths, a.reps = list(build_pair(tempfile.mkdtemp(prefix="pace-smoke-"), "qwen2")), 3
    tokens = [int(t) for t in a.tokens.split(",")]
    for path in paths:
        for fmt in a.formats.split(","):
            runner = LLMModel(path, runner="lean", prefix_cache_gb=0, **engine_kwargs(fmt)).target
            prefix = [1 + i % (runner.vocab_limit - 1) for i in range(a.prefix)]
            runner.reset()
            runner.forward(prefix, 1)
            for n in tokens:
                new = [(7 + i) % runner.vocab_limit for i in range(n)]

                def step():
                    runner.seq_len = len(prefix)
                    runner.forward(new, n)

                step()  # warm-up
                row = {"model": path, "format": fmt, "tokens": n, "forward_kind": "lean-native" if runner.native
                       else "lean-python", "read_bandwidth_gbs": round(bandwidth, 1)}
                row["forward_ms"] = median_ms(step, a.reps)
                row["weight_gb"] = runner.weight_bytes() / 1e9
                row["floor_ms"] = row["weight_gb"] / bandwidth * 1000
                if runner.native:
                    row["kernel_isa"] = torch.ops.pace_core.isa()
                    runner.native_model.set_profiling(True)
                    for _ in range(a.reps):
                        step()
                    row["stages_ms"] = {k: round(v / a.reps * 1000, 5) for k, v in runner.native_model.profile().items()}
                    runner.native_model.set_profiling(False)
                    linear = sum(v for k, v in row["stages_ms"].items() if k in ("qkv", "o", "gate_up_silu", "down", "head"))
                    row["linear_gbs"] = round(row["weight_gb"] / linear * 1000, 1) if linear else None
                print(json.dumps(row), flush=True)
    from pace_core import native

    if native.load():
        rates = kernel_rates(a.formats.split(","), [1, 2, 5, 9, 13] if not a.smoke else [1, 9])
        print(json.dumps({"kernel_gmacs_per_core": rates}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
