"""Speed at the shapes people run, beside llama.cpp: random-weight models built locally
from the real configs (Qwen2.5-0.5B / 1.5B / 7B, Llama-3.2-1B; nothing downloaded), in
each weight format, against the memory-bandwidth floor and against llama.cpp at the same
bits, AMD PACE and transformers, all interleaved in one run.

    python benchmarks/real_shapes.py                      # 0.5B, 1.5B, Llama-1B shapes; f32, bf16, int8, int4
    python benchmarks/real_shapes.py --shapes qwen2.5-7b --formats int8,int4,bfloat16
    python benchmarks/real_shapes.py --smoke              # a tiny shape, seconds (CI)

Per shape and format (llama.cpp's at the same bits: float32 = f32, bfloat16 = bf16,
int8 = q8_0, int4 = q4_0):
  * load: seconds, resident memory after loading and its peak during loading (a fresh
    process), and the bytes of weights one forward streams;
  * forward ms of 1, 2, 5, 9, 13 new tokens after a 64-token prefix (min of --reps),
    each as a ratio to the 1-token forward and to the floor (weight bytes / the read
    bandwidth measured in the same run);
  * decode tokens/s, greedy, a 64-token prompt, --new-tokens generated, the first
    token's time left out: this engine (its public API) and llama.cpp (llama-bench
    -n N -d 64), alternating round by round;
  * prompt processing of 512 distinct tokens (prefix cache off) and llama-bench -p 512;
  * PARD K=8 with the shape's draft in the same format: with the random draft (proposals
    never right: the step's cost) and with an oracle draft (the draft's forward paid, its
    proposals the known greedy continuation, --oracle-correct right per step: what a
    trained draft brings); llama.cpp's speculative decoding with the same draft;
  * float32: llama.cpp's greedy tokens checked equal to this engine's (same weights);
  * float32 / bfloat16 at the small shapes: transformers generate and AMD PACE 1.3.0
    (its own venv: bash benchmarks/pace/setup_pace.sh) on the same model.
llama.cpp comes from `bash benchmarks/llamacpp/setup.sh` (built from the llama-cpp-python
sdist on PyPI); without it (or AMD PACE's venv) those rows are skipped with a line saying
so. Random weights make a real draft's acceptance meaningless: read the random-draft PARD
row for its step cost, the oracle row for the speed at a trained draft's acceptance.
Writes benchmarks/results/real_shapes.{json,md,png} (--out to change).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks" / "llamacpp")]
PACE_DIR = ROOT / "benchmarks" / "pace"
PACE_VENV = Path(os.environ.get("PACE_VENV", "/tmp/pace-anchor-venv"))
FORWARD_TOKENS = (1, 2, 5, 9, 13)
PREFIX = 64
FORMATS = ("float32", "bfloat16", "int8", "int4")

QWEN25 = dict(model_type="qwen2", vocab_size=151936, tie_word_embeddings=True, rope_theta=1000000.0,
              rms_norm_eps=1e-6, max_position_embeddings=32768, hidden_act="silu")
QWEN25_05B = dict(QWEN25, hidden_size=896, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                  intermediate_size=4864)
SHAPES = {
    "qwen2.5-0.5b": QWEN25_05B,
    "qwen2.5-1.5b": dict(QWEN25, hidden_size=1536, num_hidden_layers=28, num_attention_heads=12,
                         num_key_value_heads=2, intermediate_size=8960),
    "llama-3.2-1b": dict(model_type="llama", vocab_size=128256, tie_word_embeddings=True, hidden_size=2048,
                         num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8, head_dim=64,
                         intermediate_size=8192, rms_norm_eps=1e-5, max_position_embeddings=131072,
                         rope_theta=500000.0, hidden_act="silu",
                         rope_scaling={"rope_type": "llama3", "factor": 32.0, "high_freq_factor": 4.0,
                                       "low_freq_factor": 1.0, "original_max_position_embeddings": 8192}),
    "qwen2.5-7b": dict(QWEN25, vocab_size=152064, tie_word_embeddings=False, hidden_size=3584, num_hidden_layers=28,
                       num_attention_heads=28, num_key_value_heads=4, intermediate_size=18944),
    # the 7B's draft: the 0.5B shape with the 7B's (padded) vocabulary, as amd/PARD-Qwen2.5-0.5B
    "qwen2.5-0.5b-v152064": dict(QWEN25_05B, vocab_size=152064),
    # --smoke
    "tiny-qwen2": dict(QWEN25, vocab_size=4096, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, intermediate_size=128),
}
# each target's draft: a shape, or the target's own first N layers (shared weights)
DRAFTS = {"qwen2.5-1.5b": ("qwen2.5-0.5b", None), "qwen2.5-0.5b": (None, 4), "llama-3.2-1b": (None, 4),
          "qwen2.5-7b": ("qwen2.5-0.5b-v152064", None), "tiny-qwen2": (None, 1)}
BIG = {"qwen2.5-7b"}  # stored in bfloat16 (15 GB), no float32, no transformers / AMD PACE rows


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def build(name: str, cache: Path, layers: int | None = None, source: Path | None = None) -> Path:
    """A random model of shape ``name`` (or the first ``layers`` layers of ``source``)
    with a tokenizer of its exact vocabulary, saved once under ``cache``."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from pace_core.testing import build_wordlevel_tokenizer

    out = cache / (f"{source.name}-first{layers}" if layers else name)
    if (out / "config.json").is_file():
        return out
    dtype = torch.bfloat16 if name in BIG else torch.float32
    log(f"building {out.name} (random weights, {dtype}, once) ...")
    if layers:
        model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
        model.model.layers = model.model.layers[:layers]
        model.config.num_hidden_layers = layers
        if hasattr(model.config, "layer_types"):
            model.config.layer_types = model.config.layer_types[:layers]
    else:
        spec = dict(SHAPES[name])
        config = AutoConfig.for_model(spec.pop("model_type"), **spec, eos_token_id=0, bos_token_id=None)
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.config.pard_token = 1  # the tokenizer's "<|pard|>": usable as a PARD draft too
    model.generation_config.eos_token_id = 0
    model.save_pretrained(out)
    build_wordlevel_tokenizer(out, model.config.vocab_size)
    return out


