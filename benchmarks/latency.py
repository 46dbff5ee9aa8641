"""Single-stream latency: HF greedy, HF assisted generation, this engine without a
draft (K=0) and with PARD for a K sweep (fixed K and the adaptive schedule with K as
its cap), and AMD PACE 1.3.0 (without a draft, and with PARD for K = 4, 8, 12) when
its venv exists, next to this engine under PACE's own protocol. Greedy, same prompts,
warm-up excluded; in-process variants interleaved per prompt, fresh-process ones run
in every round, so machine drift hits all alike. Every variant's tokens are checked
against HF greedy. With ``--temperature T`` two sampled rows join (seeded per prompt,
not compared with HF greedy): this engine without a draft and with PARD (speculative
sampling, adaptive K up to the largest K).

    python benchmarks/latency.py                       # demo pair, held-out prompts
    python benchmarks/latency.py --ks 8 --temperature 0.7 --no-assisted --pace off   # sampling
    python benchmarks/latency.py --target DIR --draft DIR --ks 1,2,4,8 --max-new-tokens 128
    python benchmarks/latency.py --smoke               # tiny random models, seconds (CI)

Writes <out>.json, <out>.md and <out>.png (tokens/s vs K, the peers as lines).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

DEFAULT_PROMPTS = ROOT / "benchmarks" / "prompts" / "heldout.txt"
PACE_ANCHORS = ROOT / "benchmarks" / "pace"  # AMD PACE runner and venv set-up
PACE_VENV = Path(os.environ.get("PACE_VENV", "/tmp/pace-anchor-venv"))


def load_prompts(path: Path | None, limit: int) -> list[str]:
    if path and path.is_file():
        prompts = [p for p in path.read_text(encoding="utf-8").split("\n\n") if p.strip()]
    else:
        prompts = ["def fibonacci(n):\n", "import os\n\n\ndef read_lines(path):\n",
                   "class Stack:\n    def __init__(self):\n", "def parse_args(argv=None):\n    parser = argparse.ArgumentParser("]
    return prompts[:limit]


class Timeline:
    """A transformers streamer that records when tokens arrive."""

    def __init__(self):
        self.t0 = time.perf_counter()
        self.chunks: list[tuple[float, int]] = []
        self._prompt_seen = False

    def put(self, value):
        if not self._prompt_seen:  # transformers first puts the prompt
            self._prompt_seen = True
            return
        self.chunks.append((time.perf_counter() - self.t0, int(value.numel())))

    def end(self):
        pass


def latency_record(chunks: list[tuple[float, int]], total_s: float, n_tokens: int, accepted: float | None) -> dict:
    """chunks: (seconds since start, tokens in chunk). ITL samples: each gap between
    chunks shared by the tokens of the later chunk."""
    itl = []
    for (t_prev, _), (t, n) in zip(chunks, chunks[1:]):
        itl += [(t - t_prev) / n] * n
    return {"seconds": total_s, "tokens": n_tokens, "ttft": chunks[0][0] if chunks else total_s, "itl": itl,
            "accepted": accepted}


def run_hf(model, prompt_ids, n, assistant=None, tokenizer=None) -> tuple[list[int], dict]:
    import torch

    tl = Timeline()
    kwargs = {"assistant_model": assistant} if assistant is not None else {}
    if assistant is not None and assistant.config.vocab_size != model.config.vocab_size:
        # padded draft vocabulary: transformers wants both tokenizers (universal assisted decoding)
        kwargs.update(tokenizer=tokenizer, assistant_tokenizer=tokenizer)
    t0 = time.perf_counter()
    tl.t0 = t0
    out = model.generate(torch.tensor([prompt_ids]), do_sample=False, max_new_tokens=n, streamer=tl,
                         pad_token_id=model.generation_config.eos_token_id if isinstance(model.generation_config.eos_token_id, int) else None,
                         **kwargs)
    dt = time.perf_counter() - t0
    ids = out[0, len(prompt_ids):].tolist()
    return ids, latency_record(tl.chunks, dt, len(ids), None)


def run_engine(llm, k, prompt_ids, n, schedule="fixed", temperature=0.0) -> tuple[list[int], dict]:
    from pace_core import Final, SamplingConfig

    llm.num_speculative_tokens, llm.speculation_schedule = k, schedule
    sampled = {"temperature": temperature, "seed": len(prompt_ids)} if temperature else {}
    t0 = time.perf_counter()
    chunks, ids, stats = [], [], None
    for event in llm.stream(prompt_ids, SamplingConfig(max_new_tokens=n, return_text=False, **sampled)):
        if isinstance(event, Final):
            stats = event.stats
            continue
        chunks.append((time.perf_counter() - t0, len(event.token_ids)))
        ids += event.token_ids
    dt = time.perf_counter() - t0
    return ids, latency_record(chunks, dt, len(ids), stats.mean_accepted_length)


# the K sweeps a result row can belong to (None: a single baseline row)
FIXED, ADAPTIVE = "pace_core PARD fixed", "pace_core PARD adaptive"
PACE_PARD, ADAPTIVE_PACE_PROTOCOL = "AMD PACE PARD", "pace_core PARD adaptive, PACE's protocol"


def run_protocol(engine, target, draft, k, prompts_file, n, dtype, threads) -> dict | None:
    """One fresh-process run of AMD PACE (benchmarks/pace/pace_bench.py, in its venv)
    or of pace_core under the same protocol (benchmarks/engine_bench.py): a warm-up on
    each prompt, then one timed run of it."""
    if engine == "pace":
        py, script, extra = PACE_VENV / "bin" / "python", PACE_ANCHORS / "pace_bench.py", []
    else:
        py, script, extra = Path(sys.executable), ROOT / "benchmarks" / "engine_bench.py", ["--schedule", "adaptive"]
    if not (py.is_file() and script.is_file()):
        return None
    cmd = [str(py), str(script), "--target", target, "--prompts", prompts_file, "--max-new-tokens", str(n),
           "--dtype", dtype if dtype in ("bfloat16", "float32") else "bfloat16", "--threads", str(threads)]
    if draft:
        cmd += ["--draft", draft, "--k", str(k)] + extra
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
    if run.returncode != 0:
        print(f"  {engine} failed ({'PARD' if draft else 'no draft'}): {run.stderr.strip()[-500:]}", file=sys.stderr)
        return None
    return json.loads(run.stdout.strip().splitlines()[-1])


def pct(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))] if xs else float("nan")


def summarize(name, k, records, reference, outputs, family=None) -> dict:
    tokens = sum(r["tokens"] for r in records)
    seconds = sum(r["seconds"] for r in records)
    itl = [x for r in records for x in r["itl"]]
    acc = [r["accepted"] for r in records if r.get("accepted") is not None]
    same = sum(a == b for out, ref in zip(outputs, reference or []) for a, b in zip(out, ref))
    total = sum(len(ref) for ref in reference or [])  # no reference: a sampled row
    return {
        "variant": name, "k": k, "family": family, "tokens": tokens, "seconds": seconds,
        "tokens_per_s": tokens / seconds if seconds else 0.0,
        "ttft_ms_median": 1000 * statistics.median(r["ttft"] for r in records) if records and "ttft" in records[0] else None,
        "itl_ms_median": 1000 * statistics.median(itl) if itl else None,
        "itl_ms_p90": 1000 * pct(itl, 0.9) if itl else None,
        "mean_accepted": statistics.mean(acc) if acc else None,
        "token_match_vs_hf_greedy": same / total if total else None,
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target", default="models/demo-target")
    ap.add_argument("--draft", default="models/demo-draft")
    ap.add_argument("--prompts", type=Path, default=DEFAULT_PROMPTS,
                    help="prompts separated by blank lines (the format of PACE's pace_bench.py)")
    ap.add_argument("--num-prompts", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--ks", default="1,2,4,8,12,16")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    ap.add_argument("--rounds", type=int, default=2, help="timed rounds over all prompts (after one warm-up)")
    ap.add_argument("--no-assisted", action="store_true", help="skip HF assisted generation")
    ap.add_argument("--pace", choices=["auto", "off"], default="auto", help="AMD PACE from $PACE_VENV when present")
    ap.add_argument("--pace-ks", default="4,8,12", help="K values for AMD PACE's PARD (its best K on the demo "
                                                        "pair is 8 or 12; 'all' = --ks)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "latency"))
    ap.add_argument("--temperature", type=float, default=0.0,
                    help="also sample at this temperature, without a draft and with PARD (adaptive, largest K)")
    ap.add_argument("--smoke", action="store_true", help="tiny random models, 2 prompts, few tokens (CI)")
    ap.add_argument("--replot", action="store_true", help="only redraw <out>.md/.png from <out>.json")
    a = ap.parse_args(argv)
    if a.replot:
        saved = json.loads(Path(a.out).with_suffix(".json").read_text())
        write_outputs(Path(a.out), saved["meta"], saved["rows"])
        return 0

    import torch

    torch.set_num_threads(a.threads)
    from pace_core import LLMModel, PardSpecDecodeConfig
    from pace_core.loading import resolve_model_path

    if a.smoke:
        from pace_core.testing import build_pair

        tmp = tempfile.mkdtemp(prefix="pace-smoke-")
        a.target, a.draft = build_pair(tmp, "qwen2")
        a.num_prompts, a.max_new_tokens, a.ks, a.rounds, a.pace, a.temperature = 2, 8, "1,2", 1, "off", 0.7
        a.prompts = None
    ks = [int(k) for k in a.ks.split(",") if k]
    target, draft = resolve_model_path(a.target), resolve_model_path(a.draft)
    prompts = load_prompts(a.prompts, a.num_prompts)
    print(f"loading {target} + {draft} ({a.dtype}, {a.threads} threads), {len(prompts)} prompts x "
          f"{a.max_new_tokens} tokens, K in {ks}", file=sys.stderr)
    # no prefix cache: prompts repeat (warm-up, references), and the peers re-read them
    llm = LLMModel(target, dtype=a.dtype, prefix_cache_gb=0,
                   pard_config=PardSpecDecodeConfig(model_name_or_path=draft, num_speculative_tokens=max(ks)))
    # transformers variants get their own stock copies (the engine re-lays out its weights)
    from transformers import AutoModelForCausalLM

    dtype = getattr(torch, a.dtype)
    hf_target = AutoModelForCausalLM.from_pretrained(target, dtype=dtype).eval()
    hf_draft = None if a.no_assisted else AutoModelForCausalLM.from_pretrained(draft, dtype=dtype).eval()
    prompt_ids = [llm.encode(p) for p in prompts]

    variants = [("HF greedy", 0, lambda ids: run_hf(hf_target, ids, a.max_new_tokens))]
    if hf_draft is not None:
        variants.append(("HF assisted", 0, lambda ids: run_hf(hf_target, ids, a.max_new_tokens, hf_draft, llm.tokenizer)))
    variants.append(("pace_core K=0", 0, lambda ids: run_engine(llm, 0, ids, a.max_new_tokens)))
    family = {}
    for schedule in ("fixed", "adaptive"):
        for k in ks:
            name = f"pace_core PARD K={k}" if schedule == "fixed" else f"pace_core PARD adaptive K<={k}"
            family[name] = FIXED if schedule == "fixed" else ADAPTIVE
            variants.append((name, k, lambda ids, k=k, s=schedule: run_engine(llm, k, ids, a.max_new_tokens, s)))
    sampled = set()  # rows sampled at --temperature: not compared with HF greedy
    if a.temperature:
        t, k = a.temperature, max(ks)
        sampled = {f"pace_core K=0, T={t}", f"pace_core PARD adaptive K<={k}, T={t}"}
        variants.append((f"pace_core K=0, T={t}", 0, lambda ids: run_engine(llm, 0, ids, a.max_new_tokens, temperature=t)))
        variants.append((f"pace_core PARD adaptive K<={k}, T={t}", k,
                         lambda ids: run_engine(llm, k, ids, a.max_new_tokens, "adaptive", t)))

    pace_runs = []  # AMD PACE from its own venv: one subprocess per variant and round
    if a.pace == "auto" and (PACE_VENV / "bin" / "python").is_file() and (PACE_ANCHORS / "pace_bench.py").is_file():
        with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as f:
            f.write("\n\n".join(p.rstrip("\n") for p in prompts))
        pace_ks = [int(k) for k in (a.ks if a.pace_ks == "all" else a.pace_ks).split(",") if k]
        pace_runs = [("AMD PACE 1.3.0 no draft", None, 0, "pace")] + [
            (f"AMD PACE 1.3.0 PARD K={k}", draft, k, "pace") for k in pace_ks] + [
            (f"pace_core PARD adaptive K<={k}, PACE's protocol", draft, k, "pace_core") for k in pace_ks]
    elif a.pace == "auto":
        print(f"  AMD PACE: skipped (no PACE venv at {PACE_VENV}; build it with benchmarks/pace/setup_pace.sh)",
              file=sys.stderr)

    records = {run[0]: [] for run in variants + pace_runs}
    outputs = {run[0]: [] for run in variants + pace_runs}
    for ids in prompt_ids[:1]:  # warm-up
        for _, _, fn in variants:
            fn(ids)
    for rnd in range(a.rounds):
        for i, ids in enumerate(prompt_ids):
            for name, _, fn in variants:
                out, rec = fn(ids)
                records[name].append(rec)
                if rnd == 0:
                    outputs[name].append(out)
            print(f"  round {rnd + 1}/{a.rounds} prompt {i + 1}/{len(prompt_ids)}", file=sys.stderr)
        # PACE runs in every round too, so machine drift hits it like the others
        for n, (label, d, k, engine) in enumerate(pace_runs):
            print(f"  round {rnd + 1}/{a.rounds} fresh process {n + 1}/{len(pace_runs)}: {label}", file=sys.stderr)
            res = run_protocol(engine, target, d, k, f.name, a.max_new_tokens, a.dtype, a.threads)
            if res is None:
                continue
            records[label] += [{"seconds": r["seconds"], "tokens": len(r["new_token_ids"]), "itl": [],
                                "accepted": res.get("mean_accepted_tokens_incl_bonus")} for r in res["results"]]
            if not outputs[label]:
                outputs[label] = [r["new_token_ids"] for r in res["results"]]
    reference = outputs["HF greedy"]
    rows = [summarize(name, k, records[name], None if name in sampled else reference, outputs[name], family.get(name))
            for name, k, _ in variants]
    for label, d, k, engine in pace_runs:
        if records[label]:
            fam = None if not d else PACE_PARD if engine == "pace" else ADAPTIVE_PACE_PROTOCOL
            row = summarize(label, k, records[label], reference, outputs[label], fam)
            row["ttft_ms_median"] = None
            rows.append(row)

    base = next(r for r in rows if r["variant"] == "HF greedy")["tokens_per_s"]
    for r in rows:
        r["speedup_vs_hf_greedy"] = r["tokens_per_s"] / base if base else None
    meta = {"target": target, "draft": draft, "dtype": a.dtype, "threads": a.threads, "prompts": len(prompts),
            "max_new_tokens": a.max_new_tokens, "rounds": a.rounds, "cpu": _cpu_name(), "temperature": a.temperature,
            "command": "python benchmarks/latency.py " + " ".join(argv if argv is not None else sys.argv[1:])}
    write_outputs(Path(a.out), meta, rows)
    return 0


def _cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip() + f" ({os.cpu_count()} cpus)"
    except OSError:
        pass
    return "unknown"


def save_table(out: Path, table: str) -> None:
    out.with_suffix(".md").write_text(table)
    print(table)


def pyplot():
    """matplotlib's pyplot on the Agg backend, or None (with a note) without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot", file=sys.stderr)
        return None
    return plt


