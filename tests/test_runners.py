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
        hf.drop_last(crop), lean.drop_last(crop)
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


def _python_and_native(model):
    """Two lean runners on one model: the C++ layer loop and the Python one."""
    from pace_core import native

    if native._compiler() is None:
        pytest.skip("no C++ compiler: the native kernels cannot be built here")
    fast, slow = LeanRunner(model, initial_capacity=16), LeanRunner(model, initial_capacity=16, use_native=False)
    assert fast.native, native.unavailable_reason()
    assert not slow.native
    return fast, slow


def _assert_same_logits(a_runner, b_runner, seed=0):
    ids = torch.randint(0, 400, (120,), generator=torch.Generator().manual_seed(seed)).tolist()
    a_runner.reset(), b_runner.reset()
    for chunk, keep, crop in ((ids[:50], 3, 0), (ids[50:59], 9, 4), (ids[59:60], 1, 0), (ids[60:90], 30, 7)):
        assert torch.equal(a_runner.forward(chunk, keep), b_runner.forward(chunk, keep))  # bit for bit
        a_runner.drop_last(crop), b_runner.drop_last(crop)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
def test_native_layer_loop_is_bit_identical_to_python(tiny_pairs, arch):
    for path in tiny_pairs[arch]:  # target, and the draft (one layer, one KV head: GQA)
        model = LLMModel(path, dtype="float32", runner="transformers").target.model
        _assert_same_logits(*_python_and_native(model))


