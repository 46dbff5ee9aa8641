"""The lean Llama-family runner (the native forward over packed float32 / bfloat16 / int8 /
int4 weights, or the Python fallback) matches transformers' forward; its kernels compute
every row alone; other architectures fall back to transformers' own forward."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from pace_core import LLMModel, SamplingConfig
from pace_core.lean import LeanRunner
from pace_core.loading import load_causal_lm
from pace_core.runner import CausalLMRunner, make_runner

FORMATS = {"float32": 0, "bfloat16": 1, "int8": 2, "int4": 3}
GROUP = 64  # int8/int4: input (and int4 weight) quantization group (csrc/kernels.h kGroup)


def _native_or_skip():
    from pace_core import native

    if not native.load():
        pytest.skip(f"native kernels unavailable: {native.unavailable_reason()}")


def _walk(a_runner, b_runner, compare, seed=0):
    """Feed both runners the same prompt, verify-sized chunks and crops; compare logits."""
    ids = torch.randint(0, 400, (120,), generator=torch.Generator().manual_seed(seed)).tolist()
    a_runner.reset(), b_runner.reset()
    for chunk, keep, crop in ((ids[:50], 3, 0), (ids[50:59], 9, 4), (ids[59:60], 1, 0), (ids[60:90], 30, 7)):
        compare(a_runner.forward(chunk, keep), b_runner.forward(chunk, keep))
        a_runner.drop_last(crop), b_runner.drop_last(crop)
        assert a_runner.seq_len == b_runner.seq_len


def _close(a, b):
    torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
def test_lean_logits_match_transformers(tiny_pairs, arch):
    for path in tiny_pairs[arch]:  # target, and the draft (one layer, one KV head: GQA)
        hf = CausalLMRunner(load_causal_lm(path, "float32"))
        lean = LeanRunner(load_causal_lm(path, "float32"), initial_capacity=16)  # forces the cache to grow
        _walk(hf, lean, _close)
        assert hf.cache.get_seq_length() == lean.seq_len


def test_other_architectures_use_transformers_forward(tmp_path):
    from transformers import AutoModelForCausalLM, GPT2Config

    from pace_core.testing import build_tokenizer

    tok = build_tokenizer(tmp_path)
    config = GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=2, n_head=2, n_positions=256,
                        eos_token_id=tok.eos_token_id, bos_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path)
    model = LLMModel(str(tmp_path), dtype="float32")
    assert isinstance(model.target, CausalLMRunner) and model.forward_kind == "transformers"
    ids = model.encode("def f():")
    out = model.generate(ids, SamplingConfig(max_new_tokens=20))
    ref = model.target.model.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=20)[0, len(ids):].tolist()
    assert out.token_ids == ref
    with pytest.raises(ValueError, match="runner='lean' does not support model_type 'gpt2'"):
        make_runner(model.target.model, "lean")
    with pytest.raises(ValueError, match="quantization='int8' needs the lean runner"):
        make_runner(model.target.model, "auto", quantization="int8")


def test_native_forward_with_every_bias_matches_python_and_transformers():
    """Llama with attention and MLP biases, odd sizes (intermediate 90: padded runs of
    units) exercises every optional weight and every padding."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    _native_or_skip()
    config = LlamaConfig(vocab_size=400, hidden_size=64, intermediate_size=90, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, attention_bias=True, mlp_bias=True)

    def model():
        torch.manual_seed(0)
        m = AutoModelForCausalLM.from_config(config).eval()
        with torch.no_grad():
            for p in m.parameters():
                p.normal_(0.0, 0.08)
        return m

    fast, slow, hf = LeanRunner(model()), LeanRunner(model(), use_native=False), CausalLMRunner(model())
    assert fast.native and not slow.native and fast.model is None  # the packed copy replaces the weights
    _walk(fast, slow, _close)
    _walk(fast, hf, _close)


def test_native_kernels_fall_back_to_python(tiny_pair, tmp_path, monkeypatch, caplog):
    """A failing build (here: a compiler that always fails) or PACE_NATIVE_KERNELS=0 is
    a log line, not an error: the Python loop runs with torch's own ops, the same model;
    quantization then has no kernels and says so."""
    from pace_core import native

    reference = CausalLMRunner(load_causal_lm(tiny_pair[0], "float32"))
    monkeypatch.setattr(native, "_state", {})
    monkeypatch.setenv("PACE_CACHE_DIR", str(tmp_path))  # nothing cached: forces a build
    monkeypatch.setenv("CXX", "false")
    with caplog.at_level("WARNING", logger="pace_core.native"):
        runner = LeanRunner(load_causal_lm(tiny_pair[0], "float32"))
    assert not runner.native
    assert "native kernels unavailable" in caplog.text and "false failed" in native.unavailable_reason()
    _walk(runner, reference, _close)
    with pytest.raises(ValueError, match="quantization='int4' needs the native kernels"):
        LeanRunner(load_causal_lm(tiny_pair[0], "float32"), quantization="int4")

    monkeypatch.setattr(native, "_state", {})
    monkeypatch.setenv("PACE_NATIVE_KERNELS", "0")
    assert not LeanRunner(load_causal_lm(tiny_pair[0], "float32")).native
    assert native.unavailable_reason() == "disabled by PACE_NATIVE_KERNELS=0"


