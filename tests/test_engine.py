"""The PARD engine: exactness against transformers' greedy output, acceptance
bookkeeping with test doubles, stopping rules, streaming, chat."""
from __future__ import annotations

import os

import pytest
import torch

from pace_core import Delta, Final, LLMModel, PardSpecDecodeConfig, RequestError, SamplingConfig, Usage
from pace_core.configs import DEFAULT_MAX_NEW_TOKENS
from pace_core import native
from pace_core.stopping import OutputBuilder
from pace_core.testing import hf_of

PROMPTS = [
    "def add(a, b):\n    return",
    "import os\n",
    "class Stack:\n    def __init__(self):\n        self.items = []\n\n    def push(self, item):",
    "x",
]


def hf_greedy(model: LLMModel, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
    out = hf_of(model).generate(torch.tensor([prompt_ids]), do_sample=False, max_new_tokens=max_new_tokens)
    return out[0, len(prompt_ids):].tolist()


def full_forward_greedy(hf_model, ids: list[int], n: int) -> list[int]:
    """Reference greedy continuation with no KV cache at all (one full forward per token)."""
    ids = list(ids)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(hf_model(torch.tensor([ids])).logits[0, -1].argmax()))
    return ids


@pytest.fixture(scope="module")
def pard_models(tiny_pairs):
    """One float32 PARD model per architecture and runner (K is changed per test)."""
    models = {}
    for arch, (t, d) in tiny_pairs.items():
        for runner in ("lean", "transformers"):
            models[arch, runner] = LLMModel(t, dtype="float32", runner=runner,
                                            pard_config=PardSpecDecodeConfig(model_name_or_path=d, num_speculative_tokens=4))
            models.setdefault(arch, models[arch, runner])
    return models


# --------------------------------------------------------------------------- exactness
@pytest.mark.parametrize("runner", ["lean", "transformers"])
@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
@pytest.mark.parametrize("k", [1, 2, 5, 12, 32])
def test_pard_equals_transformers_greedy_fp32(pard_models, arch, k, runner):
    model = pard_models[arch, runner]
    assert type(model.target).__name__ == {"lean": "LeanRunner", "transformers": "CausalLMRunner"}[runner]
    if runner == "lean" and native._compiler() is not None:
        assert model.forward_kind == "lean-native" and model.draft.native  # the C++ layer loop, both models
    model.num_speculative_tokens = k
    assert model.draft.config.vocab_size > model.target.config.vocab_size  # padded draft vocab
    for i, prompt in enumerate(PROMPTS):
        n = [7, 24, 48, 33][i]
        ids = model.encode(prompt)
        out = model.generate(ids, SamplingConfig(max_new_tokens=n))
        assert out.token_ids == hf_greedy(model, ids, n), (arch, k, prompt)
        assert sum(out.stats.tokens_per_step) == len(out.token_ids)


@pytest.mark.parametrize("runner", ["lean", "transformers"])
def test_plain_path_equals_transformers_greedy(tiny_pair, runner):
    target, _ = tiny_pair
    model = LLMModel(target, dtype="float32", runner=runner)
    for prompt in PROMPTS:
        ids = model.encode(prompt)
        out = model.generate(ids, SamplingConfig(max_new_tokens=40))
        assert out.token_ids == hf_greedy(model, ids, 40)
        assert out.stats.tokens_per_step == [1] * len(out.token_ids)
        assert out.stats.draft_time_s == 0


class OracleDraft:
    """Test double for the draft: proposes the target's true future greedy tokens, or
    wrong ones by a policy, and checks that the draft only ever keeps real tokens in
    its cache and that masks are the PARD token."""

    def __init__(self, full_ids: list[int], vocab: int, pard_token: int, wrong=lambda call, i: False):
        self.full, self.vocab, self.pard, self.wrong = full_ids, vocab, pard_token, wrong
        self.vocab_limit = vocab
        self.calls = 0
        self.fed: list[int] = []

    def reset(self):
        self.fed, self.calls = [], 0

    def forward(self, token_ids, num_logits):
        self.fed += token_ids
        masks = self.fed[len(self.fed) - (num_logits - 1):] if num_logits > 1 else []
        real = self.fed[: len(self.fed) - len(masks)]
        assert all(t == self.pard for t in masks)
        assert real == self.full[: len(real)], "the draft must hold exactly the accepted sequence"
        logits = torch.full((num_logits, self.vocab), -1e4)
        for i in range(num_logits):
            true = self.full[len(real) + i] if len(real) + i < len(self.full) else 0
            tok = (true + 1) % self.vocab if self.wrong(self.calls, i) else true
            logits[i, tok] = 0.0
        self.calls += 1
        return logits

    def drop_last(self, n):
        if n:
            del self.fed[-n:]


