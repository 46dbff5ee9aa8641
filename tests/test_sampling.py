"""Sampling: speculative sampling exact in distribution (a goodness-of-fit test, shown to
fail on a planted bug), the logits processors against transformers', greedy with
penalties equal to transformers' generate(), seeds, logprobs against a teacher-forced
forward, the model's generation_config defaults, and AMD PACE's SamplingConfig names."""
from __future__ import annotations

import collections
import json
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError
from transformers import GenerationConfig
from transformers.generation import logits_process as hf

from pace_core import LLMModel, PardSpecDecodeConfig, SamplingConfig, sampling
from pace_core.decoder import decode
from pace_core.loading import sampling_defaults
from pace_core.runner import make_runner
from pace_core.testing import hf_of

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def one_thread():
    """Tiny models run fastest, and reproducibly, on one thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# --------------------------------------------------------------------------- exact in distribution
V = 24  # a tiny vocabulary: the exact distribution of the first tokens can be enumerated
PROMPT = [3, 7, 11, 5]
PARD_TOKEN = V - 1
SETTINGS = dict(temperature=1.0, top_k=16, repetition_penalty=1.3, presence_penalty=0.4, frequency_penalty=0.3)
P_MIN = 1e-3  # goodness-of-fit threshold: below it, the samples are not from the target's distribution


@pytest.fixture(scope="module")
def tiny_vocab_models(tmp_path_factory):
    """A random 24-id Llama target with sharp distributions, and a PARD draft made of
    the target's weights plus noise: it keeps one or both proposals often, not always,
    so every branch of the acceptance rule runs."""
    from pace_core.testing import build_model

    root = tmp_path_factory.mktemp("tiny-vocab")
    kwargs = dict(vocab_size=V, hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=1, intermediate_size=64,
                  eos_token_id=0)
    target = build_model(root / "target", "llama", seed=1, **kwargs)
    draft = build_model(root / "draft", "llama", seed=1, pard_token=PARD_TOKEN, **kwargs)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for t, d in zip(target.parameters(), draft.parameters()):
            if t.dim() > 1:
                t.normal_(0, 0.5, generator=g)
            d.copy_(t + 0.1 * torch.randn(t.shape, generator=g))
    return target, draft


def target_distribution(target, prefixes: list[list[int]]) -> torch.Tensor:
    """The target's next-token distribution after each prefix under SETTINGS, built from
    transformers' own processors (OpenAI's presence/frequency penalties, which
    transformers lacks, by hand): the reference, independent of pace_core.sampling."""
    ids = torch.tensor(prefixes)
    with torch.no_grad():
        scores = target(ids).logits[:, -1].float()
    scores = hf.RepetitionPenaltyLogitsProcessor(SETTINGS["repetition_penalty"])(ids, scores)
    counts = torch.zeros(len(prefixes), V)
    for row, prefix in zip(counts, prefixes):
        for t in prefix[len(PROMPT):]:
            row[t] += 1
    scores = scores - SETTINGS["frequency_penalty"] * counts - SETTINGS["presence_penalty"] * (counts > 0)
    scores = hf.TemperatureLogitsWarper(SETTINGS["temperature"])(ids, scores)
    scores = hf.TopKLogitsWarper(SETTINGS["top_k"])(ids, scores)
    return scores.softmax(dim=-1)


def exact_first_tokens(target):
    """P(x1, x2) as a (V, V) table and P(x3) (V,), by enumerating every prefix."""
    p1 = target_distribution(target, [PROMPT])[0]
    joint2 = p1[:, None] * target_distribution(target, [PROMPT + [a] for a in range(V)])
    p3 = target_distribution(target, [PROMPT + [a, b] for a in range(V) for b in range(V)]).view(V, V, V)
    return joint2, (joint2[:, :, None] * p3).sum(dim=(0, 1))


def sample_first_tokens(target, draft, k: int, n: int):
    """The first 3 tokens of n seeded generations (seeds 0..n-1) through the real decode
    loop, and how many tokens each first step emitted."""
    target_runner = make_runner(target)
    draft_runner = make_runner(draft) if k else None
    samples, first_step = [], collections.Counter()
    for seed in range(n):
        sampler = sampling.Sampler(SamplingConfig(max_new_tokens=3, seed=seed, **SETTINGS), PROMPT, V)
        steps = list(decode(target_runner, PROMPT, 3, draft_runner, k, PARD_TOKEN, sampler))
        first_step[len(steps[0].tokens)] += 1
        samples.append([t for s in steps for t in s.tokens])
    return torch.tensor(samples), first_step


def chi_square_pvalue(observed: torch.Tensor, probs: torch.Tensor) -> float:
    """Pearson's chi-square goodness of fit; cells expecting fewer than 5 are pooled."""
    expected = probs.double() * observed.sum()
    big = expected >= 5
    o = torch.cat([observed.double()[big], observed.double()[~big].sum()[None]])
    e = torch.cat([expected[big], expected[~big].sum()[None]])
    if e[-1] < 5:  # nothing (or too little) pooled: merge the pool into the smallest cell
        o, e = torch.cat([o[:-2], o[-2:].sum()[None]]), torch.cat([e[:-2], e[-2:].sum()[None]])
    statistic = ((o - e) ** 2 / e).sum()
    return float(torch.special.gammaincc(torch.tensor((len(o) - 1) / 2), statistic / 2))


