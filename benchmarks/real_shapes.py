"""Speed at the shapes people run: random-weight models built locally from the real
configs of Qwen2.5-0.5B, Qwen2.5-1.5B and Llama-3.2-1B (nothing downloaded), each with
a draft shape, measured against the memory-bandwidth floor and against transformers,
HF assisted generation and AMD PACE on the same models.

    python benchmarks/real_shapes.py                       # all shapes, float32, 2 threads
    python benchmarks/real_shapes.py --shapes qwen2.5-0.5b --dtypes float32,bfloat16
    python benchmarks/real_shapes.py --smoke               # tiny shapes, seconds (CI)

Per shape, dtype and thread count:
  * forward ms of 1, 2, 5, 9, 13 new tokens after a 256-token prefix: this engine (its
    few-rows kernel), this engine with torch's GEMM, transformers' forward; each as a
    ratio to its own 1-token forward and to the floor (weight bytes / measured read
    bandwidth: what one forward costs if it only streams the weights once);
  * decode tokens/s: plain greedy (this engine, transformers `generate`, AMD PACE),
    PARD with the draft shape (this engine and AMD PACE: same draft, same greedy tokens,
    so the same acceptance; HF assisted generation with the same draft), and this engine
    with an oracle draft of fixed acceptance (the draft's forward is paid, its proposals
    are the known greedy output, ``--oracle-correct`` right per step).
AMD PACE runs in its own venv (benchmarks/pace/setup_pace.sh builds it); without it,
its rows are skipped. Random weights make a real draft's acceptance meaningless: read
the PARD rows for their step cost, the oracle row for what a trained draft brings.
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
sys.path.insert(0, str(ROOT))
PACE_DIR = ROOT / "benchmarks" / "pace"
PACE_VENV = Path(os.environ.get("PACE_VENV", "/tmp/pace-anchor-venv"))
FORWARD_TOKENS = (1, 2, 5, 9, 13)
PREFIX = 256

QWEN25 = dict(model_type="qwen2", vocab_size=151936, tie_word_embeddings=True, rope_theta=1000000.0,
              rms_norm_eps=1e-6, max_position_embeddings=32768, hidden_act="silu")
SHAPES = {
    "qwen2.5-0.5b": dict(QWEN25, hidden_size=896, num_hidden_layers=24, num_attention_heads=14,
                         num_key_value_heads=2, intermediate_size=4864),
    "qwen2.5-1.5b": dict(QWEN25, hidden_size=1536, num_hidden_layers=28, num_attention_heads=12,
                         num_key_value_heads=2, intermediate_size=8960),
    "llama-3.2-1b": dict(model_type="llama", vocab_size=128256, tie_word_embeddings=True, hidden_size=2048,
                         num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8, head_dim=64,
                         intermediate_size=8192, rms_norm_eps=1e-5, max_position_embeddings=131072,
                         rope_theta=500000.0, hidden_act="silu",
                         rope_scaling={"rope_type": "llama3", "factor": 32.0, "high_freq_factor": 4.0,
                                       "low_freq_factor": 1.0, "original_max_position_embeddings": 8192}),
    # --smoke
    "tiny-qwen2": dict(QWEN25, vocab_size=4096, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, intermediate_size=128),
}
# each target's draft: Qwen2.5-1.5B's is the 0.5B shape (as amd/PARD-Qwen2.5-0.5B drafts
# for the larger Qwen2.5); the others' are their own first 4 layers (shared weights)
DRAFTS = {"qwen2.5-1.5b": ("qwen2.5-0.5b", None), "qwen2.5-0.5b": (None, 4), "llama-3.2-1b": (None, 4),
          "tiny-qwen2": (None, 1)}


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
    log(f"building {out.name} (random weights, once) ...")
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
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
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


def weight_bytes(model) -> int:
    """Bytes one forward streams: every linear weight and the output projection once
    (the input embedding is a row lookup)."""
    import torch

    seen, total = set(), 0
    for module in model.modules():
        if isinstance(module, torch.nn.Linear) and module.weight.data_ptr() not in seen:
            seen.add(module.weight.data_ptr())
            total += module.weight.numel() * module.weight.element_size()
    return total


def forward_times(llm, reps: int) -> dict:
    """ms of n-token forwards after a 256-token prefix (min and median of ``reps``), for
    this engine, this engine with torch's GEMM, and transformers' forward."""
    import torch

    from pace_core.runner import CausalLMRunner

    runner = llm.target
    vocab = runner.vocab_limit
    prefix = [(7 * i) % (vocab - 2) + 2 for i in range(PREFIX)]
    lean = hasattr(runner, "linear")
    variants = {"pace_core": None}
    if lean:  # the same runner without the few-rows kernel: torch's GEMM, Python layer loop
        variants["pace_core, torch GEMM (Python loop)"] = dict(linear=torch.nn.functional.linear, native=False,
                                                               few_rows=0)
    variants["transformers"] = "transformers"
    rows = {}
    for name, change in variants.items():
        r = CausalLMRunner(runner.model, vocab) if change == "transformers" else runner
        saved = {key: getattr(r, key) for key in change} if isinstance(change, dict) else {}
        for key, value in (change.items() if isinstance(change, dict) else ()):
            setattr(r, key, value)
        r.reset()
        r.forward(prefix, 1)
        r.drop_last(0)
        for n in FORWARD_TOKENS:
            new = prefix[:n]
            times = []
            for _ in range(reps):
                t = time.perf_counter()
                r.forward(new, n)
                times.append(1000 * (time.perf_counter() - t))
                r.drop_last(n)
            rows.setdefault(name, {})[n] = {"min_ms": min(times), "median_ms": statistics.median(times)}
        for key, value in saved.items():
            setattr(r, key, value)
        log(f"  forward {name}: " + ", ".join(f"{n}:{v['min_ms']:.1f}" for n, v in rows[name].items()) + " ms")
    return rows


def prompt_ids(vocab: int, n: int, seed: int) -> list[int]:
    return [(seed * 7919 + 31 * i) % (vocab - 2) + 2 for i in range(n)]


def ours_decode(llm, prompts: list[list[int]], new_tokens: int, oracle_correct: int | None = None) -> dict:
    """This engine's greedy or PARD decode: one warm-up, then the timed prompts."""
    from pace_core import SamplingConfig
    from pace_core.testing import OracleDraft

    sampling = SamplingConfig(max_new_tokens=new_tokens, ignore_eos=True)
    real_draft = llm.draft
    tokens = seconds = steps = 0
    outputs = []
    for i, ids in enumerate([prompts[0]] + prompts):
        if oracle_correct is not None:
            llm.draft = real_draft
            k, llm.num_speculative_tokens = llm.num_speculative_tokens, 0
            reference = ids + llm.generate(ids, sampling).token_ids
            llm.num_speculative_tokens = k
            llm.draft = OracleDraft(real_draft, reference, oracle_correct, llm.target.vocab_limit)
        t = time.perf_counter()
        out = llm.generate(ids, sampling)
        dt = time.perf_counter() - t
        if i:  # the first is the warm-up
            tokens, seconds, steps = tokens + len(out.token_ids), seconds + dt, steps + out.stats.steps
            outputs.append(out.token_ids)
    llm.draft = real_draft
    return {"tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds,
            "tokens_per_step": tokens / steps, "outputs": outputs}