def _quantized_input(x: torch.Tensor, k_pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The kernels' int8 input quantization, in torch: groups of 64, scale max|x|/127,
    values rounded to nearest even (as csrc/kernels.h quantize_row)."""
    x = torch.nn.functional.pad(x, (0, k_pad - x.shape[1]))
    g = x.view(x.shape[0], -1, GROUP)
    amax = g.abs().amax(-1, keepdim=True)
    inv = torch.where(amax > 0, torch.tensor(127.0) / amax, torch.zeros_like(amax))
    q = torch.round(g * inv).clamp(-127, 127)
    return q, amax / 127.0


@pytest.mark.parametrize("fmt", list(FORMATS))
@pytest.mark.parametrize("n_out,k_in", [(1, 16), (7, 33), (64, 128), (1003, 900), (2050, 64)])
def test_linear_kernel_rows_are_independent_and_exact(fmt, n_out, k_in):
    """Each output element is computed the same way for 1..64 rows (a verify's rows equal
    one-token steps'), and equals a float64 reference computed from the dequantized
    weights (int8/int4: and the int8-quantized inputs) up to float32 rounding; odd sizes
    exercise every padding."""
    _native_or_skip()
    gen = torch.Generator().manual_seed(n_out)
    w, b = torch.randn(n_out, k_in, generator=gen), torch.randn(n_out, generator=gen)
    x = torch.randn(70, k_in, generator=gen)
    f = FORMATS[fmt]
    packed, scale = torch.ops.pace_core.pack(w, f)
    linear = lambda rows: torch.ops.pace_core.linear(rows, packed, scale, b, f, n_out)  # noqa: E731
    one_by_one = torch.cat([linear(x[i : i + 1]) for i in range(70)])
    for rows in (2, 5, 9, 13, 17, 25, 33, 64, 70):
        assert torch.equal(linear(x[:rows]), one_by_one[:rows]), rows
    deq = torch.ops.pace_core.unpack(packed, scale, f, n_out, k_in).double()
    if fmt in ("int8", "int4"):
        q, s = _quantized_input(x, -(-k_in // GROUP) * GROUP)
        wq = torch.nn.functional.pad(deq, (0, q.shape[1] * GROUP - k_in)).view(n_out, -1, GROUP)
        ref = torch.einsum("mgk,ngk,mg->mn", q.double(), wq, s[..., 0].double()) + b.double()
    else:
        dot_products = fmt == "bfloat16" and torch.ops.pace_core.isa() == "avx512-bf16"  # inputs rounded to bf16
        xr = x.bfloat16().double() if dot_products else x.double()
        ref = xr @ deq.T + b.double()
    scale_of = (x.double().abs() @ deq.abs().T).clamp(min=1.0)  # the size of the terms summed
    assert ((one_by_one.double() - ref).abs() / scale_of).max() < 2e-6


@pytest.mark.parametrize("fmt", ["bfloat16", "int8", "int4"])
def test_quantize_round_trip_error_bounds(fmt):
    """Packed weights come back within their format's step: bfloat16 half an ulp; int8
    half a step of max|row|/127; int4 half a step of its group's scale except where a
    value is clamped to [-8, 7]; and each int4 group's squared error is at most that of
    q4_0's plain choice of scale (the extreme value at -8), which the search includes."""
    _native_or_skip()
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(37, 300, generator=gen) * torch.rand(37, 1, generator=gen) * 4
    w[3, 128:192] = 0.0  # an all-zero int4 group
    packed, scale = torch.ops.pace_core.pack(w, FORMATS[fmt])
    back = torch.ops.pace_core.unpack(packed, scale, FORMATS[fmt], 37, 300)
    assert packed.dtype == torch.uint8
    err = (back - w).abs()
    if fmt == "bfloat16":
        assert (err <= w.abs() * 2 ** -8).all()
        return
    if fmt == "int8":
        assert (err <= w.abs().amax(1, keepdim=True) / 254 * 1.0001).all()
        return
    d = scale.view(2, 5, 32).permute(0, 2, 1).reshape(64, 5)[:37]  # [panel][group][row] -> (row, group)
    d = d.repeat_interleave(GROUP, 1)[:, :300]
    ratio = w / torch.where(d == 0, torch.ones_like(d), d)
    inside = (ratio >= -8.5) & (ratio <= 7.5)
    assert (err[inside] <= d.abs()[inside] / 2 * 1.0001 + 1e-7).all()
    assert (back[3, 128:192] == 0).all()
    padded = torch.nn.functional.pad(w, (0, 20)).view(37, 5, GROUP)
    ext = padded.gather(-1, padded.abs().argmax(-1, keepdim=True))
    q4_0 = ext / -8
    plain = (padded / q4_0).round().clamp(-8, 7) * q4_0
    plain_sse = torch.nan_to_num((plain - padded) ** 2).sum(-1)
    got_sse = (torch.nn.functional.pad(back - w, (0, 20)).view(37, 5, GROUP) ** 2).sum(-1)
    assert (got_sse <= plain_sse * 1.0001 + 1e-9).all()


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
@pytest.mark.parametrize("weights", ["float32", "bfloat16", "int8", "int4"])
def test_verify_logits_equal_one_token_steps(tiny_pairs, arch, weights):
    """A 9-token forward after a prefix gives, bit for bit, the logits of nine one-token
    forwards, for every weight format: speculation never changes what the target
    computes; nor does splitting a long prompt into forwards (prefix reuse)."""
    _native_or_skip()
    dtype, quantization = (weights, None) if weights in ("float32", "bfloat16") else ("bfloat16", weights)
    runner = LeanRunner(load_causal_lm(tiny_pairs[arch][0], dtype), quantization=quantization)
    assert runner.weight_format == weights
    prefix, new = list(range(5, 45)), list(range(50, 59))
    runner.reset()
    runner.forward(prefix, 1)
    batched = runner.forward(new, len(new))
    runner.reset()
    runner.forward(prefix, 1)
    stepped = torch.cat([runner.forward([t], 1) for t in new])
    assert torch.equal(batched, stepped)
    prompt = [(7 * i) % 400 + 3 for i in range(150)]  # past one forward's 64 rows
    runner.reset()
    whole = runner.forward(prompt, 20)
    runner.reset()
    pieces = [runner.forward(prompt[:37], 1), runner.forward(prompt[37:130], 10), runner.forward(prompt[130:], 20)]
    assert torch.equal(whole, pieces[-1])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_attention_kernel_matches_sdpa_and_is_row_independent(dtype):
    """Causal attention of 1..64 new queries over a float32 or bfloat16 cache, query by
    query: close to SDPA on the same values, and each query's output the same whatever
    else is in the call."""
    _native_or_skip()
    import torch.nn.functional as F

    gen = torch.Generator().manual_seed(0)
    for H, KV, D, start in ((4, 2, 16, 0), (14, 2, 64, 37), (8, 8, 20, 5)):  # D=20: a tail past the lanes
        n = 9
        k_cache, v_cache = torch.randn(KV, 64, D, generator=gen).to(dtype), torch.randn(KV, 64, D, generator=gen).to(dtype)
        q = torch.randn(H, n, D, generator=gen)
        out = torch.ops.pace_core.attention(q, k_cache, v_cache, start, D ** -0.5)
        end = start + n
        mask = torch.ones(n, end, dtype=torch.bool).tril(start)
        ref = F.scaled_dot_product_attention(q[None], k_cache[:, :end][None].float(), v_cache[:, :end][None].float(),
                                             attn_mask=mask, enable_gqa=H != KV)[0]
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
        for i in range(n):
            one = torch.ops.pace_core.attention(q[:, i : i + 1], k_cache, v_cache, start + i, D ** -0.5)
            assert torch.equal(one, out[:, i : i + 1])


@pytest.mark.parametrize("isa", ["avx2", "avx512"])
def test_kernels_on_the_lesser_paths_too(isa):
    """The AVX2 path (what an AVX2-only EPYC runs; int8/int4 through VPMADDWD) and the
    AVX-512 path without BF16 dot products or VNNI (a Skylake-X: bfloat16 widened to
    float32, int8/int4 through the AVX2 kernels beside the AVX-512 input quantization)
    pass the same checks, forced with PACE_KERNEL_ISA on a CPU that has more."""
    _native_or_skip()
    if os.environ.get("PACE_KERNEL_ISA"):
        pytest.skip("already on a forced path")
    better = {"avx2": ("avx512", "avx512-bf16"), "avx512": ("avx512-bf16",)}[isa]
    if torch.ops.pace_core.isa() not in better:
        pytest.skip(f"this CPU runs the {isa} path (or a lesser one) already")
    env = {**os.environ, "PACE_KERNEL_ISA": isa}
    probe = subprocess.run([sys.executable, "-c", "import torch; from pace_core import native; native.load(); "
                            "print(torch.ops.pace_core.isa())"], env=env, capture_output=True, text=True)
    assert probe.stdout.strip() == isa, probe.stderr[-2000:]
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__, "-k",
                          "linear_kernel or attention_kernel or verify_logits or match_transformers or every_bias"],
                         env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:]
    assert " passed" in run.stdout and " failed" not in run.stdout
