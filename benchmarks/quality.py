"""What 8-bit and 4-bit weights cost in quality, measured on the bundled demo pair (real
trained weights, held-out Python code), beside llama.cpp's q8_0 / q4_0 of the same model.

    python benchmarks/quality.py                       # ours + llama.cpp (when set up)
    python benchmarks/quality.py --variants float32,bfloat16,int8,int4 --llamacpp off
    python benchmarks/quality.py --smoke               # tiny random pair, seconds (CI)

Against the float32 model (transformers' own forward), over held-out text in windows of
--window tokens, teacher-forced:
  * mean KL(float32 || variant) of the next-token distribution, in nats;
  * perplexity of the held-out text, and its change;
  * top-1 agreement: positions where both pick the same next token;
and over --num-prompts held-out prompts, greedy:
  * greedy agreement: the share of the first --greedy-tokens generated tokens that equal
    float32's at the same position (a divergence mostly keeps them apart after it), and
    the mean length of the identical prefix;
  * PARD acceptance (tokens per target step at K=8) of each target format with the float32,
    int8 and int4 draft: what a quantized draft costs.
llama.cpp's rows (f32, bf16, q8_0, q4_0: GGUF from its own converter and llama-quantize's
default recipe, benchmarks/llamacpp/setup.sh) are computed the same way from its logits.
Writes benchmarks/results/quality.{json,md}.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks"), str(ROOT / "benchmarks" / "llamacpp")]


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def engine(path: str, variant: str, draft: str | None = None, draft_variant: str | None = None, k: int = 8):
    """This engine with weights in ``variant`` (float32, bfloat16, int8, int4: int8/int4
    quantize the float32 checkpoint's linears, activations float32)."""
    from pace_core import LLMModel, PardSpecDecodeConfig

    def split(v):
        return ("float32", v) if v in ("int8", "int4") else (v, None)

    dtype, quantization = split(variant)
    pard = None
    if draft:
        pard = PardSpecDecodeConfig(model_name_or_path=draft, num_speculative_tokens=k, speculation_schedule="fixed",
                                    quantization=split(draft_variant)[1])
    return LLMModel(path, dtype=dtype, quantization=quantization, pard_config=pard, prefix_cache_gb=0)


def windows(ids: list[int], size: int, count: int) -> list[list[int]]:
    step = max(1, (len(ids) - size) // max(1, count))
    return [ids[s : s + size] for s in range(0, len(ids) - size + 1, step)][:count]


@torch.inference_mode()
def our_logprobs(model, seqs: list[list[int]]) -> torch.Tensor:
    rows = []
    for ids in seqs:
        model.target.reset()
        rows.append(torch.log_softmax(model.target.forward(ids, len(ids)).double(), -1))
    return torch.cat(rows)


@torch.inference_mode()
def reference_logprobs(path: str, seqs: list[list[int]]) -> torch.Tensor:
    from pace_core.testing import hf_model

    hf = hf_model(path, "float32")
    vocab = None
    rows = []
    for ids in seqs:
        logits = hf(torch.tensor([ids])).logits[0].double()
        rows.append(torch.log_softmax(logits, -1))
    return torch.cat(rows)


def compare(ref: torch.Tensor, got: torch.Tensor, seqs: list[list[int]]) -> dict:
    """KL(ref || got), perplexities and top-1 agreement over the teacher-forced positions."""
    vocab = min(ref.shape[1], got.shape[1])
    ref, got = ref[:, :vocab], got[:, :vocab]
    got = got - torch.logsumexp(got, -1, keepdim=True)  # renormalised over the common ids
    kl = (ref.exp() * (ref - got)).sum(-1)
    targets, keep, offset = [], [], 0
    for ids in seqs:  # position i predicts ids[i + 1]
        targets += ids[1:] + [0]
        keep += [True] * (len(ids) - 1) + [False]
    targets, keep = torch.tensor(targets), torch.tensor(keep)
    nll = lambda lp: -lp[keep].gather(1, targets[keep, None]).mean().item()  # noqa: E731
    return {"kl_mean": kl[keep].mean().item(), "kl_p99": kl[keep].quantile(0.99).item(),
            "ppl_ref": math.exp(nll(ref)), "ppl": math.exp(nll(got)),
            "top1_agreement": (ref[keep].argmax(-1) == got[keep].argmax(-1)).double().mean().item()}


def greedy_agreement(ref: list[list[int]], got: list[list[int]]) -> dict:
    same = [sum(a == b for a, b in zip(r, g)) / len(r) for r, g in zip(ref, got)]
    prefix = []
    for r, g in zip(ref, got):
        n = 0
        while n < min(len(r), len(g)) and r[n] == g[n]:
            n += 1
        prefix.append(n)
    return {"greedy_agreement": sum(same) / len(same), "identical_prefix_mean": sum(prefix) / len(prefix)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target", default="models/demo-target")
    ap.add_argument("--draft", default="models/demo-draft")
    ap.add_argument("--variants", default="bfloat16,int8,int4", help="this engine's (float32 is the reference)")
    ap.add_argument("--llamacpp", choices=["auto", "off"], default="auto")
    ap.add_argument("--llamacpp-variants", default="f32,bf16,q8_0,q4_0")
    ap.add_argument("--window", type=int, default=256)
    ap.add_argument("--windows", type=int, default=24)
    ap.add_argument("--num-prompts", type=int, default=16)
    ap.add_argument("--greedy-tokens", type=int, default=64)
    ap.add_argument("--k", type=int, default=8)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "quality"))
    ap.add_argument("--smoke", action="store_true")
    a = ap.parse_args(argv)
    torch.set_num_threads(2)

    from pace_core import SamplingConfig
    from pace_core.loading import resolve_model_path

    if a.smoke:
        from pace_core.testing import build_pair

        a.target, a.draft = map(str, build_pair(Path(tempfile.mkdtemp(prefix="pace-quality-")), "qwen2"))
        a.llamacpp, a.window, a.windows, a.num_prompts, a.greedy_tokens = "off", 64, 2, 2, 8
        texts = ["def f(x):\n    return x + 1\n" * 40]
        prompts = ["def add(a, b):\n", "import os\n"]
    else:
        from pace_core.training import corpus

        _, heldout = corpus.split_files()
        texts = corpus.read(heldout)
        prompts = [p for p in (ROOT / "benchmarks" / "prompts" / "heldout.txt").read_text().split("\n\n")
                   if p.strip()][: a.num_prompts]
    target, draft = resolve_model_path(a.target), resolve_model_path(a.draft)
    reference = engine(target, "float32")
    tok = reference.tokenizer
    ids = tok.encode("\n\n".join(texts))
    seqs = windows(ids, a.window, a.windows)
    prompt_ids = [reference.encode(p) for p in prompts]
    greedy = SamplingConfig(max_new_tokens=a.greedy_tokens, ignore_eos=True)
    log(f"{len(seqs)} windows of {a.window} tokens, {len(prompt_ids)} prompts")
    ref_lp = reference_logprobs(target, seqs)
    ref_greedy = [reference.generate(p, greedy).token_ids for p in prompt_ids]
    rows = {}
    for variant in a.variants.split(","):
        model = engine(target, variant)
        row = compare(ref_lp, our_logprobs(model, seqs), seqs)
        row.update(greedy_agreement(ref_greedy, [model.generate(p, greedy).token_ids for p in prompt_ids]))
        row["bits_per_weight"] = {"float32": 32, "bfloat16": 16, "int8": 8 + 32 / 896, "int4": 4.25}.get(variant)
        rows[f"pace_core {variant}"] = row
        log(f"  pace_core {variant}: {row}")
    lc = None
    if a.llamacpp == "auto":
        from llamacpp import LlamaCpp

        lc = LlamaCpp.find()
        if lc is None:
            log("  llama.cpp: skipped (not set up: bash benchmarks/llamacpp/setup.sh)")
    if lc is not None:
        cache = Path.home() / ".cache" / "pace_core" / "gguf"
        for variant in a.llamacpp_variants.split(","):
            gguf = lc.gguf(Path(target), variant, cache)
            lp = torch.from_numpy(lc.logprobs(gguf, seqs)).double()
            row = compare(ref_lp, lp, seqs)
            row.update(greedy_agreement(ref_greedy, lc.greedy(gguf, prompt_ids, a.greedy_tokens)))
            row["file_mb"] = gguf.stat().st_size / 1e6
            rows[f"llama.cpp {variant}"] = row
            log(f"  llama.cpp {variant}: {row}")
    # acceptance with quantized drafts
    acceptance = {}
    for t_variant in ["float32"] + [v for v in a.variants.split(",") if v in ("int8", "int4")]:
        for d_variant in ("float32", "int8", "int4"):
            model = engine(target, t_variant, draft, d_variant, a.k)
            steps = tokens = 0
            for p in prompt_ids:
                out = model.generate(p, greedy)
                steps, tokens = steps + out.stats.steps, tokens + len(out.token_ids)
            acceptance[f"target {t_variant}, draft {d_variant}"] = tokens / steps
            log(f"  acceptance target {t_variant} draft {d_variant}: {tokens / steps:.2f} tokens/step")
    result = {"target": a.target, "draft": a.draft, "window": a.window, "windows": len(seqs),
              "prompts": len(prompt_ids), "greedy_tokens": a.greedy_tokens, "k": a.k, "rows": rows,
              "acceptance": acceptance}
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=1))
    lines = [f"Against float32 ({a.target}), {len(seqs)} held-out windows of {a.window} tokens, "
             f"{len(prompt_ids)} prompts x {a.greedy_tokens} greedy tokens.", "",
             "| weights | KL mean (nats) | KL p99 | perplexity (float32: {:.3f}) | top-1 agreement | greedy agreement | "
             "identical prefix |".format(next(iter(rows.values()))["ppl_ref"] if rows else float("nan")),
             "|---|---:|---:|---:|---:|---:|---:|"]
    for name, r in rows.items():
        lines.append(f"| {name} | {r['kl_mean']:.5f} | {r['kl_p99']:.4f} | {r['ppl']:.3f} | {r['top1_agreement']:.1%} | "
                     f"{r['greedy_agreement']:.1%} | {r['identical_prefix_mean']:.1f} |")
    lines += ["", f"PARD acceptance, K={a.k} fixed (tokens per target step):", "", "| | tokens/step |", "|---|---:|"]
    lines += [f"| {name} | {v:.2f} |" for name, v in acceptance.items()]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
