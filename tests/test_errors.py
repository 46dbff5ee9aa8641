"""User mistakes get clear errors that name the field, the range or the fix."""
from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError

from pace_core import LLMModel, ModelLoadError, PardSpecDecodeConfig, RequestError, SamplingConfig


@pytest.mark.parametrize("k", [0, 33, -1])
def test_k_out_of_range(k):
    with pytest.raises(ValidationError, match=r"num_speculative_tokens must be in 1\.\.32"):
        PardSpecDecodeConfig(model_name_or_path="d", num_speculative_tokens=k)


@pytest.mark.parametrize("k", [1, 32])
def test_k_bounds_accepted(k):
    assert PardSpecDecodeConfig(model_name_or_path="d", num_speculative_tokens=k).num_speculative_tokens == k


def test_pard_token_accepts_int_or_0d_tensor():
    assert PardSpecDecodeConfig(model_name_or_path="d", pard_token=torch.tensor(7)).pard_token == 7
    with pytest.raises(ValidationError, match="pard_token"):
        PardSpecDecodeConfig(model_name_or_path="d", pard_token=torch.tensor([1, 2]))
    with pytest.raises(ValidationError, match="pard_token"):
        PardSpecDecodeConfig(model_name_or_path="d", pard_token=-3)


@pytest.mark.parametrize("kwargs,match", [
    ({"max_new_tokens": 0}, "max_new_tokens must be >= 1"),
    ({"temperature": -1}, r"temperature must be in \[0, 2\]"),
    ({"temperature": 2.5}, r"temperature must be in \[0, 2\]"),
    ({"stop": list("abcde")}, "at most 4 stop strings"),
    ({"seed": 2 ** 64}, "seed must be in"),
    ({"top_p": 0}, "top_p must be in"),
    ({"stop": [""]}, "stop strings must not be empty"),
    ({"stop": 3}, "stop must be a string or a list"),
    ({"max_tokens": 3}, "max_tokens"),  # unknown field: extra=forbid names it
])
def test_bad_sampling_config(kwargs, match):
    with pytest.raises(ValidationError, match=match):
        SamplingConfig(**kwargs)


def test_stop_accepts_a_single_string():
    assert SamplingConfig(stop="\n\n").stop == ["\n\n"]


def _draft_config(draft_dir) -> dict:
    return json.loads((Path(draft_dir) / "config.json").read_text())


def _copy_draft(tmp_path, draft_dir, edit) -> str:
    import shutil

    dst = tmp_path / "draft"
    shutil.copytree(draft_dir, dst)
    cfg = _draft_config(dst)
    edit(cfg)
    (dst / "config.json").write_text(json.dumps(cfg))
    return str(dst)


def test_missing_pard_token_is_a_clear_error(tiny_pair, tmp_path):
    target, draft = tiny_pair
    no_token = _copy_draft(tmp_path, draft, lambda c: c.pop("pard_token"))
    with pytest.raises(ModelLoadError, match="no PARD token.*pard_token"):
        LLMModel(target, dtype="float32", pard_config=PardSpecDecodeConfig(model_name_or_path=no_token))
    # an explicit value makes it work
    m = LLMModel(target, dtype="float32", pard_config=PardSpecDecodeConfig(model_name_or_path=no_token, pard_token=1))
    assert m.pard_token == 1


def test_pard_token_from_mask_token_id(tiny_pair, tmp_path):
    target, draft = tiny_pair
    alt = _copy_draft(tmp_path, draft, lambda c: c.update(mask_token_id=c.pop("pard_token")))
    m = LLMModel(target, dtype="float32", pard_config=PardSpecDecodeConfig(model_name_or_path=alt))
    assert m.pard_token == _draft_config(draft)["pard_token"]


def test_explicit_pard_token_wins_with_a_warning(tiny_pair, caplog):
    target, draft = tiny_pair
    with caplog.at_level(logging.WARNING):
        m = LLMModel(target, dtype="float32", pard_config=PardSpecDecodeConfig(model_name_or_path=draft, pard_token=2))
    assert m.pard_token == 2
    assert "overrides the draft config" in caplog.text


def test_missing_model_path_names_the_path(tmp_path):
    missing = str(tmp_path / "no-such-model")
    with pytest.raises(ModelLoadError, match="no-such-model.*does not exist"):
        LLMModel(missing)


def test_missing_draft_path_names_the_path(tiny_pair, tmp_path):
    with pytest.raises(ModelLoadError, match="no-such-draft"):
        LLMModel(tiny_pair[0], dtype="float32",
                 pard_config=PardSpecDecodeConfig(model_name_or_path=str(tmp_path / "no-such-draft")))


def test_unknown_hub_name_offline_is_a_clear_error():
    with pytest.raises(ModelLoadError, match="not found.*not a local directory"):
        LLMModel("nobody-here/not-a-model")


def test_directory_without_config(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="no config.json"):
        LLMModel(str(tmp_path / "empty"))