def hf_decode(llm, prompts: list[list[int]], new_tokens: int, assistant=None, k: int = 8) -> dict:
    """transformers' greedy ``generate`` (or assisted generation with ``assistant``)."""
    import torch

    model = llm.target.model
    tokens = seconds = 0
    outputs = []
    for i, p in enumerate([prompts[0]] + prompts):
        ids = torch.tensor([p])
        kwargs = dict(do_sample=False, max_new_tokens=new_tokens, min_new_tokens=new_tokens)
        if assistant is not None:
            assistant.generation_config.num_assistant_tokens = k
            assistant.generation_config.num_assistant_tokens_schedule = "constant"
            kwargs["assistant_model"] = assistant
        t = time.perf_counter()
        out = model.generate(ids, **kwargs)[0, ids.shape[1]:].tolist()
        dt = time.perf_counter() - t
        if i:
            tokens, seconds = tokens + len(out), seconds + dt
            outputs.append(out)
    return {"tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds, "outputs": outputs}


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
    return {"tokens": got["tokens"], "seconds": got["seconds"], "tokens_per_s": got["tokens_per_second"],
            "tokens_per_step": got.get("mean_accepted_tokens_incl_bonus"),
            "outputs": [r["new_token_ids"] for r in got["results"]]}


def measure(shape: str, dtype: str, threads: int, a, cache: Path) -> dict:
    import torch

    from pace_core import LLMModel, PardSpecDecodeConfig

    torch.set_num_threads(threads)
    target = build(shape, cache)
    draft_shape, draft_layers = DRAFTS[shape]
    draft = build(draft_shape, cache) if draft_shape else build(shape, cache, draft_layers, target)
    log(f"{shape} ({dtype}, {threads} threads): target {target.name}, draft {draft.name}")
    # no prefix cache: prompts repeat (warm-up, references), and the peers re-read them
    llm = LLMModel(str(target), dtype=dtype, num_threads=threads, prefix_cache_gb=0,
                   pard_config=PardSpecDecodeConfig(model_name_or_path=str(draft), num_speculative_tokens=a.k,
                                                    speculation_schedule="fixed"))
    bandwidth = read_bandwidth_gbs(threads)
    wbytes = weight_bytes(llm.target.model)
    floor_ms = wbytes / bandwidth / 1e6
    result = {"shape": shape, "dtype": dtype, "threads": threads, "target": target.name, "draft": draft.name,
              "weight_gb": wbytes / 1e9, "bandwidth_gbs": bandwidth, "floor_ms": floor_ms,
              "draft_weight_gb": weight_bytes(llm.draft.model) / 1e9, "forward_kind": llm.forward_kind}
    result["forward"] = forward_times(llm, a.reps)
    vocab = llm.target.vocab_limit
    prompts = [prompt_ids(vocab, a.prompt_tokens, s) for s in range(a.prompts)]
    decode = {}
    k = llm.num_speculative_tokens
    llm.num_speculative_tokens = 0
    decode["pace_core greedy"] = ours_decode(llm, prompts, a.new_tokens)
    llm.num_speculative_tokens = k
    decode[f"pace_core PARD K={k}"] = ours_decode(llm, prompts, a.new_tokens)
    decode[f"pace_core PARD K={k}, oracle draft ({a.oracle_correct} right per step)"] = ours_decode(
        llm, prompts, a.new_tokens, a.oracle_correct)
    if a.draft_vocab_size and a.draft_vocab_size < llm.draft.vocab_limit:
        # the same oracle, with a draft whose lm_head reads the first N ids only
        # (PardSpecDecodeConfig.draft_vocab_size): what the cheaper draft step saves
        from pace_core.runner import make_runner

        full_draft = llm.draft
        llm.draft = make_runner(full_draft.model, llm.config.runner, vocab_limit=a.draft_vocab_size)
        decode[f"pace_core PARD K={k}, oracle draft, draft vocabulary {a.draft_vocab_size}"] = ours_decode(
            llm, prompts, a.new_tokens, a.oracle_correct)
        llm.draft = full_draft
    baseline_tokens = a.baseline_new_tokens or a.new_tokens
    if not a.skip_hf:
        decode["transformers generate"] = hf_decode(llm, prompts, baseline_tokens)
        decode[f"HF assisted, same draft, {k} tokens"] = hf_decode(llm, prompts, baseline_tokens, llm.draft.model, k)
    if a.pace == "auto":
        workdir = cache / "pace-run"
        workdir.mkdir(exist_ok=True)
        for name, d in (("AMD PACE 1.3.0 greedy", None), (f"AMD PACE 1.3.0 PARD K={k}", draft)):
            got = pace_decode(target, d, prompts, baseline_tokens, dtype, threads, k, workdir)
            if got is None:
                log("  AMD PACE: skipped (no venv at $PACE_VENV: build it with benchmarks/pace/setup_pace.sh)")
                break
            decode[name] = got
    reference = decode["pace_core greedy"]["outputs"]
    for name, row in decode.items():  # over the tokens both produced
        same = sum(a_ == b_ for out, ref in zip(row["outputs"], reference) for a_, b_ in zip(out, ref))
        row["token_match_vs_pace_core_greedy"] = same / max(1, sum(min(len(o), len(r))
                                                                   for o, r in zip(row["outputs"], reference)))
        row["ms_per_token"] = 1000 / row["tokens_per_s"]
        log(f"  {name}: {row['tokens_per_s']:.2f} tok/s"
            + (f", {row['tokens_per_step']:.2f} tok/step" if row.get("tokens_per_step") else ""))
        del row["outputs"]
    result["decode"] = decode
    return result


def markdown(results: list[dict], machine: str) -> str:
    lines = [f"Machine: {machine}", ""]
    for r in results:
        lines += [f"### {r['shape']}, {r['dtype']}, {r['threads']} threads (draft: {r['draft']})", "",
                  f"Weights read per forward {r['weight_gb']:.2f} GB; read bandwidth {r['bandwidth_gbs']:.1f} GB/s; "
                  f"floor {r['floor_ms']:.1f} ms per forward.", "",
                  "| forward (ms, min of reps) | " + " | ".join(f"{n} tok" for n in FORWARD_TOKENS) + " |",
                  "|---|" + "---:|" * len(FORWARD_TOKENS)]
        for name, by_n in r["forward"].items():
            one = by_n[1]["min_ms"]
            cells = [f"{v['min_ms']:.1f} ({v['min_ms'] / one:.2f}x, {v['min_ms'] / r['floor_ms']:.2f}F)"
                     for v in by_n.values()]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        lines += ["", "(ratio to the same engine's 1-token forward; F = multiples of the bandwidth floor)", "",
                  "| decode | tokens/s | ms/token | tokens/step | same tokens as pace_core greedy |",
                  "|---|---:|---:|---:|---:|"]
        for name, d in r["decode"].items():
            tps = f"{d['tokens_per_step']:.2f}" if d.get("tokens_per_step") else ""
            lines.append(f"| {name} | {d['tokens_per_s']:.2f} | {d['ms_per_token']:.1f} | {tps} | "
                         f"{d['token_match_vs_pace_core_greedy']:.0%} |")
        lines.append("")
    return "\n".join(lines)


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(5.5 * len(results), 4.2), squeeze=False)
    for ax, r in zip(axes[0], results):
        for name, by_n in r["forward"].items():
            ax.plot(list(by_n), [v["min_ms"] for v in by_n.values()], marker="o", label=name)
        ax.axhline(r["floor_ms"], color="k", ls="--", lw=1, label=f"bandwidth floor ({r['bandwidth_gbs']:.0f} GB/s)")
        ax.set_title(f"{r['shape']} {r['dtype']}, {r['threads']} thr")
        ax.set_xlabel("tokens per forward (K+1 for a verify)")
        ax.set_ylabel("forward ms (256-token prefix)")
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def machine_name() -> str:
    import platform

    import torch

    model = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
                 platform.processor())
    flags = next((line for line in open("/proc/cpuinfo") if line.startswith("flags")), "")
    isa = "AVX-512 + BF16" if "avx512_bf16" in flags else "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else "SSE"
    return f"{model}, {os.cpu_count()} cores, {isa}, torch {torch.__version__}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="qwen2.5-0.5b,qwen2.5-1.5b,llama-3.2-1b")
    ap.add_argument("--dtypes", default="float32", help="comma list; bfloat16 only means something on CPUs with native bf16")
    ap.add_argument("--threads", default="2", help="comma list")
    ap.add_argument("--k", type=int, default=8)
    ap.add_argument("--oracle-correct", type=int, default=3, help="oracle draft: right proposals per step")
    ap.add_argument("--draft-vocab-size", type=int, default=32768,
                    help="also the oracle row with a draft proposing among the first N ids (0: skip)")
    ap.add_argument("--reps", type=int, default=7, help="timed forwards per token count")
    ap.add_argument("--prompts", type=int, default=2)
    ap.add_argument("--prompt-tokens", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=48)
    ap.add_argument("--pace", choices=["auto", "off"], default="auto")
    ap.add_argument("--baseline-new-tokens", type=int, default=16,
                    help="new tokens per prompt for transformers, HF assisted and AMD PACE (the slow ones)")
    ap.add_argument("--skip-hf", action="store_true", help="skip transformers generate and HF assisted")
    ap.add_argument("--cache", default=os.path.expanduser("~/.cache/pace_core/real_shapes"),
                    help="where the random models are built once")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "real_shapes"))
    ap.add_argument("--smoke", action="store_true", help="tiny shapes and few tokens (CI)")
    a = ap.parse_args(argv)
    if a.smoke:
        a.shapes, a.reps, a.prompts, a.prompt_tokens, a.new_tokens, a.k, a.pace = "tiny-qwen2", 2, 1, 16, 8, 4, "off"
        a.draft_vocab_size = 1024
    cache = Path(a.cache)
    cache.mkdir(parents=True, exist_ok=True)
    machine = machine_name()
    log(f"machine: {machine}")
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    results = []
    for s in a.shapes.split(","):
        for d in a.dtypes.split(","):
            for t in a.threads.split(","):
                results.append(measure(s, d, int(t), a, cache))
                # written after every configuration: a long run keeps what it measured
                out.with_suffix(".json").write_text(json.dumps({"machine": machine, "args": vars(a),
                                                                "results": results}, indent=1))
                out.with_suffix(".md").write_text(markdown(results, machine))
                plot(results, out.with_suffix(".png"))
    print(markdown(results, machine))
    return 0


if __name__ == "__main__":
    sys.exit(main())
