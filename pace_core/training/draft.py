"""Adapting a PARD draft for a target: data (a text corpus and/or the target's own
greedy continuations), a draft model (from an existing small model or a fresh config),
and the PARD training loop. The result is a draft directory that `LLMModel` loads."""
from __future__ import annotations

import json
import logging
import random
from pathlib import Path

import torch

from .pard import build_batch, pard_loss

logger = logging.getLogger(__name__)
TEXT_SUFFIXES = (".py", ".txt", ".md", ".rst", ".json", ".js", ".c", ".h", ".java", ".go", ".rs")


def read_corpus(paths: list[str]) -> list[str]:
    """Texts of the given files, or of the text files under the given directories."""
    texts = []
    for p in map(Path, paths):
        if not p.exists():
            raise FileNotFoundError(f"training data {p} does not exist")
        files = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix in TEXT_SUFFIXES) if p.is_dir() else [p]
        for f in files:
            try:
                texts.append(f.read_text(encoding="utf-8"))
            except (UnicodeDecodeError, OSError):
                continue
    if not texts:
        raise ValueError(f"no readable text files in {paths}")
    return texts


def tokenize_stream(tokenizer, texts: list[str]) -> torch.Tensor:
    """One long token stream, documents separated by EOS."""
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    for text in texts:
        ids += tokenizer.encode(text, add_special_tokens=False)
        if eos is not None:
            ids.append(eos)
    return torch.tensor(ids, dtype=torch.long)


@torch.inference_mode()
def distill(target, stream: torch.Tensor, num_samples: int, prompt_len: int, new_tokens: int, seed: int = 0,
            batch: int = 32) -> torch.Tensor:
    """The target's greedy continuations of random windows of ``stream``:
    (num_samples, prompt_len + new_tokens) token ids."""
    from tqdm import tqdm

    if len(stream) <= prompt_len:
        raise ValueError(f"the corpus has {len(stream)} tokens: too few for prompts of {prompt_len}")
    rng = random.Random(seed)
    rows = []
    for start in tqdm(range(0, num_samples, batch), desc="distill", mininterval=5):
        n = min(batch, num_samples - start)
        starts = [rng.randrange(0, len(stream) - prompt_len) for _ in range(n)]
        x = torch.stack([stream[s : s + prompt_len] for s in starts])
        y = target.generate(x, attention_mask=torch.ones_like(x), do_sample=False, max_new_tokens=new_tokens,
                            min_new_tokens=new_tokens, pad_token_id=0)
        rows.append(y[:, : prompt_len + new_tokens])
    return torch.cat(rows)


def new_draft(target_config, pard_token: int, layers: int, hidden: int, heads: int, kv_heads: int,
              intermediate: int, seed: int = 0):
    """A fresh draft with the target's architecture family and vocabulary, smaller."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model(
        target_config.model_type, vocab_size=target_config.vocab_size, hidden_size=hidden, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, intermediate_size=intermediate,
        max_position_embeddings=target_config.max_position_embeddings, tie_word_embeddings=True,
        rope_theta=getattr(target_config, "rope_theta", 10000.0), eos_token_id=target_config.eos_token_id,
        bos_token_id=getattr(target_config, "bos_token_id", None), pad_token_id=None,
    )
    if target_config.model_type == "qwen3":
        cfg.head_dim = hidden // heads
    cfg.pard_token = pard_token
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)


def resolve_pard_token(tokenizer, vocab_size: int) -> int:
    """The tokenizer's ``<|pard|>`` (or mask) token if it has one; else a fresh id at the
    end of the vocabulary (the draft's embedding is then padded to hold it)."""
    for name in ("<|pard|>", "<pard>", "<|mask|>", "<mask>"):
        tid = tokenizer.convert_tokens_to_ids(name)
        if isinstance(tid, int) and tid != tokenizer.unk_token_id and 0 <= tid < vocab_size:
            return tid
    return len(tokenizer)


def save_draft(model, tokenizer, out: Path, pard_token: int, meta: dict) -> None:
    from transformers import GenerationConfig

    out.mkdir(parents=True, exist_ok=True)
    model.config.pard_token = pard_token
    if getattr(model, "generation_config", None) is None or model.generation_config.eos_token_id is None:
        model.generation_config = GenerationConfig(eos_token_id=tokenizer.eos_token_id)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    (out / "pard_training.json").write_text(json.dumps(meta, indent=1))


def train_draft(
    draft,
    tokenizer,
    pard_token: int,
    out_dir: str | Path,
    corpus: torch.Tensor | None,
    distilled: torch.Tensor | None,
    steps: int,
    blocks: int = 8,
    seq_len: int = 192,
    batch: int = 8,
    lr: float = 1e-3,
    distill_fraction: float = 0.75,
    seed: int = 0,
    checkpoint_every: int = 100,
    cod: bool = True,
) -> list[float]:
    """PARD-train ``draft``; each batch mixes windows of the distilled continuations and
    of the corpus. Checkpoints and the final draft go to ``out_dir`` (resumable)."""
    from .loop import train

    if corpus is None and distilled is None:
        raise ValueError("give a corpus, distilled sequences, or both")
    if pard_token >= draft.config.vocab_size:  # a fresh PARD id: pad the embedding to hold it
        draft.resize_token_embeddings(pard_token + 1)
    if distilled is not None and distilled.shape[1] < seq_len:
        seq_len = distilled.shape[1]
    out = Path(out_dir)
    meta = {"blocks": blocks, "seq_len": seq_len, "batch": batch, "steps": steps, "lr": lr, "seed": seed,
            "distill_fraction": distill_fraction if distilled is not None and corpus is not None else None,
            "cod": cod, "pard_token": pard_token}

    def sequences(rng: random.Random) -> torch.Tensor:
        rows = []
        for _ in range(batch):
            use_distilled = distilled is not None and (corpus is None or rng.random() < distill_fraction)
            if use_distilled:
                row = distilled[rng.randrange(len(distilled))]
                s = rng.randrange(0, row.shape[0] - seq_len + 1)
                rows.append(row[s : s + seq_len])
            else:
                s = rng.randrange(0, len(corpus) - seq_len)
                rows.append(corpus[s : s + seq_len])
        return torch.stack(rows).long()

    def loss_fn(model, step, rng):
        return pard_loss(model, build_batch(sequences(rng), pard_token, blocks, rng, cod=cod))

    return train(draft, loss_fn, steps, out / "checkpoint", lr=lr, warmup=min(100, steps // 10 + 1),
                 checkpoint_every=checkpoint_every, seed=seed, desc="pard-draft",
                 save_fn=lambda m, _: save_draft(m, tokenizer, out, pard_token, meta))
