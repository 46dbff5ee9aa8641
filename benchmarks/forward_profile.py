"""Where one forward of the lean runner goes: the time of a forward of n new tokens
(after a --prefix-token prefix) with the C++ layer loop and with the Python one, the
time of its layer GEMMs alone and of its output projection alone (the same weights
through the same linear, on random inputs; with the GB/s they stream, beside the
host's read bandwidth), and of its attention alone (every layer's, over the prefix:
the forward's own op, and torch's SDPA for comparison), per model. The rest of a
forward is the small ops between them and per-op overhead.

    python benchmarks/forward_profile.py --models ~/.cache/pace_core/real_shapes/qwen2.5-0.5b \
        --dtype bfloat16 --prefix 256 --tokens 1,9 --threads 2 --reps 20
    PACE_KERNEL_ISA=avx512 python benchmarks/forward_profile.py ...  # bf16 widened, no dot products

    python benchmarks/forward_profile.py                 # the demo pair, 1 thread
    python benchmarks/forward_profile.py --models ~/.cache/pace_core/real_shapes/qwen2.5-0.5b \
        --prefix 256 --tokens 1,9 --threads 2 --reps 20  # a real shape (built by real_shapes.py)
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
    ap.add_argument("--prefix", type=int, default=60, help="tokens in the cache before the timed forwards")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--smoke", action="store_true")
    a = ap.parse_args(argv)

    import torch
    import torch.nn.functional as F

    from pace_core import LLMModel

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from real_shapes import read_bandwidth_gbs

    torch.set_num_threads(a.threads)
    dtype = getattr(torch, a.dtype)
    bandwidth = read_bandwidth_gbs(a.threads)
    paths = a.models.split(",")
    if a.smoke:
        from pace_core.testing import build_pair

        paths, a.reps = list(build_pair(tempfile.mkdtemp(prefix="pace-smoke-"), "qwen2")), 3
    for path in paths:
        runner = LLMModel(path, dtype=a.dtype, runner="lean").target
        gemms = [(w, b) for i, layer in enumerate(runner.layers)
                 for w, b in (runner.qkv[i], (layer.self_attn.o_proj.weight, layer.self_attn.o_proj.bias),
                              runner.gate_up[i], (layer.mlp.down_proj.weight, layer.mlp.down_proj.bias))]
        head = (runner.lm_head_weight, runner.lm_head_bias)
        prefix = [1 + i % (runner.vocab_limit - 1) for i in range(a.prefix)]
        runner.reset()
        runner.forward(prefix, 1)
        for n in (int(t) for t in a.tokens.split(",")):
            new = [(7 + i) % runner.vocab_limit for i in range(n)]
            inputs = [torch.randn(n, w.shape[1]).to(dtype) for w, _ in gemms]
            head_input = torch.randn(n, head[0].shape[1]).to(dtype)
            q = torch.randn(1, runner.num_heads, n, runner.head_dim).to(dtype)
            start = len(prefix)  # the new tokens' keys sit after the prefix (values from the warm-up)

            def step():
                runner.seq_len = len(prefix)
                runner.forward(new, n)

            def gemms_only():  # through the forward's own linear (the few-rows kernel in float32)
                with torch.inference_mode():
                    for x, (w, b) in zip(inputs, gemms):
                        runner.linear(x, w, b)

            def lm_head_only():
                with torch.inference_mode():
                    runner.linear(head_input, *head)

            def attention_only():  # the forward's own attention op, every layer
                with torch.inference_mode():
                    for k, v in zip(runner.k_cache, runner.v_cache):
                        runner.attention(q, k, v, start)

            def attention_sdpa():
                end = start + n
                mask = torch.ones(n, end, dtype=torch.bool).tril(diagonal=start) if n > 1 else None
                with torch.inference_mode():
                    for k, v in zip(runner.k_cache, runner.v_cache):
                        F.scaled_dot_product_attention(q, k[:, :end][None], v[:, :end][None], attn_mask=mask,
                                                       scale=runner.scaling,
                                                       enable_gqa=runner.num_heads != runner.num_kv_heads)

            row = {"model": path, "dtype": a.dtype, "tokens": n, "native_available": runner.native,
                   "read_bandwidth_gbs": round(bandwidth, 1)}
            if runner.few_rows:
                row["kernel_isa"] = torch.ops.pace_core.few_rows_isa()
            for native in ([True, False] if runner.native else [False]):
                runner.native = native
                step()  # warm-up
                row["forward_native_ms" if native else "forward_python_ms"] = median_ms(step, a.reps)
            runner.native = row["native_available"]
            gemms_only()
            row["layer_gemms_ms"] = median_ms(gemms_only, a.reps)
            row["lm_head_ms"] = median_ms(lm_head_only, a.reps)
            layer_bytes = sum(w.numel() * w.element_size() for w, _ in gemms)
            row["layer_gemms_gbs"] = round(layer_bytes / row["layer_gemms_ms"] / 1e6, 1)
            row["lm_head_gbs"] = round(head[0].numel() * head[0].element_size() / row["lm_head_ms"] / 1e6, 1)
            attention_only()
            row["attention_ms"] = median_ms(attention_only, a.reps)
            row["attention_sdpa_ms"] = median_ms(attention_sdpa, a.reps)
            print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