def read_bandwidth_gbs(threads: int) -> float:
    """Read bandwidth: the best of 5 sums over a 1 GiB array (far past the caches)."""
    import torch

    torch.set_num_threads(threads)
    a = torch.ones(1 << 28)
    a.sum()
    best = min(_timed(a.sum) for _ in range(5))
    return a.numel() * 4 / best / 1e9


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def engine_kwargs(fmt: str) -> dict:
    """LLMModel arguments of a weight format (int8/int4: bfloat16 KV cache, as llama.cpp's f16)."""
    return {"dtype": fmt} if fmt in ("float32", "bfloat16") else {"dtype": "bfloat16", "quantization": fmt}


LOAD_PROBE = """
import json, sys, time
import torch
torch.set_num_threads({threads})
from pace_core import LLMModel
before = int(open('/proc/self/statm').read().split()[1]) * 4096
t = time.perf_counter()
m = LLMModel({path!r}, num_threads={threads}, prefix_cache_gb=0, **{kwargs!r})
load = time.perf_counter() - t
rss = int(open('/proc/self/statm').read().split()[1]) * 4096
# this address space's high-water mark (getrusage's maxrss would carry the parent's over exec)
peak_kb = int(next(line for line in open('/proc/self/status') if line.startswith('VmHWM')).split()[1])
print(json.dumps({{"load_s": load, "rss_gb": rss / 1e9, "model_rss_gb": (rss - before) / 1e9,
                   "peak_rss_gb": peak_kb * 1024 / 1e9,
                   "weight_gb": m.target.weight_bytes() / 1e9, "forward_kind": m.forward_kind}}))
"""


