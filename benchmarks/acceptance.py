"""PARD acceptance of a target/draft pair on held-out prompts, for a K sweep, plus the
held-out perplexity of the target and the draft (as a plain LM).

    python benchmarks/acceptance.py                      # the bundled demo pair
    python benchmarks/acceptance.py --target DIR --draft DIR --ks 1,2,4,8 --prompts FILE
    python benchmarks/acceptance.py --draft-vocab-sizes 2048,1024,512   # + a reduced draft vocabulary

Default prompts: cut from the Python standard library files held out of the demo
pair's training (pace_core.training.corpus); they are also written to
benchmarks/prompts/heldout.txt for the latency benchmark. Writes
benchmarks/results/acceptance.{json,md,png}.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


@torch.inference_mode()
def perplexity(model, ids, window: int = 256) -> float:
    nll, n = 0.0, 0
    for s in range(0, len(ids) - 1, window):
        x = torch.tensor([ids[s : s + window + 1]])
        if x.shape[1] < 2:
            break
        logits = model(input_ids=x[:, :-1]).logits.float()
        nll += torch.nn.functional.cross_entropy(logits[0], x[0, 1:], reduction="sum").item()
        n += x.shape[1] - 1
    return math.exp(nll / n)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target", default="models/demo-target")
    ap.add_argument("--draft", default="models/demo-draft")
    ap.add_argument("--ks", default="1,2,4,8,12,16")
    ap.add_argument("--prompts", type=Path, default=None, help="prompts separated by blank lines")
    ap.add_argument("--num-prompts", type=int, default=16)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--draft-vocab-sizes", default="",
                    help="also measure, at the largest K, drafts proposing among the first N ids (comma list)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "acceptance"))
    a = ap.parse_args(argv)

    from pace_core import LLMModel, PardSpecDecodeConfig, SamplingConfig
    from pace_core.training import corpus

    _, heldout = corpus.split_files()
    held_texts = corpus.read(heldout)
    if a.prompts:
        prompts = [p for p in a.prompts.read_text(encoding="utf-8").split("\n\n") if p.strip()][: a.num_prompts]
    else:
        prompts = corpus.heldout_prompts(held_texts, a.num_prompts)
        out_prompts = ROOT / "benchmarks" / "prompts" / "heldout.txt"
        out_prompts.parent.mkdir(parents=True, exist_ok=True)
        out_prompts.write_text("\n\n".join(prompts) + "\n", encoding="utf-8")
    ks = [int(k) for k in a.ks.split(",")]
    model = LLMModel(a.target, dtype=a.dtype,
                     pard_config=PardSpecDecodeConfig(model_name_or_path=a.draft, num_speculative_tokens=max(ks),
                                                      speculation_schedule="fixed"))  # acceptance at exactly K
    tok = model.tokenizer
    held_ids = []
    for t in held_texts:
        held_ids += tok.encode(t, add_special_tokens=False) + [tok.eos_token_id]
    from pace_core.testing import hf_model  # transformers' own forward (the engine keeps packed weights only)

    target_hf, draft_hf = hf_model(a.target, a.dtype), hf_model(a.draft, a.dtype)
    ppl_target = perplexity(target_hf, held_ids)
    ppl_draft = perplexity(draft_hf, held_ids)
    rows = []
    sample = None
    for k in ks:
        model.num_speculative_tokens = k
        tokens = steps = 0
        for p in prompts:
            out = model.generate(p, SamplingConfig(max_new_tokens=a.max_new_tokens))
            tokens += len(out.token_ids)
            steps += out.stats.steps
            if sample is None:
                sample = {"prompt": p, "completion": out.text}
        rows.append({"k": k, "mean_accepted": tokens / steps, "tokens": tokens, "steps": steps})
        print(f"K={k:2d}: {tokens / steps:.2f} tokens per step ({tokens} tokens, {steps} steps)", file=sys.stderr)
    # a reduced draft vocabulary (PardSpecDecodeConfig.draft_vocab_size) at the largest K
    vocab_rows = []
    for n_vocab in [int(v) for v in a.draft_vocab_sizes.split(",") if v]:
        reduced = LLMModel(a.target, dtype=a.dtype, pard_config=PardSpecDecodeConfig(
            model_name_or_path=a.draft, num_speculative_tokens=max(ks), speculation_schedule="fixed",
            draft_vocab_size=n_vocab))
        outs = [reduced.generate(p, SamplingConfig(max_new_tokens=a.max_new_tokens)) for p in prompts]
        tokens, steps = sum(len(o.token_ids) for o in outs), sum(o.stats.steps for o in outs)
        vocab_rows.append({"draft_vocab_size": n_vocab, "k": max(ks), "mean_accepted": tokens / steps})
        print(f"draft vocabulary {n_vocab}: {tokens / steps:.2f} tokens per step at K={max(ks)}", file=sys.stderr)
    n_t = sum(p.numel() for p in target_hf.parameters())
    n_d = sum(p.numel() for p in draft_hf.parameters())
    meta = {"target": a.target, "draft": a.draft, "prompts": len(prompts), "max_new_tokens": a.max_new_tokens,
            "dtype": a.dtype, "target_params": n_t, "draft_params": n_d, "heldout_tokens": len(held_ids),
            "heldout_perplexity_target": ppl_target, "heldout_perplexity_draft": ppl_draft,
            "command": "python benchmarks/acceptance.py " + " ".join(argv if argv is not None else sys.argv[1:])}
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows, "draft_vocab_rows": vocab_rows,
                                                    "sample": sample}, indent=1))
    lines = [f"{len(prompts)} held-out prompts x up to {a.max_new_tokens} new tokens, greedy, {a.dtype}; "
             f"target {n_t / 1e6:.1f}M params (held-out perplexity {ppl_target:.2f}), "
             f"draft {n_d / 1e6:.2f}M params (as a plain LM: {ppl_draft:.2f}); `{meta['command'].strip()}`", "",
             "| K | mean tokens per step (accepted + 1) |", "|---:|---:|"]
    lines += [f"| {r['k']} | {r['mean_accepted']:.2f} |" for r in rows]
    if vocab_rows:
        full = next((r["mean_accepted"] for r in rows if r["k"] == max(ks)), None)
        lines += ["", f"| draft vocabulary (first N ids), K={max(ks)} | mean tokens per step |", "|---:|---:|",
                  f"| all {model.draft.vocab_limit} | {full:.2f} |"]
        lines += [f"| {r['draft_vocab_size']} | {r['mean_accepted']:.2f} |" for r in vocab_rows]
    table = "\n".join(lines) + "\n"
    out.with_suffix(".md").write_text(table)
    print(table)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.8))
    ax.plot([r["k"] for r in rows], [r["mean_accepted"] for r in rows], "o-", label="PARD draft")
    ax.plot([r["k"] for r in rows], [r["k"] + 1 for r in rows], ":", color="gray", label="upper bound K+1")
    ax.set_xlabel("K (speculative tokens per step)")
    ax.set_ylabel("tokens per target step")
    ax.set_ylim(0, max(r["mean_accepted"] for r in rows) * 1.6)
    ax.set_title("Demo pair: acceptance on held-out stdlib prompts")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=110)
    return 0


if __name__ == "__main__":
    sys.exit(main())