def test_mismatched_tokenizer_is_refused(tiny_pair, tmp_path):
    from pace_core.testing import build_model, build_tokenizer

    other = build_tokenizer(tmp_path / "tok", vocab_size=300, texts=["completely different text " * 50])
    build_model(tmp_path / "draft", "qwen2", vocab_size=600, tokenizer=other, pard_token=1)
    with pytest.raises(ModelLoadError, match="tokenizer differs from the target's: token id"):
        LLMModel(tiny_pair[0], dtype="float32", pard_config=PardSpecDecodeConfig(model_name_or_path=str(tmp_path / "draft")))


def test_bad_dtype():
    with pytest.raises(ValidationError, match="dtype"):
        LLMModel("whatever", dtype="int8")


@pytest.fixture(scope="module")
def pard_model(tiny_pair):
    return LLMModel(tiny_pair[0], dtype="float32", pard_config=PardSpecDecodeConfig(model_name_or_path=tiny_pair[1]))


def test_over_long_prompt_is_refused_before_any_work(pard_model):
    ctx = pard_model.max_context
    with pytest.raises(RequestError, match=r"exceeds the target's context length of 512.*shorten the prompt"):
        pard_model.generate([3] * (ctx - 10), SamplingConfig(max_new_tokens=11))
    assert pard_model.generate([3] * (ctx - 10), SamplingConfig(max_new_tokens=10, ignore_eos=True)).token_ids


@pytest.mark.parametrize("prompt", ["", []])
def test_empty_prompt(pard_model, prompt):
    with pytest.raises(RequestError, match="empty"):
        pard_model.generate(prompt)


def test_out_of_vocab_prompt_ids(pard_model):
    with pytest.raises(RequestError, match="outside the vocabulary"):
        pard_model.generate([10**6])


def test_cli_generate_and_errors(tiny_pair):
    target, draft = tiny_pair
    run = subprocess.run(
        [sys.executable, "-m", "pace_core", "generate", "--target", target, "--draft", draft, "-k", "4",
         "--prompt", "def f(x):", "--max-new-tokens", "12", "--dtype", "float32", "--json"],
        capture_output=True, text=True, timeout=120,
    )
    assert run.returncode == 0, run.stderr
    out = json.loads(run.stdout)
    assert len(out["token_ids"]) <= 12 and out["stats"]["steps"] >= 1
    model = LLMModel(target, dtype="float32")
    assert out["token_ids"] == model.generate("def f(x):", SamplingConfig(max_new_tokens=12)).token_ids

    bad = subprocess.run([sys.executable, "-m", "pace_core", "generate", "--target", target, "--draft", draft,
                          "-k", "40", "--prompt", "x"], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "num_speculative_tokens must be in 1..32" in bad.stderr


def test_hub_name_loads_offline_from_the_local_cache(tiny_pair, tmp_path):
    """A hub name resolves from the Hugging Face cache with no network (HF_HUB_OFFLINE=1)."""
    import os
    import shutil

    for name, src in (("acme--tiny-target", tiny_pair[0]), ("acme--tiny-draft", tiny_pair[1])):
        repo = tmp_path / "hub" / f"models--{name}"
        shutil.copytree(src, repo / "snapshots" / "0123abcd")
        (repo / "refs").mkdir()
        (repo / "refs" / "main").write_text("0123abcd")
    code = ("from pace_core import LLMModel, PardSpecDecodeConfig, SamplingConfig\n"
            "m = LLMModel('acme/tiny-target', dtype='float32', "
            "pard_config=PardSpecDecodeConfig(model_name_or_path='acme/tiny-draft', num_speculative_tokens=3))\n"
            "print(m.generate('x', SamplingConfig(max_new_tokens=4, ignore_eos=True)).token_ids)")
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"}
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    assert len(json.loads(run.stdout.strip().splitlines()[-1])) == 4


def test_a_prompt_of_zero_tokens_is_a_request_error_before_any_work(tiny_pair, tmp_path):
    """A text the tokenizer drops entirely (its normalizer removes every character) is
    refused by prepare, naming the cause, in generate, stream and chat alike; the model
    serves the next request."""
    from helpers import DROPPED, dropping_tokenizer

    target, draft = tiny_pair
    model = LLMModel(target, dtype="float32", pard_config=PardSpecDecodeConfig(model_name_or_path=draft),
                     tokenizer_name_or_path=dropping_tokenizer(target, tmp_path / "tokenizer"))
    assert model.tokenizer.encode(DROPPED * 3) == []
    for call in (lambda: model.generate(DROPPED * 3), lambda: model.stream(DROPPED),
                 lambda: model.generate([DROPPED, "x"])):
        with pytest.raises(RequestError, match="encodes to zero tokens.*tokenizer drops every character"):
            call()
    model.tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"  # no role tokens
    with pytest.raises(RequestError, match="chat template produced no tokens"):
        model.chat([{"role": "user", "content": DROPPED}])
    assert model.generate("x" + DROPPED, SamplingConfig(max_new_tokens=3, ignore_eos=True)).token_ids