def with_double(model: LLMModel, prompt_ids, k, n, wrong=lambda call, i: False) -> LLMModel:
    full = full_forward_greedy(hf_of(model), prompt_ids, n + k + 2)
    model.draft = OracleDraft(full, model.target.config.vocab_size, pard_token=1, wrong=wrong)
    model.pard_token, model.num_speculative_tokens = 1, k
    return model


@pytest.fixture
def plain_model(tiny_pair):
    return LLMModel(tiny_pair[0], dtype="float32")


@pytest.mark.parametrize("k", [1, 3, 8])
def test_perfect_draft_yields_k_plus_one_per_step(plain_model, k):
    ids = plain_model.encode(PROMPTS[2])
    n = 5 * (k + 1)
    model = with_double(plain_model, ids, k, n)
    out = model.generate(ids, SamplingConfig(max_new_tokens=n, ignore_eos=True))
    assert out.stats.tokens_per_step == [k + 1] * 5
    assert out.token_ids == full_forward_greedy(hf_of(model), ids, n)[len(ids):]


def test_always_wrong_draft_yields_one_per_step(plain_model):
    ids = plain_model.encode(PROMPTS[0])
    model = with_double(plain_model, ids, 6, 30, wrong=lambda call, i: True)
    out = model.generate(ids, SamplingConfig(max_new_tokens=30, ignore_eos=True))
    assert out.stats.tokens_per_step == [1] * 30
    assert out.stats.mean_accepted_length == 1.0
    assert out.token_ids == full_forward_greedy(hf_of(model), ids, 30)[len(ids):]


def test_partially_right_draft_keeps_exact_output(plain_model):
    """Rejections at varying depths exercise the target cache trim and the draft's re-reading."""
    ids = plain_model.encode(PROMPTS[1])
    model = with_double(plain_model, ids, 5, 60, wrong=lambda call, i: i == call % 6)
    out = model.generate(ids, SamplingConfig(max_new_tokens=60, ignore_eos=True))
    assert out.token_ids == full_forward_greedy(hf_of(model), ids, 60)[len(ids):]
    # step c accepts exactly c % 6 proposals (the first wrong one is at index c % 6), plus one correction
    expected = [min(c % 6, 5) + 1 for c in range(out.stats.steps)]
    assert out.stats.tokens_per_step[:-1] == expected[:-1]
    assert sum(out.stats.tokens_per_step) == 60


def test_bfloat16_mismatches_are_near_ties(tiny_pairs):
    """bf16 batched verification may flip near-ties. Every emitted token must be within
    TOL of the max logit of a teacher-forced bf16 full forward; the match rate against
    transformers' bf16 greedy is reported."""
    TOL = 0.1
    matched = total = 0
    for arch, (t, d) in tiny_pairs.items():
        model = LLMModel(t, dtype="bfloat16", pard_config=PardSpecDecodeConfig(model_name_or_path=d, num_speculative_tokens=5))
        for prompt in PROMPTS:
            ids = model.encode(prompt)
            out = model.generate(ids, SamplingConfig(max_new_tokens=32, ignore_eos=True))
            ref = hf_of(model).generate(torch.tensor([ids]), do_sample=False, max_new_tokens=32,
                                              eos_token_id=None, pad_token_id=0)[0, len(ids):].tolist()
            matched += sum(a == b for a, b in zip(out.token_ids, ref))
            total += len(ref)
            with torch.no_grad():
                logits = hf_of(model)(torch.tensor([ids + out.token_ids])).logits[0].float()
            for pos, tok in enumerate(out.token_ids):
                row = logits[len(ids) + pos - 1]
                assert row.max() - row[tok] <= TOL, (arch, prompt, pos)
    print(f"bf16 PARD vs transformers bf16 greedy: {matched}/{total} tokens match ({matched / total:.1%})")