def fmt(x, spec=".1f"):
    return "-" if x is None else format(x, spec)


def _family(row: dict) -> str | None:
    """The K-sweep a row belongs to (None: a single baseline); older result files have no
    'family' field and only fixed-K pace_core sweeps."""
    if "family" in row:
        return row["family"]
    return FIXED if row["variant"].startswith("pace_core PARD") else None


def target_ratios(rows: list[dict]) -> list[str]:
    """The issue's targets as ratios: pace_core's best PARD row vs HF greedy, HF assisted
    and AMD PACE's best PARD row, all from this run."""
    def best(pred):
        rs = [r for r in rows if pred(r)]
        return max(rs, key=lambda r: r["tokens_per_s"]) if rs else None

    ours = best(lambda r: _family(r) in (FIXED, ADAPTIVE))
    if ours is None:
        return []
    # against AMD PACE: pace_core under PACE's own protocol (fresh process, per-prompt warm-up), when measured
    same = best(lambda r: _family(r) == ADAPTIVE_PACE_PROTOCOL) or ours
    out = [f"Best pace_core: **{ours['variant']}** at {ours['tokens_per_s']:.1f} tokens/s"
           + (f"; under AMD PACE's protocol: **{same['variant']}** at {same['tokens_per_s']:.1f}" if same is not ours else "")
           + ":"]
    for label, peer, goal, mine in (("HF greedy", best(lambda r: r["variant"] == "HF greedy"), 3.0, ours),
                                    ("HF assisted", best(lambda r: r["variant"] == "HF assisted"), 2.0, ours),
                                    ("AMD PACE PARD at its best K", best(lambda r: _family(r) == PACE_PARD), 1.5, same)):
        if peer and peer["tokens_per_s"]:
            ratio = mine["tokens_per_s"] / peer["tokens_per_s"]
            out.append(f"- {ratio:.2f}x {label} ({peer['variant']}, {peer['tokens_per_s']:.1f}); "
                       f"target {goal}x: {'met' if ratio >= goal else 'missed'}")
    return out


