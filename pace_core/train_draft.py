"""Adapt a PARD draft for your own target.

    python -m pace_core.train_draft --target models/demo-target --data /path/to/code \\
        --distill 1024 --blocks 8 --steps 2000 --out runs/my-draft
    python -m pace_core.train_draft --target DIR --init DIR_OF_SMALL_MODEL --data corpus.txt --steps 500 --out DIR

--init starts from an existing small model that shares the target's tokenizer; without
it a fresh draft of the target's family is built (--layers/--hidden/...). --distill N
trains on N greedy continuations of the target (prompts cut from --data), which raises
acceptance; --data alone trains on the corpus. Re-running with the same --out resumes.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m pace_core.train_draft", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target", required=True, help="target model directory (tokenizer, config, distillation)")
    ap.add_argument("--init", default=None, help="start from this small model (same tokenizer) instead of a fresh one")
    ap.add_argument("--data", action="append", default=[], help="text file or directory (repeatable)")
    ap.add_argument("--distill", type=int, default=0, help="number of target greedy continuations to train on")
    ap.add_argument("--distill-prompt-len", type=int, default=64)
    ap.add_argument("--distill-new-tokens", type=int, default=128)
    ap.add_argument("--distill-fraction", type=float, default=0.75, help="share of each batch from distilled text")
    ap.add_argument("--blocks", type=int, default=8, help="1 + number of mask blocks (the K the draft learns)")
    ap.add_argument("--no-cod", action="store_true", help="keep every mask (no conditional drop)")
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--seq-len", type=int, default=192)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--checkpoint-every", type=int, default=100)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--heads", type=int, default=2)
    ap.add_argument("--kv-heads", type=int, default=1)
    ap.add_argument("--intermediate", type=int, default=384)
    ap.add_argument("--out", required=True, help="output draft directory (also holds checkpoints)")
    return ap


def main(argv: list[str] | None = None) -> int:
    a = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    import torch

    from .loading import load_causal_lm, load_tokenizer
    from .training import draft as d

    if a.threads:
        torch.set_num_threads(a.threads)
    if not a.data:
        print("error: give --data (a text corpus; also the source of distillation prompts)", file=sys.stderr)
        return 2
    if a.blocks < 2:
        print("error: --blocks must be >= 2 (1 real block + at least one mask block)", file=sys.stderr)
        return 2
    out = Path(a.out)
    tokenizer = load_tokenizer(a.target)
    target = load_causal_lm(a.target, "float32")
    corpus = d.tokenize_stream(tokenizer, d.read_corpus(a.data))
    print(f"corpus: {len(corpus)} tokens", flush=True)
    distilled = None
    if a.distill:
        cache = out / "distilled.pt"
        if cache.is_file():
            distilled = torch.load(cache)
        else:
            distilled = d.distill(target, corpus, a.distill, a.distill_prompt_len, a.distill_new_tokens, seed=a.seed)
            out.mkdir(parents=True, exist_ok=True)
            torch.save(distilled, cache)
    pard_token = d.resolve_pard_token(tokenizer, target.config.vocab_size)
    if a.init:
        draft = load_causal_lm(a.init, "float32")
        draft.train()
        draft.requires_grad_(True)
    else:
        draft = d.new_draft(target.config, pard_token, a.layers, a.hidden, a.heads, a.kv_heads, a.intermediate,
                            seed=a.seed)
    del target
    n = sum(p.numel() for p in draft.parameters())
    print(f"draft: {n / 1e6:.2f}M parameters, pard_token={pard_token}, {a.blocks - 1} mask blocks", flush=True)
    d.train_draft(draft, tokenizer, pard_token, out, corpus if a.distill_fraction < 1 or not a.distill else None,
                  distilled, a.steps, blocks=a.blocks, seq_len=a.seq_len, batch=a.batch, lr=a.lr,
                  distill_fraction=a.distill_fraction, seed=a.seed, checkpoint_every=a.checkpoint_every,
                  cod=not a.no_cod)
    print(f"wrote the PARD draft to {out}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