def fit(samples: torch.Tensor, joint2: torch.Tensor, p3: torch.Tensor) -> tuple[float, float]:
    """p-values of the samples' (x1, x2) pairs against P(x1, x2) and their x3 against P(x3)."""
    pairs = torch.bincount(samples[:, 0] * V + samples[:, 1], minlength=V * V)
    thirds = torch.bincount(samples[:, 2], minlength=V)
    return chi_square_pvalue(pairs, joint2.flatten()), chi_square_pvalue(thirds, p3)


def test_speculative_sampling_is_exact_in_distribution(tiny_vocab_models, one_thread):
    """PARD with K=2 (so the third token's penalties count two proposals of the same step)
    and plain sampling both follow the target's exact distribution under the same
    processors. Seeds are fixed: the test is deterministic, and a correct sampler fails
    it with probability ~2e-3 per change of the models' numerics."""
    target, draft = tiny_vocab_models
    joint2, p3 = exact_first_tokens(target)
    samples, first_step = sample_first_tokens(target, draft, k=2, n=4000)
    # rejected at once, one proposal kept, both kept + bonus token: each branch ran often
    assert all(first_step[n] >= 200 for n in (1, 2, 3)), first_step
    assert min(fit(samples, joint2, p3)) > P_MIN
    plain, _ = sample_first_tokens(target, None, k=0, n=2000)
    assert min(fit(plain, joint2, p3)) > P_MIN


def test_the_distribution_test_fails_on_a_planted_bug(tiny_vocab_models, one_thread, monkeypatch):
    """Drawing a rejected position from p instead of max(0, p - q) biases the output
    toward the draft: the same goodness-of-fit test rejects it, with fewer samples."""
    target, draft = tiny_vocab_models
    joint2, p3 = exact_first_tokens(target)
    monkeypatch.setattr(sampling, "residual", lambda p, q: p)
    samples, _ = sample_first_tokens(target, draft, k=2, n=1500)
    assert min(fit(samples, joint2, p3)) < P_MIN


# --------------------------------------------------------------------------- processors vs transformers
@pytest.mark.parametrize("settings", [
    dict(temperature=0.7, top_k=5),
    dict(temperature=1.3, top_p=0.8),
    dict(temperature=1.0, min_p=0.1),
    dict(temperature=0.5, top_k=20, top_p=0.9, min_p=0.05, repetition_penalty=1.4),
    dict(temperature=0.0, repetition_penalty=0.8, presence_penalty=-0.5, frequency_penalty=1.5,
         logit_bias={3: 5.0, 7: -100.0}),
])
def test_processors_match_transformers_position_by_position(settings):
    """Row r of a verify pass is processed as transformers would after prompt + output +
    the r proposals before it (OpenAI's presence/frequency penalties over the output
    and those proposals, by hand)."""
    vocab, prompt, output, proposal = 50, [1, 2, 3, 2], [4, 5, 4], [9, 4, 9]
    cfg = SamplingConfig(**settings)
    sampler = sampling.Sampler(cfg, prompt, vocab)
    sampler._record(output)
    logits = torch.randn(len(proposal) + 1, vocab, generator=torch.Generator().manual_seed(0)) * 3
    got = sampler.process(logits, proposal)
    for r in range(len(proposal) + 1):
        seen = prompt + output + proposal[:r]
        ids, scores = torch.tensor([seen]), logits[r : r + 1]
        if cfg.logit_bias:
            scores = hf.SequenceBiasLogitsProcessor([[[t], b] for t, b in cfg.logit_bias.items()])(ids, scores)
        scores = hf.RepetitionPenaltyLogitsProcessor(cfg.repetition_penalty)(ids, scores)
        counts = torch.bincount(torch.tensor(output + proposal[:r]), minlength=vocab).float()
        scores = scores - cfg.frequency_penalty * counts - cfg.presence_penalty * (counts > 0)
        if not cfg.greedy:
            scores = hf.TemperatureLogitsWarper(cfg.temperature)(ids, scores)
            for warper, on in ((hf.TopKLogitsWarper(cfg.top_k or 1), cfg.top_k), (hf.TopPLogitsWarper(cfg.top_p),
                               cfg.top_p < 1), (hf.MinPLogitsWarper(cfg.min_p), cfg.min_p)):
                scores = warper(ids, scores) if on else scores
        torch.testing.assert_close(got[r : r + 1], scores, msg=f"row {r}")