def write_outputs(out: Path, meta: dict, rows: list[dict]) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    lines = [
        f"{meta['prompts']} prompts x {meta['max_new_tokens']} new tokens, {meta['dtype']}, {meta['threads']} threads, "
        f"{meta['cpu']}; `{meta['command']}`", "",
        "| variant | tokens/s | speedup vs HF greedy | TTFT ms (median) | ITL ms (median) | ITL ms (p90) | accepted tokens/step | tokens equal to HF greedy |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(f"| {r['variant']} | {fmt(r['tokens_per_s'])} | {fmt(r['speedup_vs_hf_greedy'], '.2f')}x | "
                     f"{fmt(r['ttft_ms_median'])} | {fmt(r['itl_ms_median'], '.2f')} | {fmt(r['itl_ms_p90'], '.2f')} | "
                     f"{fmt(r['mean_accepted'], '.2f')} | {fmt(100 * r['token_match_vs_hf_greedy'] if r['token_match_vs_hf_greedy'] is not None else None)}% |")
    lines += ["", *target_ratios(rows)]
    save_table(out, "\n".join(lines) + "\n")
    plt = pyplot()
    if plt is None:
        return
    fig, ax = plt.subplots(figsize=(7, 4.2))
    families = {}
    for r in rows:
        if _family(r):
            families.setdefault(_family(r), []).append(r)
    looks = {ADAPTIVE: ("o-", "C0"), FIXED: ("s--", "C9"), PACE_PARD: ("^-", "C3"), ADAPTIVE_PACE_PROTOCOL: ("D:", "C2")}
    for fam, rs in families.items():
        marker, color = looks.get(fam, ("x-", None))
        ax.plot([r["k"] for r in rs], [r["tokens_per_s"] for r in rs], marker, label=fam, color=color)
    styles = iter(["--", ":", "-.", (0, (5, 1)), (0, (1, 3)), (0, (3, 1, 1, 1))])
    for r in rows:
        if not _family(r):
            color = "C0" if r["variant"].startswith("pace_core") else "gray" if "HF" in r["variant"] else "C3"
            ax.axhline(r["tokens_per_s"], linestyle=next(styles, "--"), color=color,
                       label=f"{r['variant']} ({r['tokens_per_s']:.0f})")
    ax.set_xlabel("K (speculative tokens per step)")
    ax.set_ylabel("tokens / s (single stream)")
    ax.set_title(f"Single-stream decoding, {meta['dtype']}, {meta['threads']} threads")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=110)
    print(f"wrote {out.with_suffix('.json')}, .md, .png", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