def load_stats(path: Path, fmt: str, threads: int) -> dict:
    """Load time and memory of the target alone, in a fresh process: resident after
    loading (the whole process, and its growth over the process before loading: the
    model's share) and the peak during loading."""
    run = subprocess.run([sys.executable, "-c", LOAD_PROBE.format(path=str(path), kwargs=engine_kwargs(fmt),
                                                                  threads=threads)],
                         capture_output=True, text=True, timeout=3600, cwd=ROOT)
    if run.returncode != 0:
        raise RuntimeError(f"loading {path.name} as {fmt} failed: {run.stderr[-1500:]}")
    return json.loads(run.stdout.strip().splitlines()[-1])


def forward_times(runner, reps: int) -> dict:
    """ms of n-token forwards after a PREFIX-token prefix (min and median of ``reps``)."""
    vocab = runner.vocab_limit
    prefix = [(7 * i) % (vocab - 2) + 2 for i in range(PREFIX)]
    runner.reset()
    runner.forward(prefix, 1)
    rows = {}
    for n in FORWARD_TOKENS:
        times = []
        for _ in range(reps):
            runner.seq_len = PREFIX
            t = time.perf_counter()
            runner.forward(prefix[:n], n)
            times.append(1000 * (time.perf_counter() - t))
        rows[n] = {"min_ms": min(times), "median_ms": statistics.median(times)}
    return rows


def prompt_ids(vocab: int, n: int, seed: int) -> list[int]:
    return [(seed * 7919 + 31 * i) % (vocab - 2) + 2 for i in range(n)]


def ours_decode(llm, prompts: list[list[int]], new_tokens: int, oracle_correct: int | None = None) -> dict:
    """This engine's greedy or PARD decode through its public API, after one warm-up;
    decode rate = the tokens after the first step's / the time after the first step
    (which prefills the prompt)."""
    from pace_core import SamplingConfig
    from pace_core.testing import OracleDraft

    sampling = SamplingConfig(max_new_tokens=new_tokens, ignore_eos=True)
    real_draft = llm.draft
    tokens = seconds = steps = emitted = 0
    outputs = []
    for i, ids in enumerate([prompts[0]] + prompts):
        if oracle_correct is not None:
            llm.draft = real_draft
            k, llm.num_speculative_tokens = llm.num_speculative_tokens, 0
            reference = ids + llm.generate(ids, sampling).token_ids
            llm.num_speculative_tokens = k
            llm.draft = OracleDraft(real_draft, reference, oracle_correct, llm.target.vocab_limit)
        out = llm.generate(ids, sampling)
        if i:  # the first is the warm-up
            st = out.stats
            tokens += len(out.token_ids) - st.tokens_per_step[0]
            seconds += st.total_time_s - st.time_to_first_token_s
            steps += st.steps
            emitted += len(out.token_ids)
            outputs.append(out.token_ids)
    llm.draft = real_draft
    return {"tokens_per_s": tokens / seconds, "tokens_per_step": emitted / steps, "outputs": outputs}


def ours_prefill(llm, tokens: int = 512, reps: int = 2) -> float:
    """Prompt tokens/s of a prompt of distinct tokens into an empty cache."""
    runner = llm.target
    ids = prompt_ids(runner.vocab_limit, tokens, 99)
    best = float("inf")
    for _ in range(reps + 1):
        runner.reset()
        t = time.perf_counter()
        runner.forward(ids, 1)
        best = min(best, time.perf_counter() - t)
    return tokens / best


def hf_decode(path: Path, dtype: str, prompts: list[list[int]], new_tokens: int) -> dict:
    """transformers' greedy ``generate`` on its own copy of the model."""
    import torch

    from pace_core.loading import load_causal_lm

    model = load_causal_lm(str(path), dtype)
    tokens = seconds = 0
    outputs = []
    for i, p in enumerate([prompts[0]] + prompts):
        ids = torch.tensor([p])
        t = time.perf_counter()
        out = model.generate(ids, do_sample=False, max_new_tokens=new_tokens, min_new_tokens=new_tokens)
        dt = time.perf_counter() - t
        if i:
            tokens, seconds = tokens + new_tokens, seconds + dt
            outputs.append(out[0, len(p):].tolist())
    return {"tokens_per_s": tokens / seconds, "outputs": outputs}


