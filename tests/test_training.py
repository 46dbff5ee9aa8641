"""PARD draft training: the exact mask layout, conditional drop, equivalence with
inference, loss going down, and the CLI end to end (with resume)."""
from __future__ import annotations

import json
import random
import subprocess
import sys

import pytest
import torch

from pace_core.training.pard import build_batch, build_layout, cod_fraction, select_masks


def test_layout_matches_a_hand_built_mask():
    L, B = 5, 3  # real x0..x4, mask blocks 1 and 2, no drop
    layout = build_layout(L, select_masks(L, B, cod=False))
    assert layout.slots == [(0, 0), (0, 1), (0, 2), (0, 3), (0, 4), (1, 1), (1, 2), (1, 3), (2, 2), (2, 3)]
    allowed = {
        0: [0], 1: [0, 1], 2: [0, 1, 2], 3: [0, 1, 2, 3], 4: [0, 1, 2, 3, 4],
        5: [0, 5],            # (1,1): x0, itself
        6: [0, 1, 6],         # (1,2): x0..x1, itself
        7: [0, 1, 2, 7],      # (1,3): x0..x2, itself
        8: [0, 5, 8],         # (2,2): x0, mask (1,1), itself
        9: [0, 1, 6, 9],      # (2,3): x0..x1, mask (1,2), itself
    }
    expected = torch.zeros(10, 10, dtype=torch.bool)
    for row, cols in allowed.items():
        expected[row, cols] = True
    assert torch.equal(layout.attention, expected)
    assert layout.position_ids.tolist() == [0, 1, 2, 3, 4, 1, 2, 3, 2, 3]
    # every token at position j predicts x_{j+1}; the last real token has no label
    assert layout.label_index.tolist() == [1, 2, 3, 4, -1, 2, 3, 4, 3, 4]


def test_batch_labels_and_inputs():
    seq = torch.tensor([[10, 11, 12, 13, 14]])
    batch = build_batch(seq, pard_token=99, num_blocks=3, cod=False)
    assert batch["input_ids"].tolist() == [[10, 11, 12, 13, 14, 99, 99, 99, 99, 99]]
    assert batch["labels"].tolist() == [[11, 12, 13, 14, -100, 12, 13, 14, 13, 14]]


def test_cod_keeps_chains_and_shrinks_blocks():
    rng = random.Random(0)
    L, B = 200, 8
    kept = select_masks(L, B, rng, cod=True)
    assert len(kept) == B - 1
    for b, js in enumerate(kept, start=1):
        valid = L - 1 - b
        assert len(js) <= round(cod_fraction(b) * valid)
        assert len(js) >= 0.5 * round(cod_fraction(b) * valid)  # the chain constraint may trim a little
        if b > 1:
            previous = set(kept[b - 2])
            assert all(j - 1 in previous for j in js), f"block {b} has a mask whose chain was dropped"
    assert cod_fraction(1) == 0.7 and cod_fraction(4) == pytest.approx(0.7 ** 4) and cod_fraction(5) == 0.2
    layout = build_layout(L, kept)  # builds without a missing chain
    assert layout.attention.sum(dim=1).min() >= 1


def test_training_forward_equals_inference_for_every_mask(tiny_pair):
    """The logits of mask (b, j) in the training pass equal those of mask b at inference
    (x_0..x_{j-b} followed by b PARD tokens at consecutive positions): the mask/label
    alignment is exactly what the decoder uses."""
    from pace_core.lean import masked_forward
    from pace_core.loading import load_causal_lm

    draft = load_causal_lm(tiny_pair[1], "float32")
    pard = draft.config.pard_token
    x = torch.randint(0, 400, (1, 12), generator=torch.Generator().manual_seed(1))
    batch = build_batch(x, pard, num_blocks=4, rng=random.Random(3), cod=True)
    layout_slots = build_layout(12, select_masks(12, 4, random.Random(3), cod=True)).slots
    with torch.no_grad():
        train_logits = masked_forward(draft, batch["input_ids"], batch["position_ids"], batch["attention"])[0]
        for i, (b, j) in enumerate(layout_slots):
            seq = x[0, : j - b + 1].tolist() + [pard] * b
            ref = draft(input_ids=torch.tensor([seq])).logits[0, -1]
            torch.testing.assert_close(train_logits[i], ref, atol=1e-4, rtol=1e-4)


def test_a_few_steps_lower_the_loss(tmp_path, tiny_pair):
    from pace_core.loading import load_tokenizer
    from pace_core.testing import stdlib_texts
    from pace_core.training.draft import new_draft, tokenize_stream, train_draft

    tok = load_tokenizer(tiny_pair[0])
    corpus = tokenize_stream(tok, stdlib_texts()[:2])
    from transformers import AutoConfig

    draft = new_draft(AutoConfig.from_pretrained(tiny_pair[0]), 1, layers=1, hidden=32, heads=2, kv_heads=1,
                      intermediate=64)
    losses = train_draft(draft, tok, 1, tmp_path / "d", corpus, None, steps=40, blocks=4, seq_len=32, batch=4,
                         lr=3e-3, checkpoint_every=1000)
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.5


def test_cli_trains_a_draft_that_the_engine_loads_and_resumes(tmp_path, tiny_pair):
    from pace_core import LLMModel, PardSpecDecodeConfig, SamplingConfig
    from pace_core.testing import stdlib_texts

    data = tmp_path / "corpus.py"
    data.write_text(stdlib_texts()[0])
    out = tmp_path / "draft"
    cmd = [sys.executable, "-m", "pace_core.train_draft", "--target", tiny_pair[0], "--data", str(data),
           "--distill", "8", "--distill-prompt-len", "16", "--distill-new-tokens", "16", "--blocks", "4",
           "--seq-len", "24", "--batch", "2", "--layers", "1", "--hidden", "32", "--intermediate", "64",
           "--checkpoint-every", "3", "--out", str(out)]
    run = subprocess.run(cmd + ["--steps", "3"], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["pard_token"] == 1  # the tokenizer's <|pard|>
    assert (out / "tokenizer.json").is_file() and (out / "distilled.pt").is_file()
    run = subprocess.run(cmd + ["--steps", "5"], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and "resumed from step 3" in run.stdout + run.stderr
    model = LLMModel(tiny_pair[0], dtype="float32",
                     pard_config=PardSpecDecodeConfig(model_name_or_path=str(out), num_speculative_tokens=3))
    assert model.pard_token == 1
    assert len(model.generate("def f():", SamplingConfig(max_new_tokens=8, ignore_eos=True)).token_ids) == 8
