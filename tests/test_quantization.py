"""int8 / int4 weights (LLMModel(quantization=...), PardSpecDecodeConfig(quantization=...)):
PARD emits exactly the quantized target's own greedy output, the prefix cache changes
nothing, the memory shrinks, and every quantization a user can ask for wrongly is a clear
error before any work."""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from pydantic import ValidationError

from pace_core import LLMModel, PardSpecDecodeConfig, SamplingConfig
from pace_core import native
from pace_core.loading import ModelLoadError

PROMPTS = ["def add(a, b):\n    return", "import os\n", "class Stack:\n    def __init__(self):\n", "x"]
GREEDY = SamplingConfig(max_new_tokens=40, ignore_eos=True)


@pytest.fixture(autouse=True)
def _kernels():
    if not native.load():
        pytest.skip(f"native kernels unavailable: {native.unavailable_reason()}")


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
@pytest.mark.parametrize("target_q,draft_q", [("int8", "int4"), ("int4", "int4"), ("int8", None)])
def test_pard_equals_the_quantized_targets_own_greedy(tiny_pairs, arch, target_q, draft_q):
    """A verify computes every row as a decode step does, in int8 and int4 as in float:
    PARD (adaptive and fixed K, a 4-bit draft) emits the quantized target's greedy tokens."""
    target, draft = tiny_pairs[arch]
    plain = LLMModel(target, dtype="bfloat16", quantization=target_q, prefix_cache_gb=0)
    assert plain.weight_format == target_q and plain.forward_kind == "lean-native"
    for schedule, k in (("adaptive", 8), ("fixed", 5)):
        pard = LLMModel(target, dtype="bfloat16", quantization=target_q, prefix_cache_gb=0,
                        pard_config=PardSpecDecodeConfig(model_name_or_path=draft, num_speculative_tokens=k,
                                                         speculation_schedule=schedule, quantization=draft_q))
        assert pard.draft.weight_format == (draft_q or "bfloat16")
        for prompt in PROMPTS:
            assert pard.generate(prompt, GREEDY).token_ids == plain.generate(prompt, GREEDY).token_ids, (schedule, prompt)


def test_quantized_prefix_cache_changes_nothing(tiny_pair):
    """With int8 weights the cached prefix's KV is what a fresh prefill computes: a chat's
    later turns come out the same with the cache on and off."""
    target, draft = tiny_pair
    pard = PardSpecDecodeConfig(model_name_or_path=draft, num_speculative_tokens=4, quantization="int4")
    cached, fresh = (LLMModel(target, dtype="bfloat16", quantization="int8", pard_config=pard, prefix_cache_gb=gb)
                     for gb in (0.25, 0))
    ids = cached.encode(PROMPTS[2] * 6)
    for extra in ("\n    def push(self, item):\n", "\n    def pop(self):\n"):
        a, b = cached.generate(ids, GREEDY), fresh.generate(ids, GREEDY)
        assert a.token_ids == b.token_ids
        ids = ids + a.token_ids + cached.encode(extra)
    assert cached.generate(ids, GREEDY).stats.num_cached_tokens > 0


def test_quantized_weights_take_their_bits(tiny_pair):
    """The bytes a forward streams: int8 about half of bfloat16, int4 (its output
    projection in int8) less again; the logits stay close to the float model's."""
    target, _ = tiny_pair
    sizes, logits = {}, {}
    ids = list(range(3, 40))
    for q in (None, "int8", "int4"):
        model = LLMModel(target, dtype="bfloat16", quantization=q, prefix_cache_gb=0)
        sizes[q] = model.target.weight_bytes()
        model.target.reset()
        logits[q] = model.target.forward(ids, len(ids))
    assert sizes["int4"] < sizes["int8"] < 0.6 * sizes[None]
    for q in ("int8", "int4"):
        agree = (logits[q].argmax(-1) == logits[None].argmax(-1)).float().mean().item()
        assert agree > {"int8": 0.9, "int4": 0.6}[q], (q, agree)


def test_bad_quantization_values_name_the_allowed_ones(tiny_pair):
    target, draft = tiny_pair
    with pytest.raises(ValidationError, match="'int8' or 'int4'"):
        LLMModel(target, quantization="int3")
    with pytest.raises(ValidationError, match="'int8' or 'int4'"):
        PardSpecDecodeConfig(model_name_or_path=draft, quantization="fp8")
    from deployments.args import AppArgs

    assert AppArgs(**{"model.quantization": "int8"}).model.quantization == "int8"
    with pytest.raises(ValidationError, match="'int8' or 'int4'"):
        AppArgs(**{"model.quantization": "nf4"})


def test_quantization_needs_the_lean_runner(tiny_pair, tmp_path):
    """runner='transformers', or an architecture outside the Llama family, cannot take
    quantized weights: a load error saying why, before the engine serves anything."""
    target, _ = tiny_pair
    with pytest.raises(ModelLoadError, match="quantization='int8' needs the lean runner.*runner='transformers'"):
        LLMModel(target, runner="transformers", quantization="int8")
    from transformers import AutoModelForCausalLM, GPT2Config

    from pace_core.testing import build_tokenizer

    tok = build_tokenizer(tmp_path)
    AutoModelForCausalLM.from_config(GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=1, n_head=2)).save_pretrained(
        tmp_path)
    with pytest.raises(ModelLoadError, match="model_type 'gpt2' runs through transformers' own forward"):
        LLMModel(str(tmp_path), quantization="int4")


def test_an_already_quantized_checkpoint_is_refused_clearly(tiny_pair, tmp_path):
    """A GPTQ / AWQ checkpoint (a quantization_config in its config.json) is named as such,
    with what this engine reads instead."""
    target, _ = tiny_pair
    copy = tmp_path / "gptq"
    shutil.copytree(target, copy)
    config = json.loads((copy / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "gptq", "bits": 4, "group_size": 128}
    (copy / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match="already quantized \\(quant_method 'gptq'\\).*quantization='int8' or 'int4'"):
        LLMModel(str(copy))


def test_a_second_runner_on_released_weights_is_a_clear_error(tiny_pair):
    """LLMModel packs the models it loads and drops their float weights: reusing such a
    model for another runner says so instead of failing in the kernels."""
    from pace_core.lean import LeanRunner
    from pace_core.loading import load_causal_lm

    model = load_causal_lm(tiny_pair[0], "float32")
    LeanRunner(model, release_weights=True)
    with pytest.raises(ValueError, match="weights were released"):
        LeanRunner(model)
    assert torch.equal(*(LeanRunner(load_causal_lm(tiny_pair[0], "float32")).forward([5, 6], 2) for _ in range(2)))