def pace_decode(target: Path, draft: Path | None, prompts: list[list[int]], new_tokens: int, dtype: str, threads: int,
                k: int, workdir: Path) -> dict | None:
    """AMD PACE 1.3.0 in its venv (fresh process; one warm-up per prompt)."""
    py = PACE_VENV / "bin" / "python"
    if not py.is_file():
        return None
    prompts_file = workdir / "prompt_ids.json"
    prompts_file.write_text(json.dumps(prompts))
    cmd = [str(py), str(PACE_DIR / "pace_bench.py"), "--target", str(target), "--prompt-ids", str(prompts_file),
           "--max-new-tokens", str(new_tokens), "--dtype", dtype, "--threads", str(threads)]
    if draft is not None:
        cmd += ["--draft", str(draft), "--k", str(k)]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=7200)
    if run.returncode != 0:
        log(f"  AMD PACE failed: {run.stderr.strip()[-800:]}")
        return None
    got = json.loads(run.stdout.strip().splitlines()[-1])
    return {"tokens_per_s": got["tokens_per_second"], "tokens_per_step": got.get("mean_accepted_tokens_incl_bonus"),
            "outputs": [r["new_token_ids"] for r in got["results"]]}


def measure(shape: str, fmt: str, a, cache: Path, lc) -> dict:
    """Every measurement of one shape in one weight format (module docstring)."""
    import torch

    from pace_core import LLMModel, PardSpecDecodeConfig

    from convert import byte_prompt
    from llamacpp import PEER_FORMAT

    torch.set_num_threads(a.threads)
    target = build(shape, cache)
    draft_shape, draft_layers = DRAFTS[shape]
    draft = build(draft_shape, cache) if draft_shape else build(shape, cache, draft_layers, target)
    peer = PEER_FORMAT[fmt]
    log(f"{shape}, {fmt} (llama.cpp {peer}), {a.threads} threads: target {target.name}, draft {draft.name}")
    r = {"shape": shape, "format": fmt, "peer_format": peer, "threads": a.threads, "draft": draft.name}
    r["load"] = load_stats(target, fmt, a.threads)
    kwargs = engine_kwargs(fmt)
    llm = LLMModel(str(target), num_threads=a.threads, prefix_cache_gb=0, **kwargs,
                   pard_config=PardSpecDecodeConfig(model_name_or_path=str(draft), num_speculative_tokens=a.k,
                                                    speculation_schedule="fixed",
                                                    quantization=kwargs.get("quantization")))
    r["forward_kind"] = llm.forward_kind
    r["weight_gb"] = llm.target.weight_bytes() / 1e9
    r["bandwidth_gbs"] = read_bandwidth_gbs(a.threads)
    r["floor_ms"] = r["weight_gb"] / r["bandwidth_gbs"] * 1000
    r["forward"] = forward_times(llm.target, a.reps)
    log("  forward: " + ", ".join(f"{n}:{v['min_ms']:.1f}" for n, v in r["forward"].items()) + " ms, floor "
        f"{r['floor_ms']:.1f} ms at {r['bandwidth_gbs']:.0f} GB/s")
    vocab = llm.target.vocab_limit
    prompts = [prompt_ids(vocab, a.prompt_tokens, s) for s in range(a.prompts)]
    ggufs = {}
    if lc is not None:
        gguf_cache = cache / "gguf"
        ggufs = {"target": lc.gguf(target, peer, gguf_cache), "draft": lc.gguf(draft, peer, gguf_cache)}
    # decode and prefill, this engine and llama.cpp alternating round by round, unless both
    # models do not fit in memory at once (llama.cpp maps its file): then ours first
    both_fit = not ggufs or (r["load"]["rss_gb"] + ggufs["target"].stat().st_size / 1e9) < 0.7 * _memory_gb()
    r["interleaved"] = both_fit
    decode, prefill = {"pace_core": [], "llama.cpp": []}, {"pace_core": [], "llama.cpp": []}
    outputs = None
    k = llm.num_speculative_tokens

    def theirs(rnd):
        decode["llama.cpp"].append(lc.bench(ggufs["target"], a.threads, n_gen=a.new_tokens, depth=a.prompt_tokens))
        prefill["llama.cpp"].append(lc.bench(ggufs["target"], a.threads, n_prompt=512, reps=2))
        log(f"  round {rnd}: llama.cpp decode {decode['llama.cpp'][-1]:.2f} tok/s, prefill {prefill['llama.cpp'][-1]:.0f}")

    for rnd in range(a.rounds):
        llm.num_speculative_tokens = 0
        got = ours_decode(llm, prompts, a.new_tokens)
        decode["pace_core"].append(got["tokens_per_s"])
        outputs = got["outputs"]
        prefill["pace_core"].append(ours_prefill(llm))
        log(f"  round {rnd}: decode {decode['pace_core'][-1]:.2f} tok/s, prefill {prefill['pace_core'][-1]:.0f} tok/s")
        if ggufs and both_fit:
            theirs(rnd)
    llm.num_speculative_tokens = k
    r["decode"], r["prefill"] = decode, prefill
    pard = {}
    pard["random draft"] = ours_decode(llm, prompts, a.new_tokens)
    pard["oracle draft"] = ours_decode(llm, prompts, a.new_tokens, a.oracle_correct)
    for name, row in pard.items():
        row["same_tokens_as_greedy"] = row.pop("outputs") == outputs
        log(f"  PARD K={k}, {name}: {row['tokens_per_s']:.2f} tok/s, {row['tokens_per_step']:.2f} tok/step")
    if ggufs and not both_fit:
        del llm
        for rnd in range(a.rounds):
            theirs(rnd)
    if ggufs:
        try:
            pard["llama.cpp speculative, same draft"] = lc.speculative(
                ggufs["target"], ggufs["draft"], byte_prompt([t % 256 + 2 for t in prompts[0]]), a.new_tokens, k,
                a.threads)
            log(f"  llama.cpp speculative: {pard['llama.cpp speculative, same draft']}")
        except RuntimeError as err:
            log(f"  llama.cpp speculative failed: {err}")
    r["pard"] = pard
    if ggufs and fmt == "float32":  # same weights: llama.cpp's greedy tokens must be this engine's
        theirs = lc.greedy(ggufs["target"], prompts[:1], min(a.new_tokens, 16), a.threads)[0]
        r["llamacpp_f32_tokens_equal"] = theirs == outputs[0][: len(theirs)]
        log(f"  llama.cpp f32 greedy tokens == this engine's: {r['llamacpp_f32_tokens_equal']}")
    baselines = {}
    if fmt in ("float32", "bfloat16") and shape not in BIG and not a.skip_baselines:
        llm = None
        baselines["transformers generate"] = hf_decode(target, fmt, prompts, a.baseline_new_tokens)
        workdir = cache / "pace-run"
        workdir.mkdir(exist_ok=True)
        for name, d in (("AMD PACE 1.3.0 greedy", None), (f"AMD PACE 1.3.0 PARD K={k}", draft)):
            got = pace_decode(target, d, prompts, a.baseline_new_tokens, fmt, a.threads, k, workdir)
            if got is None:
                log("  AMD PACE: skipped (no venv at $PACE_VENV: bash benchmarks/pace/setup_pace.sh)")
                break
            baselines[name] = got
        for name, row in baselines.items():
            row["same_tokens_as_pace_core"] = all(o[: len(b)] == b[: len(o)] for o, b in zip(outputs, row.pop("outputs")))
            log(f"  {name}: {row['tokens_per_s']:.2f} tok/s")
    r["baselines"] = baselines
    return r


