"""Rebuild the bundled demo pair from scratch, with fixed seeds:

  1. tokenizer: byte-level BPE (4096) trained on the Python standard library's source
     (a fixed set of files held out), with <|endoftext|>, <|pard|> and a chat template;
  2. target:    a Qwen2 model pre-trained on that corpus (plain next-token loss);
  3. distill:   the target's own greedy continuations of prompts cut from the corpus;
  4. draft:     a small Qwen2 PARD draft trained with `pace_core.train_draft` on the
                distilled text and the corpus (mask blocks, COD);
  5. eval:      held-out perplexity and PARD acceptance (benchmarks/acceptance.py).

    python models/build_demo_pair.py                 # all stages; each resumes/skips if done
    python models/build_demo_pair.py --stage target --target-steps 1200

Work files go to runs/demo/ (not committed); the results to models/demo-target and
models/demo-draft. Progress bars and a loss.csv per stage show where it is.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from pace_core.training import corpus  # noqa: E402

RUN = ROOT / "runs" / "demo"
TARGET_DIR = ROOT / "models" / "demo-target"
DRAFT_DIR = ROOT / "models" / "demo-draft"

TARGET_SHAPE = dict(hidden_size=256, num_hidden_layers=8, num_attention_heads=4, num_key_value_heads=2,
                    intermediate_size=704)
DRAFT_SHAPE = dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                   intermediate_size=384)
VOCAB = 4096
SEQ = 256


def stage_tokenizer(a) -> None:
    from pace_core.testing import build_tokenizer

    if (RUN / "tokenizer" / "tokenizer.json").is_file():
        return
    train, heldout = corpus.split_files()
    t0 = time.time()
    tok = build_tokenizer(RUN / "tokenizer", vocab_size=VOCAB, texts=corpus.read(train))
    ids = []
    for text in corpus.read(train):
        ids += tok.encode(text, add_special_tokens=False) + [tok.eos_token_id]
    torch.save(torch.tensor(ids, dtype=torch.int16 if len(tok) < 32768 else torch.int32), RUN / "train_ids.pt")
    held = []
    for text in corpus.read(heldout):
        held += tok.encode(text, add_special_tokens=False) + [tok.eos_token_id]
    torch.save(torch.tensor(held, dtype=torch.int32), RUN / "heldout_ids.pt")
    (RUN / "split.json").write_text(json.dumps({"train": train, "heldout": heldout}, indent=0))
    print(f"tokenizer: {len(tok)} tokens, {len(ids)} training tokens ({len(train)} files), {len(held)} held-out "
          f"tokens ({len(heldout)} files), {time.time() - t0:.0f}s", flush=True)


def load_tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(RUN / "tokenizer")


def new_model(tok, shape, seed, pard_token=None):
    from transformers import AutoModelForCausalLM, GenerationConfig, Qwen2Config

    cfg = Qwen2Config(vocab_size=len(tok), max_position_embeddings=2048, tie_word_embeddings=True,
                      eos_token_id=tok.eos_token_id, bos_token_id=None, pad_token_id=None, rope_theta=10000.0, **shape)
    if pard_token is not None:
        cfg.pard_token = pard_token
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    model.generation_config = GenerationConfig(eos_token_id=tok.eos_token_id)
    return model


def save_model(model, tok, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tok.save_pretrained(out)


def stage_target(a) -> None:
    from pace_core.training.loop import cross_entropy, train

    if (TARGET_DIR / "model.safetensors").is_file() and not a.force:
        return
    tok = load_tokenizer()
    ids = torch.load(RUN / "train_ids.pt").long()
    model = new_model(tok, TARGET_SHAPE, seed=1)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"target: {n_params / 1e6:.2f}M parameters, {a.target_steps} steps of {a.batch}x{SEQ} tokens", flush=True)

    def loss_fn(m, step, rng):
        starts = [rng.randrange(0, len(ids) - SEQ - 1) for _ in range(a.batch)]
        x = torch.stack([ids[s : s + SEQ + 1] for s in starts])
        logits = m(input_ids=x[:, :-1]).logits
        return cross_entropy(logits, x[:, 1:])

    t0 = time.time()
    train(model, loss_fn, a.target_steps, RUN / "target", lr=a.target_lr, warmup=50, checkpoint_every=50, seed=1,
          desc="target", save_fn=lambda m, out: save_model(m, tok, out / "model"))
    save_model(model, tok, TARGET_DIR)
    (RUN / "target" / "time.json").write_text(json.dumps({"seconds": time.time() - t0, "steps": a.target_steps}))


def stage_distill(a) -> None:
    """Greedy continuations of the target for random prompts cut from the training
    corpus: the text the draft must learn to predict."""
    out = RUN / "distill.pt"
    if out.is_file() and not a.force:
        return
    from pace_core.loading import load_causal_lm
    from pace_core.training.draft import distill

    target = load_causal_lm(str(TARGET_DIR), "float32")
    ids = torch.load(RUN / "train_ids.pt").long()
    rows = distill(target, ids, a.distill_samples, a.distill_prompt_len, a.distill_new_tokens, seed=2)
    torch.save(rows, out)


def stage_draft(a) -> None:
    from transformers import AutoConfig

    from pace_core.training.draft import new_draft, resolve_pard_token, train_draft

    if (DRAFT_DIR / "model.safetensors").is_file() and not a.force:
        return
    tok = load_tokenizer()
    target_cfg = AutoConfig.from_pretrained(TARGET_DIR)
    pard = resolve_pard_token(tok, target_cfg.vocab_size)
    draft = new_draft(target_cfg, pard, seed=3, layers=DRAFT_SHAPE["num_hidden_layers"], hidden=DRAFT_SHAPE["hidden_size"],
                      heads=DRAFT_SHAPE["num_attention_heads"], kv_heads=DRAFT_SHAPE["num_key_value_heads"],
                      intermediate=DRAFT_SHAPE["intermediate_size"])
    print(f"draft: {sum(p.numel() for p in draft.parameters()) / 1e6:.2f}M parameters, pard_token={pard}", flush=True)
    corpus_ids = torch.load(RUN / "train_ids.pt").long()
    distilled = torch.load(RUN / "distill.pt")
    t0 = time.time()
    train_draft(draft, tok, pard, RUN / "draft", corpus_ids, distilled, a.draft_steps, blocks=a.blocks,
                seq_len=a.distill_prompt_len + a.distill_new_tokens, batch=8, lr=a.draft_lr,
                distill_fraction=0.8, seed=3, checkpoint_every=100)
    shutil.rmtree(DRAFT_DIR, ignore_errors=True)
    shutil.copytree(RUN / "draft", DRAFT_DIR, ignore=shutil.ignore_patterns("checkpoint", "*.pt"))
    (RUN / "draft" / "time.json").write_text(json.dumps({"seconds": time.time() - t0, "steps": a.draft_steps}))


def stage_eval(a) -> None:
    import subprocess

    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "acceptance.py")], check=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--stage", default="all", choices=["all", "tokenizer", "target", "distill", "draft", "eval"])
    ap.add_argument("--threads", type=int, default=int(os.environ.get("PACE_TRAIN_THREADS", "2")))
    ap.add_argument("--batch", type=int, default=12)
    ap.add_argument("--target-steps", type=int, default=1000)
    ap.add_argument("--target-lr", type=float, default=2e-3)
    ap.add_argument("--distill-samples", type=int, default=2048)
    ap.add_argument("--distill-prompt-len", type=int, default=64)
    ap.add_argument("--distill-new-tokens", type=int, default=128)
    ap.add_argument("--draft-steps", type=int, default=2000)
    ap.add_argument("--draft-lr", type=float, default=2e-3)
    ap.add_argument("--blocks", type=int, default=9, help="1 + mask blocks: the draft learns K up to 8 at once")
    ap.add_argument("--force", action="store_true", help="redo stages whose output exists")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    RUN.mkdir(parents=True, exist_ok=True)
    stages = {"tokenizer": stage_tokenizer, "target": stage_target, "distill": stage_distill, "draft": stage_draft,
              "eval": stage_eval}
    for name, fn in stages.items():
        if a.stage in ("all", name):
            fn(a)
    return 0


if __name__ == "__main__":
    sys.exit(main())