def test_bfloat16_pard_equals_bfloat16_greedy(tiny_pairs):
    """With the native kernels a bf16 verify is bit-identical to bf16 decode steps (the
    few-rows linear and attention compute each row alone), so PARD in bf16 emits exactly
    the engine's own bf16 greedy tokens, for every architecture; also for prompts whose
    first verify passes one forward's 64 rows (60 + 8 tokens) and longer ones (prompts
    run in chunks of 64 rows, every row computed alone)."""
    if not native.load():
        pytest.skip(f"native kernels unavailable: {native.unavailable_reason()}")
    sampling = SamplingConfig(max_new_tokens=32, ignore_eos=True)
    for arch, (t, d) in tiny_pairs.items():
        plain = LLMModel(t, dtype="bfloat16", prefix_cache_gb=0)
        pard = LLMModel(t, dtype="bfloat16", prefix_cache_gb=0,
                        pard_config=PardSpecDecodeConfig(model_name_or_path=d, num_speculative_tokens=8))
        assert plain.target.native
        long_prompts = [[(31 * i + n) % 400 + 3 for i in range(n)] for n in (57, 60, 64, 100, 200)]
        for prompt in PROMPTS + long_prompts:
            assert pard.generate(prompt, sampling).token_ids == plain.generate(prompt, sampling).token_ids, (arch, prompt)


# --------------------------------------------------------------------------- stopping
def test_eos_inside_an_accepted_chunk_ends_there(plain_model):
    ids = plain_model.encode(PROMPTS[2])
    full = full_forward_greedy(hf_of(plain_model), ids, 40)[len(ids):]
    eos_pos = 10
    model = with_double(plain_model, ids, 8, 40)
    model.stop_token_ids = {full[eos_pos]}
    first = full.index(full[eos_pos])  # the first occurrence is where it must stop
    out = model.generate(ids, SamplingConfig(max_new_tokens=40))
    assert out.token_ids == full[: first + 1]
    assert out.finish_reason == "stop"
    ignored = model.generate(ids, SamplingConfig(max_new_tokens=40, ignore_eos=True))
    assert ignored.token_ids == full and ignored.finish_reason == "length"


@pytest.mark.parametrize("n", [1, 5, 13, 18])
def test_max_new_tokens_never_overshoots(plain_model, n):
    ids = plain_model.encode(PROMPTS[0])
    model = with_double(plain_model, ids, 8, 20)
    out = model.generate(ids, SamplingConfig(max_new_tokens=n, ignore_eos=True))
    assert len(out.token_ids) == n and out.finish_reason == "length"
    assert model.target.seq_len <= len(ids) + n  # never verified past the budget


def _text_of(model, ids):
    return model.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)