def _memory_gb() -> float:
    return int(next(line for line in open("/proc/meminfo") if line.startswith("MemTotal")).split()[1]) / 1e6


def best(values: list[float]) -> float | None:
    return max(values) if values else None


def markdown(results: list[dict], machine: str) -> str:
    lines = [f"Machine: {machine}", ""]
    for shape in dict.fromkeys(r["shape"] for r in results):
        rows = [r for r in results if r["shape"] == shape]
        lines += [f"### {shape} ({rows[0]['threads']} threads; draft: {rows[0]['draft']})", "",
                  "| weights (llama.cpp) | GB/forward | floor ms (GB/s) | decode tok/s: pace_core / llama.cpp | "
                  "9-tok forward / 1-tok | prompt tok/s: pace_core / llama.cpp | PARD K=8 oracle tok/s (x greedy) | "
                  "PARD random draft / llama.cpp speculative tok/s | load s, resident GB: model / process (peak) |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for r in rows:
            ours, theirs = best(r["decode"]["pace_core"]), best(r["decode"]["llama.cpp"])
            pin, pth = best(r["prefill"]["pace_core"]), best(r["prefill"]["llama.cpp"])
            fwd = r["forward"]
            oracle = r["pard"]["oracle draft"]["tokens_per_s"]
            spec = r["pard"].get("llama.cpp speculative, same draft")
            load = r["load"]
            cells = [f"{r['format']} ({r['peer_format']})" + ("" if r.get("interleaved", True) else " [1]"),
                     f"{r['weight_gb']:.2f}",
                     f"{r['floor_ms']:.1f} ({r['bandwidth_gbs']:.0f})",
                     f"**{ours:.1f}** / {theirs:.1f} ({ours / theirs:.2f}x)" if theirs else f"**{ours:.1f}** / -",
                     f"{fwd[9]['min_ms'] / min(fwd[1]['min_ms'], fwd[2]['min_ms']):.2f}x",
                     f"{pin:.0f} / {pth:.0f} ({pin / pth:.2f}x)" if pth else f"{pin:.0f} / -",
                     f"{oracle:.1f} ({oracle / ours:.2f}x)",
                     f"{r['pard']['random draft']['tokens_per_s']:.1f} / " + (f"{spec['tokens_per_s']:.1f}" if spec else "-"),
                     f"{load['load_s']:.1f}, {load['model_rss_gb']:.2f} / {load['rss_gb']:.2f} ({load['peak_rss_gb']:.2f})"]
            lines.append("| " + " | ".join(cells) + " |")
        if not all(r.get("interleaved", True) for r in rows):
            lines += ["", "[1] both engines' models did not fit in memory at once: this engine's rounds ran first, "
                          "then llama.cpp's (not interleaved)."]
        lines += ["", "Forward ms (min of reps; x the 1-token forward; F = x the floor):", "",
                  "| weights | " + " | ".join(f"{n} tok" for n in FORWARD_TOKENS) + " |",
                  "|---|" + "---:|" * len(FORWARD_TOKENS)]
        for r in rows:
            one = r["forward"][1]["min_ms"]
            lines.append(f"| {r['format']} | " + " | ".join(
                f"{v['min_ms']:.1f} ({v['min_ms'] / one:.2f}x, {v['min_ms'] / r['floor_ms']:.2f}F)"
                for v in r["forward"].values()) + " |")
        extra = [(r["format"], name, b) for r in rows for name, b in r["baselines"].items()]
        if extra:
            lines += ["", "| weights | baseline | tokens/s | same tokens as pace_core |", "|---|---|---:|---:|"]
            lines += [f"| {f} | {name} | {b['tokens_per_s']:.2f} | {b['same_tokens_as_pace_core']} |" for f, name, b in extra]
        checks = [f"{r['format']}: PARD output == greedy: {all(p['same_tokens_as_greedy'] for n, p in r['pard'].items() if 'llama' not in n)}"
                  for r in rows]
        checks += [f"llama.cpp f32 greedy tokens == this engine's f32: {r['llamacpp_f32_tokens_equal']}"
                   for r in rows if "llamacpp_f32_tokens_equal" in r]
        lines += ["", "; ".join(checks), ""]
    return "\n".join(lines)


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shapes = list(dict.fromkeys(r["shape"] for r in results))
    fig, axes = plt.subplots(1, len(shapes), figsize=(5.5 * len(shapes), 4.2), squeeze=False)
    for ax, shape in zip(axes[0], shapes):
        rows = [r for r in results if r["shape"] == shape]
        x = range(len(rows))
        ours = [best(r["decode"]["pace_core"]) for r in rows]
        theirs = [best(r["decode"]["llama.cpp"]) or 0 for r in rows]
        oracle = [r["pard"]["oracle draft"]["tokens_per_s"] for r in rows]
        ax.bar([i - 0.27 for i in x], theirs, 0.27, label="llama.cpp greedy")
        ax.bar(list(x), ours, 0.27, label="pace_core greedy")
        ax.bar([i + 0.27 for i in x], oracle, 0.27, label="pace_core PARD (oracle draft)")
        ax.set_xticks(list(x), [f"{r['format']}\n({r['peer_format']})" for r in rows])
        ax.set_title(f"{shape}, {rows[0]['threads']} threads")
        ax.set_ylabel("decode tokens/s")
        ax.grid(alpha=0.3, axis="y")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def machine_name() -> str:
    import platform

    import torch

    info = open("/proc/cpuinfo").read().splitlines()
    model = next((line.split(":", 1)[1].strip() for line in info if line.startswith("model name")), platform.processor())
    family = next((line.split(":", 1)[1].strip() for line in info if line.startswith("cpu family")), "?")
    flags = next((line for line in info if line.startswith("flags")), "")
    isa = ("AVX-512 + BF16" if "avx512_bf16" in flags else "AVX-512" if "avx512f" in flags
           else "AVX2" if "avx2" in flags else "SSE")
    return f"{model} (CPU family {family}), {os.cpu_count()} cores, {isa}, torch {torch.__version__}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="qwen2.5-0.5b,qwen2.5-1.5b,llama-3.2-1b")
    ap.add_argument("--formats", default=",".join(FORMATS), help="comma list of " + ", ".join(FORMATS))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--k", type=int, default=8)
    ap.add_argument("--oracle-correct", type=int, default=3, help="oracle draft: right proposals per step")
    ap.add_argument("--reps", type=int, default=7, help="timed forwards per token count")
    ap.add_argument("--rounds", type=int, default=2, help="alternating decode rounds, this engine and llama.cpp")
    ap.add_argument("--prompts", type=int, default=2)
    ap.add_argument("--prompt-tokens", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--baseline-new-tokens", type=int, default=16, help="for transformers and AMD PACE (the slow ones)")
    ap.add_argument("--skip-baselines", action="store_true", help="no transformers / AMD PACE rows")
    ap.add_argument("--llamacpp", choices=["auto", "off"], default="auto")
    ap.add_argument("--cache", default=os.path.expanduser("~/.cache/pace_core/real_shapes"),
                    help="where the random models (and their GGUF files) are built once")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "real_shapes"))
    ap.add_argument("--smoke", action="store_true", help="a tiny shape and few tokens (CI)")
    a = ap.parse_args(argv)
    if a.smoke:
        a.shapes, a.reps, a.prompts, a.prompt_tokens, a.new_tokens, a.k, a.rounds = "tiny-qwen2", 2, 1, 16, 8, 4, 1
        a.baseline_new_tokens, a.llamacpp = 4, "off"
    bad = [f for f in a.formats.split(",") if f not in FORMATS]
    if bad:
        ap.error(f"unknown format(s) {bad}: choose from {', '.join(FORMATS)}")
    cache = Path(a.cache)
    cache.mkdir(parents=True, exist_ok=True)
    machine = machine_name()
    log(f"machine: {machine}")
    lc = None
    if a.llamacpp == "auto":
        from llamacpp import LlamaCpp

        lc = LlamaCpp.find()
        log(f"llama.cpp {lc.version()} at {lc.root}" if lc else
            "llama.cpp: skipped (not set up: bash benchmarks/llamacpp/setup.sh)")
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    results = []
    for shape in a.shapes.split(","):
        for fmt in a.formats.split(","):
            if fmt == "float32" and shape in BIG:
                log(f"{shape}: no float32 (stored in bfloat16)")
                continue
            results.append(measure(shape, fmt, a, cache, lc))
            # written after every configuration: a long run keeps what it measured
            out.with_suffix(".json").write_text(json.dumps({"machine": machine, "args": vars(a), "results": results},
                                                           indent=1, default=str))
            out.with_suffix(".md").write_text(markdown(results, machine))
            plot(results, out.with_suffix(".png"))
    print(markdown(results, machine))
    return 0


if __name__ == "__main__":
    sys.exit(main())