def test_draft_rows_see_the_proposals_before_them():
    """The draft's row i is processed after its own proposals 0..i-1 (greedy here, so the
    proposals are the processed argmaxes): a repetition penalty steers row 1 away from
    the token row 0 proposed."""
    cfg = SamplingConfig(repetition_penalty=100.0)
    sampler = sampling.Sampler(cfg, [0], 10)
    logits = torch.zeros(2, 10)
    logits[:, 5], logits[:, 6] = 2.0, 1.9  # both rows prefer 5, then 6
    assert sampler.propose(logits) == [5, 6]


# --------------------------------------------------------------------------- greedy with penalties
@pytest.fixture(scope="module")
def pard_models(tiny_pairs):
    return {arch: LLMModel(t, dtype="float32", pard_config=PardSpecDecodeConfig(model_name_or_path=d,
                                                                                  num_speculative_tokens=4))
            for arch, (t, d) in tiny_pairs.items()}


PROMPTS = ["def add(a, b):\n    return", "class Stack:\n    def push(self, item):"]


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
@pytest.mark.parametrize("k", [1, 4, 12])
def test_greedy_with_penalties_equals_transformers(pard_models, arch, k):
    """float32, PARD: repetition_penalty alone, then with logit_bias (transformers'
    sequence_bias) pushing EOS and min_new_tokens holding it back for 6 tokens."""
    model = pard_models[arch]
    model.num_speculative_tokens = k
    eos = model.tokenizer.eos_token_id
    for prompt in PROMPTS:
        ids = model.encode(prompt)
        out = model.generate(ids, SamplingConfig(max_new_tokens=40, repetition_penalty=1.3))
        ref = hf_of(model).generate(torch.tensor([ids]), do_sample=False, max_new_tokens=40,
                                          repetition_penalty=1.3)[0, len(ids):].tolist()
        assert out.token_ids == ref, (arch, k, prompt)
        plain = model.generate(ids, SamplingConfig(max_new_tokens=40)).token_ids
        assert out.token_ids != plain  # the penalty changed something
        out = model.generate(ids, SamplingConfig(max_new_tokens=40, repetition_penalty=1.3, min_new_tokens=6,
                                                 logit_bias={eos: 30.0}))
        ref = hf_of(model).generate(torch.tensor([ids]), do_sample=False, max_new_tokens=40,
                                          repetition_penalty=1.3, min_new_tokens=6,
                                          sequence_bias={(eos,): 30.0})[0, len(ids):].tolist()
        assert out.token_ids == ref and len(ref) == 7 and ref[-1] == eos and out.finish_reason == "stop"


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_greedy_with_openai_penalties_equals_a_teacher_forced_reference(pard_models, arch):
    """presence/frequency penalties (not in transformers): against one full forward per
    token with the penalties applied by hand."""
    model = pard_models[arch]
    model.num_speculative_tokens = 5
    ids = model.encode(PROMPTS[1])
    out = model.generate(ids, SamplingConfig(max_new_tokens=30, presence_penalty=0.7, frequency_penalty=1.1,
                                             ignore_eos=True))
    ref = []
    with torch.no_grad():
        for _ in range(30):
            logits = hf_of(model)(torch.tensor([ids + ref])).logits[0, -1].float()
            counts = torch.bincount(torch.tensor(ref, dtype=torch.long), minlength=logits.shape[0]).float()
            ref.append(int((logits - 1.1 * counts - 0.7 * (counts > 0)).argmax()))
    assert out.token_ids == ref
    assert out.token_ids != model.generate(ids, SamplingConfig(max_new_tokens=30, ignore_eos=True)).token_ids


