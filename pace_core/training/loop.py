"""A small, resumable training loop: AdamW, warm-up + cosine schedule, gradient
clipping, a progress bar, periodic checkpoints (model + optimizer + step + RNG), and a
CSV loss log. Used for both the demo target (plain LM) and PARD drafts."""
from __future__ import annotations

import math
import random
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

CKPT = "trainer_state.pt"


def lr_at(step: int, steps: int, lr: float, warmup: int, min_ratio: float = 0.1) -> float:
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return lr * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1), ignore_index=-100)


def train(
    model,
    loss_fn: Callable[[object, int, random.Random], torch.Tensor],
    steps: int,
    out_dir: str | Path,
    lr: float = 1e-3,
    warmup: int = 50,
    weight_decay: float = 0.01,
    checkpoint_every: int = 100,
    seed: int = 0,
    desc: str = "train",
    save_fn: Callable[[object, Path], None] | None = None,
    log_every: int = 10,
) -> list[float]:
    """Run ``steps`` optimizer steps of ``loss_fn(model, step, rng)``; resume from
    ``out_dir/trainer_state.pt`` when present. ``save_fn(model, out_dir)`` writes the
    model at each checkpoint and at the end. Returns the losses of this run."""
    from tqdm import tqdm

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=weight_decay,
                            betas=(0.9, 0.95))
    start, rng = 0, random.Random(seed)
    torch.manual_seed(seed)
    state_path = out / CKPT
    if state_path.is_file():
        state = torch.load(state_path, weights_only=False)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        start = state["step"]
        rng.setstate(state["rng"])
        torch.set_rng_state(state["torch_rng"])
        print(f"{desc}: resumed from step {start}", flush=True)

    def checkpoint(step: int) -> None:
        torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "step": step,
                    "rng": rng.getstate(), "torch_rng": torch.get_rng_state()}, state_path)
        if save_fn is not None:
            save_fn(model, out)

    model.train()
    losses: list[float] = []
    log = open(out / "loss.csv", "a")
    bar = tqdm(range(start, steps), desc=desc, initial=start, total=steps, mininterval=5, dynamic_ncols=True)
    t0 = time.time()
    for step in bar:
        for g in opt.param_groups:
            g["lr"] = lr_at(step, steps, lr, warmup)
        loss = loss_fn(model, step, rng)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
        if step % log_every == 0 or step == steps - 1:
            recent = sum(losses[-log_every:]) / len(losses[-log_every:])
            bar.set_postfix(loss=f"{recent:.3f}")
            log.write(f"{step},{recent:.5f},{time.time() - t0:.1f}\n")
            log.flush()
        if (step + 1) % checkpoint_every == 0 and step + 1 < steps:
            checkpoint(step + 1)
    checkpoint(steps)
    model.eval()
    return losses