def test_native_layer_loop_with_every_bias(tmp_path):
    """Llama with attention and MLP biases exercises every optional weight slot."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(vocab_size=400, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, attention_bias=True, mlp_bias=True)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.08)
    fast, slow = _python_and_native(model)
    _assert_same_logits(fast, slow)
    hf = CausalLMRunner(model)
    hf.reset(), fast.reset()
    ids = list(range(3, 40))
    torch.testing.assert_close(hf.forward(ids, 5), fast.forward(ids, 5), atol=1e-4, rtol=1e-4)


def test_native_kernels_fall_back_to_python(tiny_pair, tmp_path, monkeypatch, caplog):
    """A failing build (here: a compiler that always fails) or PACE_NATIVE_KERNELS=0 is
    a log line, not an error: the Python loop runs with torch's own linear, with the
    same results up to float rounding (the few-rows kernel sums in another order)."""
    from pace_core import native

    model = LLMModel(tiny_pair[0], dtype="float32", runner="transformers").target.model
    reference = LeanRunner(model, use_native=False)
    monkeypatch.setattr(native, "_state", {})
    monkeypatch.setenv("PACE_CACHE_DIR", str(tmp_path))  # nothing cached: forces a build
    monkeypatch.setenv("CXX", "false")
    with caplog.at_level("WARNING", logger="pace_core.native"):
        runner = LeanRunner(model)
    assert not runner.native
    assert "native kernels unavailable" in caplog.text and "false failed" in native.unavailable_reason()
    assert runner.linear is torch.nn.functional.linear
    ids = list(range(3, 60))
    runner.reset(), reference.reset()
    torch.testing.assert_close(runner.forward(ids, 9), reference.forward(ids, 9), atol=1e-4, rtol=1e-4)

    monkeypatch.setattr(native, "_state", {})
    monkeypatch.setenv("PACE_NATIVE_KERNELS", "0")
    assert not LeanRunner(model).native
    assert native.unavailable_reason() == "disabled by PACE_NATIVE_KERNELS=0"


def _native_or_skip():
    from pace_core import native

    if not native.load():
        pytest.skip(f"native kernels unavailable: {native.unavailable_reason()}")


@pytest.mark.parametrize("n_out,k_in", [(1, 16), (7, 33), (64, 128), (1003, 900), (2050, 64)])
def test_few_rows_linear_is_the_same_whatever_the_row_count(n_out, k_in):
    """The few-rows kernel computes each output element the same way for 1..64 rows, so
    a (K+1)-token verify gives bit-identical results to K+1 one-token steps; and it
    agrees with torch's linear up to float rounding (odd sizes exercise every tail),
    for float32 and bfloat16."""
    _native_or_skip()
    gen = torch.Generator().manual_seed(n_out)
    w, b = torch.randn(n_out, k_in, generator=gen), torch.randn(n_out, generator=gen)
    x = torch.randn(40, k_in, generator=gen)
    one_by_one = torch.cat([torch.ops.pace_core.linear(x[i : i + 1], w, b) for i in range(40)])
    for rows in (2, 5, 9, 13, 17, 25, 33, 40):
        assert torch.equal(torch.ops.pace_core.linear(x[:rows], w, b), one_by_one[:rows])
    torch.testing.assert_close(one_by_one, torch.nn.functional.linear(x, w, b), atol=1e-4, rtol=1e-4)
    assert torch.equal(torch.ops.pace_core.linear(x[:3], w, None) + b, torch.ops.pace_core.linear(x[:3], w, b))
    # bfloat16 weights and inputs: widened exactly, summed in float32, rounded once
    wb, bb, xb = w.bfloat16(), b.bfloat16(), x.bfloat16()
    one_by_one = torch.cat([torch.ops.pace_core.linear(xb[i : i + 1], wb, bb) for i in range(40)])
    assert one_by_one.dtype == torch.bfloat16
    assert torch.equal(torch.ops.pace_core.linear(xb[:13], wb, bb), one_by_one[:13])
    exact = torch.nn.functional.linear(xb.float(), wb.float(), bb.float())
    torch.testing.assert_close(one_by_one.float(), exact, atol=1e-2, rtol=8e-3)  # one bf16 rounding


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
def test_verify_logits_equal_one_token_steps(tiny_pairs, arch):
    """A 9-token forward after a prefix gives, bit for bit, the logits of nine
    one-token forwards, in float32 and in bfloat16: speculation never changes what the
    target computes; nor does splitting a long prompt into forwards (prefix reuse; float32)."""
    _native_or_skip()
    for dtype in ("bfloat16", "float32"):
        model = LLMModel(tiny_pairs[arch][0], dtype=dtype).target
        prefix, new = list(range(5, 45)), list(range(50, 59))
        model.reset()
        model.forward(prefix, 1)
        batched = model.forward(new, len(new))
        model.reset()
        model.forward(prefix, 1)
        stepped = torch.cat([model.forward([t], 1) for t in new])
        assert torch.equal(batched, stepped), dtype
    # a long prompt (past the few-rows size) in one forward or in any pieces: the same
    prompt = [(7 * i) % 400 + 3 for i in range(150)]
    model.reset()
    whole = model.forward(prompt, 20)
    model.reset()
    pieces = [model.forward(prompt[:37], 1), model.forward(prompt[37:130], 10), model.forward(prompt[130:], 20)]
    assert torch.equal(whole, pieces[-1])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_few_rows_attention_matches_sdpa_and_is_row_independent(dtype):
    """Causal attention of 1..64 new queries over a cache, query by query: close to
    SDPA (bfloat16: computed in float32, rounded once, against SDPA on the same values
    in float32), and each query's output the same whatever else is in the call."""
    _native_or_skip()
    import torch.nn.functional as F

    gen = torch.Generator().manual_seed(0)
    tol = {torch.float32: 1e-5, torch.bfloat16: 1e-2}[dtype]
    for H, KV, D, start in ((4, 2, 16, 0), (14, 2, 64, 37), (8, 8, 20, 5)):  # D=20: a tail past the lanes
        n = 9
        k_cache, v_cache = torch.randn(KV, 64, D, generator=gen).to(dtype), torch.randn(KV, 64, D, generator=gen).to(dtype)
        q = torch.randn(1, H, n, D, generator=gen).to(dtype)
        out = torch.ops.pace_core.attention(q, k_cache, v_cache, start, D ** -0.5)
        assert out.dtype == dtype
        end = start + n
        mask = torch.ones(n, end, dtype=torch.bool).tril(start)
        ref = F.scaled_dot_product_attention(q.float(), k_cache[:, :end][None].float(), v_cache[:, :end][None].float(),
                                             attn_mask=mask, enable_gqa=H != KV)
        torch.testing.assert_close(out.float(), ref, atol=tol, rtol=tol)
        for i in range(n):
            one = torch.ops.pace_core.attention(q[:, :, i : i + 1], k_cache, v_cache, start + i, D ** -0.5)
            assert torch.equal(one, out[:, :, i : i + 1])


@pytest.mark.parametrize("isa", ["avx2", "avx512"])
def test_few_rows_kernels_on_the_lesser_paths_too(isa):
    """The AVX2 path of the few-rows kernels (what an AVX2-only EPYC runs) and the AVX-512
    path without BF16 dot products (bfloat16 widened to float32: an AVX-512 CPU without
    AVX512_BF16) pass the same checks, forced with PACE_KERNEL_ISA on a CPU that has more."""
    import os
    import subprocess
    import sys

    _native_or_skip()
    if os.environ.get("PACE_KERNEL_ISA"):
        pytest.skip("already on a forced path")
    better = {"avx2": ("avx512", "avx512-bf16"), "avx512": ("avx512-bf16",)}[isa]
    if torch.ops.pace_core.few_rows_isa() not in better:
        pytest.skip(f"this CPU runs the {isa} path (or a lesser one) already")
    env = {**os.environ, "PACE_KERNEL_ISA": isa}
    probe = subprocess.run([sys.executable, "-c", "import torch; from pace_core import native; native.load(); "
                            "print(torch.ops.pace_core.few_rows_isa())"], env=env, capture_output=True, text=True)
    assert probe.stdout.strip() == isa, probe.stderr[-2000:]
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__, "-k",
                          "few_rows_linear or few_rows_attention or verify_logits or bit_identical"],
                         env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:]
    assert " passed" in run.stdout and " failed" not in run.stdout
