"""The lean Llama-family runner matches transformers' forward; other architectures
fall back to transformers' own forward with the same interface."""
from __future__ import annotations

import pytest
import torch

from pace_core import LLMModel, SamplingConfig
from pace_core.lean import LeanRunner
from pace_core.runner import CausalLMRunner, make_runner


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
def test_lean_logits_match_transformers(tiny_pairs, arch):
    model = LLMModel(tiny_pairs[arch][0], dtype="float32", runner="transformers").target.model
    hf, lean = CausalLMRunner(model), LeanRunner(model, initial_capacity=16)  # forces the cache to grow
    hf.reset(), lean.reset()
    ids = torch.randint(0, 400, (120,), generator=torch.Generator().manual_seed(0)).tolist()
    for chunk, keep, crop in ((ids[:50], 3, 0), (ids[50:59], 9, 4), (ids[59:60], 1, 0), (ids[60:90], 30, 7)):
        a, b = hf.forward(chunk, keep), lean.forward(chunk, keep)
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
        hf.crop(crop), lean.crop(crop)
        assert hf.seq_len == lean.seq_len == hf.cache.get_seq_length()


def test_other_architectures_use_transformers_forward(tmp_path):
    from transformers import AutoModelForCausalLM, GPT2Config

    from pace_core.testing import build_tokenizer

    tok = build_tokenizer(tmp_path)
    config = GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=2, n_head=2, n_positions=256,
                        eos_token_id=tok.eos_token_id, bos_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path)
    model = LLMModel(str(tmp_path), dtype="float32")
    assert isinstance(model.target, CausalLMRunner)
    ids = model.encode("def f():")
    out = model.generate(ids, SamplingConfig(max_new_tokens=20))
    ref = model.target.model.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=20)[0, len(ids):].tolist()
    assert out.token_ids == ref
    with pytest.raises(ValueError, match="runner='lean' does not support model_type 'gpt2'"):
        make_runner(model.target.model, "lean")