@pytest.mark.parametrize("k", [1, 4, 8])
def test_stop_string_inside_and_across_chunks(plain_model, k):
    ids = plain_model.encode(PROMPTS[2])
    n = 48
    model = with_double(plain_model, ids, k, n)
    ref = model.generate(ids, SamplingConfig(max_new_tokens=n, ignore_eos=True))
    text = ref.text
    assert len(text) > 20
    for start in (3, len(text) // 2, len(text) - 6):
        stop = text[start:start + 5]
        cut = text.find(stop)  # OpenAI semantics: text ends right before the first occurrence
        out = model.generate(ids, SamplingConfig(max_new_tokens=n, ignore_eos=True, stop=[stop, "\x00never"]))
        assert out.text == text[:cut], (k, stop)
        assert out.finish_reason == "stop"
        # the tokens kept are those up to the one that completes the stop string
        assert stop in _text_of(model, out.token_ids) and stop not in _text_of(model, out.token_ids[:-1])
        *deltas, final = model.stream(ids, SamplingConfig(max_new_tokens=n, ignore_eos=True, stop=[stop]))
        assert "".join(d.text for d in deltas) == out.text and final.finish_reason == "stop"
        assert all(stop not in d.text for d in deltas)


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_stream_concatenation_equals_generate(pard_models, arch):
    model = pard_models[arch]
    model.num_speculative_tokens = 3
    for prompt in PROMPTS:
        sc = SamplingConfig(max_new_tokens=40)
        out = model.generate(prompt, sc)
        *deltas, final = model.stream(prompt, sc)  # Deltas, then one Final
        assert all(isinstance(d, Delta) for d in deltas) and isinstance(final, Final)
        assert "".join(d.text for d in deltas) == out.text
        assert [t for d in deltas for t in d.token_ids] == out.token_ids
        assert final.finish_reason == out.finish_reason and final.stats.steps == out.stats.steps
        assert final.usage == Usage(len(out.prompt_token_ids), len(out.token_ids), final.stats.num_cached_tokens)
        assert final.engine["engine_pid"] == os.getpid() and final.engine["requests_served"] >= 1


def test_closing_the_stream_stops_generation(plain_model):
    stream = plain_model.stream(PROMPTS[0], SamplingConfig(max_new_tokens=200, ignore_eos=True))
    next(stream)
    stream.close()
    # the lock is released: the next request runs at once
    assert len(plain_model.generate(PROMPTS[0], SamplingConfig(max_new_tokens=3, ignore_eos=True)).token_ids) == 3


def test_utf8_deltas_never_split_a_character(plain_model):
    tok = plain_model.tokenizer
    text = "héllo wörld 世界 🙂 done"
    ids = tok.encode(text, add_special_tokens=False)
    assert len(ids) > len(text.split())  # multi-byte characters span several tokens
    out = OutputBuilder(tok, max_new_tokens=1000)
    deltas = [out.add([t]).text for t in ids]
    assert "".join(deltas) == text
    assert not any("\ufffd" in d for d in deltas)


def test_return_text_false(plain_model):
    out = plain_model.generate(PROMPTS[0], SamplingConfig(max_new_tokens=5, return_text=False))
    assert out.text is None and len(out.token_ids) == 5


def test_stop_tokens_come_from_generation_config_and_tokenizer(tmp_path):
    from pace_core.testing import build_model, build_tokenizer

    tok = build_tokenizer(tmp_path / "tok")
    build_model(tmp_path / "m", "qwen2", vocab_size=len(tok), tokenizer=tok, eos_token_id=[5, 6])
    model = LLMModel(str(tmp_path / "m"), dtype="float32")
    assert model.stop_token_ids == {5, 6, tok.eos_token_id}


def test_chat_applies_the_template(plain_model):
    messages = [{"role": "user", "content": "write a loop"}]
    ids = plain_model.apply_chat_template(messages)
    assert plain_model.tokenizer.decode(ids).endswith("<|im_start|>assistant\n")
    sc = SamplingConfig(max_new_tokens=12)
    assert plain_model.chat(messages, sc).token_ids == plain_model.generate(ids, sc).token_ids
    *deltas, _ = plain_model.chat(messages, sc, stream=True)
    assert "".join(d.text for d in deltas) == plain_model.chat(messages, sc).text


def test_plain_sampling_is_seeded_and_not_ignored(plain_model):
    sc = SamplingConfig(max_new_tokens=30, temperature=1.5, seed=3, ignore_eos=True)
    a, b = plain_model.generate(PROMPTS[1], sc), plain_model.generate(PROMPTS[1], sc)
    greedy = plain_model.generate(PROMPTS[1], SamplingConfig(max_new_tokens=30, ignore_eos=True))
    assert a.token_ids == b.token_ids
    assert a.token_ids != greedy.token_ids


def test_generate_batch_of_prompts(plain_model):
    outs = plain_model.generate(PROMPTS[:2], SamplingConfig(max_new_tokens=4))
    assert [o.token_ids for o in outs] == [plain_model.generate(p, SamplingConfig(max_new_tokens=4)).token_ids
                                           for p in PROMPTS[:2]]


def test_stats_are_consistent(pard_models):
    model = pard_models["qwen2"]
    model.num_speculative_tokens = 4
    out = model.generate(PROMPTS[2], SamplingConfig(max_new_tokens=20, ignore_eos=True))
    s = out.stats
    assert s.steps == len(s.tokens_per_step) and s.num_tokens == 20
    assert all(1 <= a <= 5 for a in s.tokens_per_step)
    assert s.draft_time_s > 0 and s.target_time_s > 0
    assert 0 < s.time_to_first_token_s <= s.total_time_s
    assert s.to_dict()["mean_accepted_length"] == pytest.approx(20 / s.steps)


# --------------------------------------------------------------------------- adaptive K
def test_next_k_rule():
    from pace_core.decoder import next_k

    assert next_k(8, 8, 8) == 8  # all kept: stay at the cap
    assert next_k(8, 2, 2) == 4  # all kept: double
    assert next_k(8, 3, 3) == 6
    assert next_k(8, 8, 0) == 2  # none kept: two more than kept
    assert next_k(8, 8, 3) == 5
    assert next_k(1, 1, 0) == 1  # never above the cap
    assert next_k(8, 0, 0) == 1  # never below one


def test_adaptive_k_follows_acceptance(plain_model):
    """With a test double draft: K drops after rejections, doubles back after full
    acceptance, never exceeds the cap, and the output is still the target's greedy."""
    from pace_core.decoder import decode

    ids = plain_model.encode(PROMPTS[2])
    n = 40
    # wrong at the 2nd proposal of the first call, then always right
    model = with_double(plain_model, ids, 8, n, wrong=lambda call, i: call == 0 and i == 1)
    steps = list(decode(model.target, ids, n, model.draft, 8, 1, adaptive=True))
    proposed = [s.num_proposed for s in steps]
    assert proposed[:4] == [8, 3, 6, 8]  # kept 1 -> 1+2; kept all 3 -> 6; kept all 6 -> 8 (cap)
    assert max(proposed) == 8
    assert [t for s in steps for t in s.tokens] == full_forward_greedy(hf_of(model), ids, n)[len(ids):]

    model = with_double(plain_model, ids, 6, 20, wrong=lambda call, i: True)
    proposed = [s.num_proposed for s in decode(model.target, ids, 20, model.draft, 6, 1, adaptive=True)]
    assert proposed[0] == 6 and set(proposed[1:-2]) == {2}  # the last two are cut by max_new_tokens

    # K = 0 with the adaptive schedule is plain decoding: nothing is ever proposed
    assert {s.num_proposed for s in decode(model.target, ids, 10, model.draft, 0, 1, adaptive=True)} == {0}


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
def test_adaptive_and_fixed_schedules_give_the_same_tokens(pard_models, arch):
    model = pard_models[arch, "lean"]
    model.num_speculative_tokens = 12
    for prompt in PROMPTS:
        ids = model.encode(prompt)
        outs = {}
        for schedule in ("adaptive", "fixed"):
            model.speculation_schedule = schedule
            outs[schedule] = model.generate(ids, SamplingConfig(max_new_tokens=40))
        assert outs["adaptive"].token_ids == outs["fixed"].token_ids == hf_greedy(model, ids, 40)
    model.speculation_schedule = "adaptive"


def _save(model, tok, path):
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


def test_padding_ids_past_the_tokenizer_are_never_emitted(tmp_path):
    """A target whose embedding is padded past the tokenizer (Qwen: 152064 rows for
    151665 tokens) whose padding rows win every argmax: the engine emits only real ids
    (transformers' suppress_tokens for the padding), with and without a draft."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from pace_core.testing import build_tokenizer

    tok = build_tokenizer(tmp_path / "tok")
    n_real, pad = len(tok), 64
    models = {}
    for name, layers, seed in (("target", 2, 0), ("draft", 1, 1)):
        cfg = AutoConfig.for_model("qwen2", vocab_size=n_real + pad, hidden_size=64, num_hidden_layers=layers,
                                   num_attention_heads=4, num_key_value_heads=2, intermediate_size=128,
                                   tie_word_embeddings=False, eos_token_id=tok.eos_token_id)
        if name == "draft":
            cfg.pard_token = tok.convert_tokens_to_ids("<|pard|>")
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(cfg)
        with torch.no_grad():
            model.lm_head.weight[n_real:] = model.lm_head.weight[:n_real].abs().mean() * 50  # padding always wins
        models[name] = _save(model, tok, tmp_path / name)
    plain = LLMModel(models["target"], dtype="float32")
    pard = LLMModel(models["target"], dtype="float32",
                    pard_config=PardSpecDecodeConfig(model_name_or_path=models["draft"], num_speculative_tokens=4))
    ids = plain.encode("def f(x):")
    hf = hf_of(plain).generate(torch.tensor([ids]), do_sample=False, max_new_tokens=24,
                                     suppress_tokens=list(range(n_real, n_real + pad)))[0, len(ids):].tolist()
    for model in (plain, pard):
        out = model.generate(ids, SamplingConfig(max_new_tokens=24))
        assert max(out.token_ids) < n_real
        assert out.token_ids == hf


def test_sliding_window_model_with_pard_matches_full_forward_greedy(tmp_path):
    """Mistral-style sliding-window attention runs through transformers' forward; its
    cache keeps what a rejected proposal's crop needs, past the window too."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from pace_core.testing import build_tokenizer

    tok = build_tokenizer(tmp_path / "tok")
    paths = {}
    for name, layers, seed in (("target", 2, 0), ("draft", 1, 1)):
        cfg = AutoConfig.for_model("mistral", vocab_size=len(tok), hidden_size=64, num_hidden_layers=layers,
                                   num_attention_heads=4, num_key_value_heads=2, intermediate_size=128,
                                   sliding_window=8, eos_token_id=tok.eos_token_id)
        if name == "draft":
            cfg.pard_token = tok.convert_tokens_to_ids("<|pard|>")
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(cfg)
        with torch.no_grad():
            for p in model.parameters():
                if p.dim() > 1:
                    p.normal_(0.0, 0.08)
        paths[name] = _save(model, tok, tmp_path / name)
    model = LLMModel(paths["target"], dtype="float32",
                     pard_config=PardSpecDecodeConfig(model_name_or_path=paths["draft"], num_speculative_tokens=4))
    assert type(model.target).__name__ == "CausalLMRunner"  # the lean runner leaves sliding windows to transformers
    ids = model.encode("class Stack:\n    def push(self, item):")
    out = model.generate(ids, SamplingConfig(max_new_tokens=30, ignore_eos=True))
    assert out.token_ids == full_forward_greedy(hf_of(model), ids, 30)[len(ids):]


def test_reduced_draft_vocabulary_keeps_the_output(tiny_pairs):
    """draft_vocab_size: the draft proposes among the first N ids only (its lm_head reads
    N rows); the target still verifies every token, so the output is unchanged."""
    target, draft = tiny_pairs["qwen2"]
    model = LLMModel(target, dtype="float32",
                     pard_config=PardSpecDecodeConfig(model_name_or_path=draft, num_speculative_tokens=4,
                                                      draft_vocab_size=100))
    assert model.draft.vocab_limit == 100
    if hasattr(model.draft, "lm_head_weight"):
        assert model.draft.lm_head_weight.shape[0] == 100
    ids = model.encode(PROMPTS[0])
    out = model.generate(ids, SamplingConfig(max_new_tokens=30))
    assert out.token_ids == hf_greedy(model, ids, 30)[: len(out.token_ids)]
    with pytest.raises(ValueError, match="draft_vocab_size"):
        PardSpecDecodeConfig(model_name_or_path=draft, draft_vocab_size=1)
    # the app argument's model.pard_config.draft_vocab_size reaches the replica's engine
    from deployments.args import AppArgs

    args = AppArgs(model={"model_name_or_path": target, "pard_config": {"model_name_or_path": draft,
                                                                          "draft_vocab_size": 100}})
    assert LLMModel.from_config(args.model).draft.vocab_limit == 100


def test_request_errors_raise_before_any_stream_opens(plain_model):
    """prepare() checks everything a request can get wrong; stream() and chat(stream=True)
    raise at the call, not at the first next()."""
    from pace_core import RequestError

    with pytest.raises(RequestError, match="empty"):
        plain_model.stream("")
    with pytest.raises(RequestError, match="context length"):
        plain_model.stream("x", SamplingConfig(max_new_tokens=10 ** 6))
    with pytest.raises(ValueError, match="temperature"):
        plain_model.prepare("x", {"temperature": -1})
    request = plain_model.prepare("def f(x):", {"max_new_tokens": 8, "ignore_eos": True})
    assert request.prompt_ids == plain_model.encode("def f(x):") and request.sampling.max_new_tokens == 8
    assert plain_model.collect(request).token_ids == plain_model.generate("def f(x):", request.sampling).token_ids
    # no length given: DEFAULT_MAX_NEW_TOKENS, lowered to the room the context leaves
    assert plain_model.prepare("def f(x):").sampling.max_new_tokens == DEFAULT_MAX_NEW_TOKENS
    long = [5] * (plain_model.max_context - 10)
    assert plain_model.prepare(long).sampling.max_new_tokens == 10
    with pytest.raises(RequestError, match="leaves no room for an answer"):
        plain_model.prepare([5] * plain_model.max_context)
    with pytest.raises(RequestError, match=r"min_new_tokens \(20\) must be <= max_new_tokens \(10"):
        plain_model.prepare(long, {"min_new_tokens": 20})


def test_one_generation_at_a_time_and_a_closed_stream_frees_the_model(plain_model):
    stream = plain_model.stream(PROMPTS[0], SamplingConfig(max_new_tokens=50, ignore_eos=True))
    next(stream)
    with pytest.raises(RuntimeError, match="one generation at a time"):
        plain_model.generate(PROMPTS[1], SamplingConfig(max_new_tokens=4))
    stream.close()
    assert len(plain_model.generate(PROMPTS[1], SamplingConfig(max_new_tokens=4, ignore_eos=True)).token_ids) == 4
