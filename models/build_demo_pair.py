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
import random
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
    from transformers import AutoModelForCausalLM
    from tqdm import tqdm

    model = AutoModelForCausalLM.from_pretrained(TARGET_DIR, dtype=torch.float32).eval()
    ids = torch.load(RUN / "train_ids.pt").long()
    rng = random.Random(2)
    rows = []
    batch, prompt_len = 32, a.distill_prompt_len
    with torch.inference_mode():
        for _ in tqdm(range(a.distill_samples // batch), desc="distill", mininterval=5):
            starts = [rng.randrange(0, len(ids) - prompt_len) for _ in range(batch)]
            x = torch.stack([ids[s : s + prompt_len] for s in starts])
            y = model.generate(x, attention_mask=torch.ones_like(x), do_sample=False,
                               max_new_tokens=a.distill_new_tokens, eos_token_id=None, pad_token_id=0)
            rows.append(y)
    torch.save(torch.cat(rows), out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--stage", default="all", choices=["all", "tokenizer", "target", "distill", "draft", "eval"])
    ap.add_argument("--threads", type=int, default=int(os.environ.get("PACE_TRAIN_THREADS", "2")))
    ap.add_argument("--batch", type=int, default=12)
    ap.add_argument("--target-steps", type=int, default=1000)
    ap.add_argument("--target-lr", type=float, default=2e-3)
    ap.add_argument("--distill-samples", type=int, default=1024)
    ap.add_argument("--distill-prompt-len", type=int, default=64)
    ap.add_argument("--distill-new-tokens", type=int, default=128)
    ap.add_argument("--draft-steps", type=int, default=1500)
    ap.add_argument("--force", action="store_true", help="redo stages whose output exists")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    RUN.mkdir(parents=True, exist_ok=True)
    stages = {"tokenizer": stage_tokenizer, "target": stage_target, "distill": stage_distill}
    for name, fn in stages.items():
        if a.stage in ("all", name):
            fn(a)
    return 0


if __name__ == "__main__":
    sys.exit(main())
