"""PARD draft training (arXiv 2504.18583): one forward pass over a real sequence
followed by mask blocks teaches the draft to predict K tokens at once.

For a real sequence x_0..x_{L-1}:
  * real token j (position j) attends to x_0..x_j and predicts x_{j+1};
  * mask (b, j), block b = 1..B-1, has position id j, attends to the real tokens
    x_0..x_{j-b}, to the masks (b-1, j-1), (b-2, j-2), ..., (1, j-b+1) and to itself,
    and predicts x_{j+1}. It sees only real tokens up to j-b, exactly like mask b at
    inference (the last real token predicts t+1, mask m predicts t+m+1).
Conditional drop (COD) keeps a random subset of each block, a fraction
max(0.7^b, 0.2) of it, drawn only among masks whose predecessor (b-1, j-1) is kept,
so every kept mask's chain survives. Plain cross entropy on every labelled token.
"""
from __future__ import annotations

import random
from dataclasses import dataclass

import torch

IGNORE = -100


def cod_fraction(block: int, base: float = 0.7, floor: float = 0.2) -> float:
    return max(base ** block, floor)


def select_masks(seq_len: int, num_blocks: int, rng: random.Random | None = None, cod: bool = True) -> list[list[int]]:
    """Positions j kept in each mask block b = 1..num_blocks-1 (index b-1 of the result).
    Block b can hold positions b..seq_len-2 (a real token x_{j-b} to look back to and a
    label x_{j+1}). Without COD every valid position is kept."""
    kept: list[list[int]] = []
    for b in range(1, num_blocks):
        valid = list(range(b, seq_len - 1))
        if not valid:
            break
        if not cod or rng is None:
            kept.append(valid)
            continue
        if b == 1:
            candidates = valid
        else:
            previous = set(kept[-1])
            candidates = [j for j in valid if j - 1 in previous]  # the chain must survive
        want = max(1, round(cod_fraction(b) * len(valid)))
        chosen = sorted(rng.sample(candidates, min(want, len(candidates)))) if candidates else []
        if not chosen:
            break
        kept.append(chosen)
    return kept


@dataclass
class PardLayout:
    """Where every token of the training sequence sits: ``slots[i] = (block, j)`` with
    block 0 for real tokens."""

    slots: list[tuple[int, int]]
    attention: torch.Tensor  # (T, T) bool, True = may attend
    position_ids: torch.Tensor  # (T,)
    label_index: torch.Tensor  # (T,) index j+1 into the real sequence, or -1 (no label)


def build_layout(seq_len: int, kept: list[list[int]]) -> PardLayout:
    slots = [(0, j) for j in range(seq_len)] + [(b + 1, j) for b, js in enumerate(kept) for j in js]
    index = {s: i for i, s in enumerate(slots)}
    T = len(slots)
    attention = torch.zeros(T, T, dtype=torch.bool)
    for i, (b, j) in enumerate(slots):
        last_real = j - b  # real tokens x_0..x_{j-b}
        attention[i, : last_real + 1] = True
        for step in range(1, b + 1):  # itself (step=b... down) and its chain of masks
            chain = (b - step + 1, j - step + 1)
            if chain[0] >= 1:
                attention[i, index[chain]] = True
    position_ids = torch.tensor([j for _, j in slots])
    label_index = torch.tensor([j + 1 if j + 1 < seq_len else -1 for _, j in slots])
    return PardLayout(slots, attention, position_ids, label_index)


def build_batch(sequences: torch.Tensor, pard_token: int, num_blocks: int, rng: random.Random | None = None,
                cod: bool = True) -> dict[str, torch.Tensor]:
    """(B, L) real sequences -> input_ids, position_ids, attention (B, T, T), labels,
    sharing one COD draw across the batch."""
    B, L = sequences.shape
    layout = build_layout(L, select_masks(L, num_blocks, rng, cod))
    n_real = L
    n_mask = len(layout.slots) - n_real
    input_ids = torch.cat([sequences, torch.full((B, n_mask), pard_token, dtype=sequences.dtype)], dim=1)
    has_label = layout.label_index >= 0
    labels = torch.full((B, len(layout.slots)), IGNORE, dtype=torch.long)
    labels[:, has_label] = sequences[:, layout.label_index[has_label]].long()
    return {
        "input_ids": input_ids.long(),
        "position_ids": layout.position_ids.unsqueeze(0).expand(B, -1),
        "attention": layout.attention.unsqueeze(0).expand(B, -1, -1),
        "labels": labels,
    }


def pard_loss(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    from ..lean import masked_forward
    from .loop import cross_entropy

    logits = masked_forward(model, batch["input_ids"], batch["position_ids"], batch["attention"])
    return cross_entropy(logits, batch["labels"])