# --------------------------------------------------------------------------- seeds and logprobs
def test_a_seed_gives_the_same_output_every_time(pard_models):
    model = pard_models["qwen2"]
    model.num_speculative_tokens = 4
    sc = SamplingConfig(max_new_tokens=40, temperature=0.9, top_p=0.95, seed=7, ignore_eos=True)
    first = model.generate(PROMPTS[0], sc)
    assert model.generate(PROMPTS[0], sc).token_ids == first.token_ids
    *deltas, _ = model.stream(PROMPTS[0], sc)
    assert [t for d in deltas for t in d.token_ids] == first.token_ids
    assert model.generate(PROMPTS[0], SamplingConfig(**{**sc.model_dump(exclude={"seed"}), "sampling_seed": 7})
                          ).token_ids == first.token_ids  # AMD PACE's name
    assert model.generate(PROMPTS[0], sc.model_copy(update={"seed": 8})).token_ids != first.token_ids
    greedy = model.generate(PROMPTS[0], SamplingConfig(max_new_tokens=40, ignore_eos=True))
    assert first.token_ids != greedy.token_ids
    assert first.stats.steps < len(first.token_ids)  # the draft's proposals were kept sometimes


@pytest.mark.parametrize("settings", [
    dict(temperature=0.8, top_k=20, repetition_penalty=1.2, seed=3),
    dict(temperature=0.0, repetition_penalty=1.2),
    dict(temperature=0.0),
])
def test_logprobs_equal_a_teacher_forced_forward(pard_models, settings):
    """Each token's logprob and its 3 most likely alternatives, from the target's
    processed distribution, against one full forward over prompt + output with
    transformers' processors; the logprobs follow the output's tokens exactly, also when
    a stop string cuts a step's chunk."""
    model = pard_models["llama"]
    model.num_speculative_tokens = 4
    ids = model.encode(PROMPTS[0])
    cfg = SamplingConfig(max_new_tokens=30, ignore_eos=True, logprobs=3, **settings)
    out = model.generate(ids, cfg)
    assert len(out.logprobs) == len(out.token_ids) == 30
    with torch.no_grad():
        logits = hf_of(model)(torch.tensor([ids + out.token_ids])).logits[0].float()
    for j, (token, entry) in enumerate(zip(out.token_ids, out.logprobs)):
        prefix = torch.tensor([ids + out.token_ids[:j]])
        scores = hf.RepetitionPenaltyLogitsProcessor(cfg.repetition_penalty)(prefix, logits[len(ids) + j - 1][None])
        if not cfg.greedy:
            scores = hf.TopKLogitsWarper(cfg.top_k)(prefix, hf.TemperatureLogitsWarper(cfg.temperature)(prefix, scores))
        ref = scores.log_softmax(dim=-1)[0]
        assert entry["token_id"] == token
        assert entry["token"] == model.tokenizer.decode([token], skip_special_tokens=False,
                                                        clean_up_tokenization_spaces=False)
        assert entry["logprob"] == pytest.approx(float(ref[token]), abs=1e-4)
        top = torch.topk(ref, 3)
        assert [a["token_id"] for a in entry["top_logprobs"]] == top.indices.tolist()
        assert [a["logprob"] for a in entry["top_logprobs"]] == pytest.approx(top.values.tolist(), abs=1e-4)
    stop = out.text[len(out.text) // 2:][:4]
    cut = model.generate(ids, cfg.model_copy(update={"stop": [stop]}))
    assert cut.finish_reason == "stop" and len(cut.logprobs) == len(cut.token_ids) < 30
    assert cut.logprobs == out.logprobs[: len(cut.token_ids)]
    assert model.generate(ids, SamplingConfig(max_new_tokens=5)).logprobs is None


# --------------------------------------------------------------------------- the model's defaults
def test_generation_config_sampling_fields_are_the_defaults(tmp_path, tiny_pair):
    """A checkpoint shipping Qwen-style defaults: a request that sets nothing samples with
    them, greedy keeps the repetition penalty (transformers' generate() applies it too),
    request fields override them; generation_config_defaults=False turns them off."""
    import shutil

    target = tmp_path / "target"
    shutil.copytree(tiny_pair[0], target)
    gen = json.loads((target / "generation_config.json").read_text())
    gen.update(do_sample=True, temperature=0.7, top_k=20, top_p=0.8, repetition_penalty=1.3)
    (target / "generation_config.json").write_text(json.dumps(gen))
    model = LLMModel(str(target), dtype="float32", pard_config=PardSpecDecodeConfig(model_name_or_path=tiny_pair[1]))
    defaults = dict(temperature=0.7, top_k=20, top_p=0.8, repetition_penalty=1.3)
    assert model.sampling_defaults == defaults
    ids = model.encode(PROMPTS[0])
    n = 40
    sampled = model.generate(ids, SamplingConfig(max_new_tokens=n, seed=1, ignore_eos=True)).token_ids
    assert sampled == model.generate(ids, SamplingConfig(max_new_tokens=n, seed=1, ignore_eos=True,
                                                         **defaults)).token_ids
    hf_greedy = hf_of(model).generate(torch.tensor([ids]), do_sample=False, max_new_tokens=n)[0, len(ids):]
    for greedy in (SamplingConfig(max_new_tokens=n, temperature=0), SamplingConfig(max_new_tokens=n, do_sample=False)):
        assert model.generate(ids, greedy).token_ids == hf_greedy.tolist()
    assert sampled != hf_greedy.tolist()
    off = LLMModel(str(target), dtype="float32", generation_config_defaults=False)
    assert off.sampling_defaults == {}
    assert off.generate(ids, SamplingConfig(max_new_tokens=n)).token_ids == hf_of(off).generate(
        torch.tensor([ids]), do_sample=False, max_new_tokens=n, repetition_penalty=1.0)[0, len(ids):].tolist()


def test_sampling_defaults_follow_do_sample_and_the_demo_pair_is_greedy():
    assert sampling_defaults(GenerationConfig(do_sample=False, temperature=0.6, top_p=0.9,
                                              repetition_penalty=1.1)) == {"repetition_penalty": 1.1}
    assert sampling_defaults(GenerationConfig(do_sample=True, top_k=50)) == {"temperature": 1.0, "top_k": 50}
    assert sampling_defaults(GenerationConfig(do_sample=True, temperature=0.0)) == {}
    for name in ("demo-target", "demo-draft"):
        assert sampling_defaults(GenerationConfig.from_pretrained(ROOT / "models" / name)) == {}


# --------------------------------------------------------------------------- AMD PACE's names
def test_amd_pace_sampling_config_names(pard_models):
    assert SamplingConfig(do_sample=True).with_defaults({}).temperature == 1.0
    assert SamplingConfig(do_sample=True).with_defaults({"temperature": 0.6}).temperature == 0.6
    greedy = SamplingConfig(do_sample=False).with_defaults({"temperature": 0.6, "top_k": 20, "repetition_penalty": 1.1})
    assert greedy.greedy and greedy.repetition_penalty == 1.1 and greedy.top_k == 0
    assert SamplingConfig(temperature=0).with_defaults({"temperature": 0.6}).greedy  # the request wins
    cfg = SamplingConfig(sampling_seed=4, stop_strings="\n\n", min_new_tokens=2, return_logprobs=True)
    assert (cfg.seed, cfg.stop, cfg.min_new_tokens, cfg.logprobs) == (4, ["\n\n"], 2, 0)
    assert SamplingConfig(min_tokens=3).min_new_tokens == 3  # vLLM's name
    # code written for AMD PACE runs unchanged
    model = pard_models["qwen2"]
    out = model.generate(PROMPTS[1], SamplingConfig(
        max_new_tokens=24, min_new_tokens=2, do_sample=True, temperature=0.7, top_k=50, top_p=0.9, min_p=0.05,
        repetition_penalty=1.1, frequency_penalty=0.2, sampling_seed=1, stop_strings=["\n\n"], return_logprobs=True,
        return_text=True))
    assert out.text is not None and len(out.logprobs) == len(out.token_ids) >= 2
    assert all(e["top_logprobs"] == [] for e in out.logprobs)


@pytest.mark.parametrize("kwargs,match", [
    ({"do_sample": False, "temperature": 0.7}, "do_sample=False .* contradicts temperature=0.7"),
    ({"do_sample": True, "temperature": 0}, "do_sample=True contradicts temperature=0"),
    ({"min_p": 1.5}, "min_p must be in"),
    ({"repetition_penalty": 0}, "repetition_penalty must be > 0"),
    ({"presence_penalty": 2.5}, r"presence_penalty must be in \[-2, 2\]"),
    ({"frequency_penalty": -3}, r"frequency_penalty must be in \[-2, 2\]"),
    ({"logit_bias": {5: 101}}, r"logit_bias values must be in \[-100, 100\]"),
    ({"logit_bias": {-1: 1}}, "logit_bias keys"),
    ({"logprobs": 6}, "logprobs must be in 0..5"),
    ({"min_new_tokens": 10, "max_new_tokens": 5}, "min_new_tokens .* must be <= max_new_tokens"),
    ({"seed": 1, "sampling_seed": 2}, "sampling_seed"),  # two names for one field
])
def test_bad_sampling_values_name_the_field(kwargs, match):
    with pytest.raises(ValidationError, match=match):
        SamplingConfig(**kwargs)


def test_logit_bias_outside_the_vocabulary_is_a_request_error(pard_models):
    from pace_core import RequestError

    with pytest.raises(RequestError, match="logit_bias token ids .* outside the vocabulary"):
        pard_models["qwen2"].generate("x", SamplingConfig(logit_bias={10**6: 1.0}))
