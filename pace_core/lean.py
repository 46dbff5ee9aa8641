"""A lean forward pass for the Llama family (Llama, Qwen2, Qwen3, Mistral without sliding
window) with a preallocated KV cache.

With the native kernels (:mod:`pace_core.native`, built on first use) the whole forward,
embedding to logits, is one C++ call (``csrc/model.cpp``) over weights packed once at
load into the layout its few-rows kernels stream (``csrc/kernels.h``), in float32,
bfloat16, or quantized to int8 / int4 (``quantization=``). Every forward of up to 64
tokens computes each token's row alone, and longer prompts run in chunks of 64: a
verify, a decode step and a prompt split in any way give bit-identical logits, so PARD's
output is exactly this runner's own greedy output and a reused prefix changes nothing.
The runner keeps no reference to the model; ``release_weights=True`` (what LLMModel
passes: it owns the model it loaded) also drops the model's own weights as each one is
packed, so that loading never holds two copies.

Without the native kernels (no C++ compiler, ``PACE_NATIVE_KERNELS=0``) the layers run
in Python with torch's own ops over the model's modules (same model, slower, float
weights only). At load a probe forward checks the C++ loop against that Python loop on
the first layer (in float32): a model variant whose math the C++ loop does not
reproduce falls back to Python, with a log line.

It is used when :func:`supports` says the architecture matches; anything else runs
through :class:`pace_core.runner.CausalLMRunner` with the same interface.
"""
from __future__ import annotations

import copy
import importlib
import logging

import torch
import torch.nn.functional as F

from . import native
from .runner import linear_weight_bytes

logger = logging.getLogger(__name__)

LLAMA_FAMILY = {"llama", "qwen2", "qwen3", "mistral"}
QUANTIZATIONS = ("int8", "int4")
RUN = 16  # gate/up rows are packed interleaved in runs of this many units (csrc/model.cpp kRun)


def supports(model) -> bool:
    cfg = model.config
    if cfg.model_type not in LLAMA_FAMILY:
        return False
    if getattr(cfg, "sliding_window", None) and getattr(cfg, "use_sliding_window", cfg.model_type == "mistral"):
        return False  # sliding-window attention: leave it to transformers
    layers = getattr(getattr(model, "model", None), "layers", None)
    return (layers is not None and hasattr(layers[0], "self_attn") and hasattr(model.model, "rotary_emb")
            and all(hasattr(layers[0].mlp, name) for name in ("gate_proj", "up_proj", "down_proj", "act_fn")))


def _eps(norm) -> float:
    return getattr(norm, "variance_epsilon", None) or getattr(norm, "eps")


class LeanRunner:
    """Same interface as CausalLMRunner: reset / forward / drop_last / seq_len / vocab_limit,
    plus read_kv / write_kv for the prefix cache."""

    def __init__(self, model, vocab_limit: int | None = None, initial_capacity: int = 256,
                 use_native: bool = True, quantization: str | None = None, release_weights: bool = False):
        cfg = self.config = model.config
        if any(p.numel() == 0 for p in model.parameters()):
            raise ValueError("this model's weights were released when another runner packed them "
                             "(release_weights=True): load the model again for a second runner")
        if quantization not in (None, *QUANTIZATIONS):
            raise ValueError(f"quantization must be one of None, {', '.join(map(repr, QUANTIZATIONS))} "
                             f"(got {quantization!r})")
        self.quantization = quantization
        self.weight_format = None  # the packed linears' format (native), e.g. "bfloat16" or "int4"
        self._vocab_limit = vocab_limit or cfg.vocab_size
        attn = model.model.layers[0].self_attn
        self.num_layers = len(model.model.layers)
        self.num_heads = cfg.num_attention_heads
        self.num_kv_heads = getattr(cfg, "num_key_value_heads", None) or self.num_heads
        self.head_dim = getattr(attn, "head_dim", None) or cfg.hidden_size // self.num_heads
        self.scaling = getattr(attn, "scaling", self.head_dim ** -0.5)
        self.max_len = getattr(cfg, "max_position_embeddings", None) or 1 << 20
        self.dtype = model.model.embed_tokens.weight.dtype  # the checkpoint's, as loaded
        self.rotary_emb = model.model.rotary_emb
        # the KV cache in the model's dtype (float16 models: float32, what the kernels read)
        self.cache_dtype = torch.bfloat16 if self.dtype == torch.bfloat16 else torch.float32
        self.native = use_native and self._native_usable(model)
        if quantization and not self.native:
            raise ValueError(f"quantization={quantization!r} needs the native kernels, which are unavailable here "
                             f"({native.unavailable_reason() or 'the C++ loop does not match this model'}): "
                             "install a C++ compiler (g++) or load the model without quantization")
        if self.native:
            self._pack(model, release_weights)
            self.model = None  # not needed: the packed weights are the runner's own
            self.chunk = torch.ops.pace_core.max_rows()  # prompts run in chunks of this many rows
        else:
            self.model = model
            self.modeling = importlib.import_module(type(model).__module__)
            self.qkv = [self._fuse([l.self_attn.q_proj, l.self_attn.k_proj, l.self_attn.v_proj])
                        for l in model.model.layers]
            self.gate_up = [self._fuse([l.mlp.gate_proj, l.mlp.up_proj]) for l in model.model.layers]
            self.chunk = 0
        self.capacity = 0
        self.k_cache: list[torch.Tensor] = []
        self.v_cache: list[torch.Tensor] = []
        self._grow(min(initial_capacity, self.max_len))
        self.seq_len = 0

    # ------------------------------------------------------------------ loading
    def _formats(self) -> tuple[int, int, str]:
        """The packed formats (csrc/kernels.h) of the decoder layers' linears and of the
        output projection, and the layers' format's name. int4 keeps the output projection
        (and a tied embedding, read from it) in int8, as llama.cpp's q4_0 keeps its output
        tensor at 6-8 bits: in 4 bits it costs most of int4's error (on the demo pair, mean
        KL 0.012 against 0.003 with it in int8; benchmarks/quality.py)."""
        name = self.quantization or ("bfloat16" if self.dtype == torch.bfloat16 else "float32")
        head = "int8" if name == "int4" else name
        return native.FORMATS[name], native.FORMATS[head], name

    def _native_usable(self, model) -> bool:
        """The C++ loop hard-codes SiLU, the Llama RMSNorm and rotary formulas: use it only
        if it builds and reproduces the Python loop on a probe forward of the first layer
        in float32 (a model variant that differs falls back, with a log line)."""
        if getattr(self.config, "hidden_act", "silu") not in ("silu", "swish") or not native.load():
            return False
        layer = copy.deepcopy(model.model.layers[0]).float()
        probe_ids = [1, 2, 3, 4, 5]
        embed = _own(model.model.embed_tokens.weight[: max(probe_ids) + 1], torch.float32)
        positions = torch.arange(len(probe_ids))[None]
        cos, sin = self.rotary_emb(embed, positions)
        fmt = native.FORMATS["float32"]
        tensors, ints = self._layer_tensors(0, layer, fmt)
        ints.update(self._shape_ints(layer, layers=1, vocab=embed.shape[0]))
        tensors["embed"] = embed
        probe = torch.classes.pace_core.Model(tensors, ints, {"eps": _eps(layer.input_layernorm),
                                                              "scaling": float(self.scaling)})
        shape = (self.num_kv_heads, len(probe_ids), self.head_dim)
        probe.set_cache([torch.zeros(shape)], [torch.zeros(shape)])
        with torch.inference_mode():
            got = probe.forward(torch.tensor(probe_ids), cos[0], sin[0], 0, 0)
            expected = self._python_layers([layer], embed[probe_ids][None], cos, sin, 0, [torch.zeros(shape)],
                                           [torch.zeros(shape)])[0]
        error = (got - expected).abs().max().item() / max(expected.abs().max().item(), 1e-6)
        if not error < 1e-4:
            logger.warning("the native layer loop disagrees with the Python one for %s (relative error %.2g): "
                           "using the Python loop", self.config.model_type, error)
            return False
        return True

    def _shape_ints(self, layer, layers: int, vocab: int) -> dict:
        units = layer.mlp.gate_proj.out_features
        return {"hidden": self.config.hidden_size, "heads": self.num_heads, "kv_heads": self.num_kv_heads,
                "head_dim": self.head_dim, "units": -(-units // RUN) * RUN, "layers": layers, "vocab": vocab,
                "logit_rows": self._vocab_limit}

    @staticmethod
    def _packed(prefix: str, weight: torch.Tensor, bias: torch.Tensor | None, fmt: int) -> tuple[dict, dict]:
        packed, scale = torch.ops.pace_core.pack(weight.detach(), fmt)
        tensors = {f"{prefix}.w": packed}
        if scale.numel():
            tensors[f"{prefix}.scale"] = scale
        if bias is not None:
            tensors[f"{prefix}.bias"] = _own(bias, torch.float32)
        return tensors, {f"{prefix}.fmt": fmt, f"{prefix}.N": weight.shape[0], f"{prefix}.K": weight.shape[1]}

    def _layer_tensors(self, i: int, layer, fmt: int) -> tuple[dict, dict]:
        """One layer's packed linears and float32 norms, named as csrc/model.cpp reads them."""
        attn, mlp, p = layer.self_attn, layer.mlp, f"layers.{i}"
        tensors, ints = {}, {}

        def add(name, weight, bias):
            t, n = self._packed(f"{p}.{name}", weight, bias, fmt)
            tensors.update(t)
            ints.update(n)

        linears = [attn.q_proj, attn.k_proj, attn.v_proj]
        add("qkv", torch.cat([l.weight for l in linears]), _cat_bias(linears))
        add("o", attn.o_proj.weight, attn.o_proj.bias)
        gate, up = mlp.gate_proj, mlp.up_proj
        add("gate_up", _interleave_runs(gate.weight, up.weight), _interleave_runs(gate.bias, up.bias)
            if gate.bias is not None or up.bias is not None else None)
        add("down", mlp.down_proj.weight, mlp.down_proj.bias)
        tensors[f"{p}.in_norm"] = _own(layer.input_layernorm.weight, torch.float32)
        tensors[f"{p}.post_norm"] = _own(layer.post_attention_layernorm.weight, torch.float32)
        if getattr(attn, "q_norm", None) is not None:  # Qwen3
            tensors[f"{p}.q_norm"] = _own(attn.q_norm.weight, torch.float32)
            tensors[f"{p}.k_norm"] = _own(attn.k_norm.weight, torch.float32)
        return tensors, ints

    def _pack(self, model, release: bool) -> None:
        """Pack every linear into the native model (``release``: dropping each original
        once packed)."""
        _drop = _release if release else (lambda module: None)
        fmt, head_fmt, name = self._formats()
        layers = model.model.layers
        tensors, ints = {}, self._shape_ints(layers[0], len(layers), model.config.vocab_size)
        for i, layer in enumerate(layers):
            t, n = self._layer_tensors(i, layer, fmt)
            tensors.update(t)
            ints.update(n)
            _drop(layer)
        head = model.lm_head
        tied = head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
        t, n = self._packed("head", head.weight, head.bias, head_fmt)
        tensors.update(t)
        ints.update(n)
        tensors["final_norm"] = _own(model.model.norm.weight, torch.float32)
        if not tied:  # a tied embedding is read back from the packed output projection
            embed = model.model.embed_tokens.weight
            tensors["embed"] = _own(embed, embed.dtype if embed.dtype in (torch.float32, torch.bfloat16) else torch.float32)
        _drop(head)
        _drop(model.model.embed_tokens)
        self.weight_format = name
        self.packed_bytes = sum(t.numel() * t.element_size() for key, t in tensors.items() if key.endswith((".w", ".scale")))
        self.native_model = torch.classes.pace_core.Model(
            tensors, ints, {"eps": _eps(layers[0].input_layernorm), "scaling": float(self.scaling)})

    @staticmethod
    def _fuse(linears: list[torch.nn.Linear]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The Python loop's one (out_total, in) weight for linears that read the same input."""
        return torch.cat([lin.weight.data for lin in linears], 0), _cat_bias(linears)

    # ------------------------------------------------------------------ cache
    @property
    def vocab_limit(self) -> int:
        """Logits are computed for ids below this (padding rows of the embedding, or a
        draft's reduced vocabulary, are never read); settable."""
        return self._vocab_limit

    @vocab_limit.setter
    def vocab_limit(self, value: int) -> None:
        self._vocab_limit = value
        if self.native:
            self.native_model.set_logit_rows(value)

    def weight_bytes(self) -> int:
        """Bytes of weights one forward streams (packed linears and the output projection)."""
        return self.packed_bytes if self.native else linear_weight_bytes(self.model)

    def _grow(self, needed: int) -> None:
        capacity = max(needed, min(2 * self.capacity, self.max_len))
        shape = (self.num_kv_heads, capacity, self.head_dim)
        for i in range(self.num_layers):
            k, v = torch.empty(shape, dtype=self.cache_dtype), torch.empty(shape, dtype=self.cache_dtype)
            if self.capacity:
                k[:, : self.capacity] = self.k_cache[i]
                v[:, : self.capacity] = self.v_cache[i]
                self.k_cache[i], self.v_cache[i] = k, v
            else:
                self.k_cache.append(k)
                self.v_cache.append(v)
        self.capacity = capacity
        if self.native:
            self.native_model.set_cache(self.k_cache, self.v_cache)

    def reset(self) -> None:
        self.seq_len = 0

    def drop_last(self, num_tokens: int) -> None:
        self.seq_len -= max(num_tokens, 0)

    @torch.inference_mode()
    def read_kv(self, start: int, end: int) -> torch.Tensor:
        """A copy of the K and V of positions start..end-1 in every layer, shape
        (2, layers, kv_heads, end - start, head_dim) (:mod:`pace_core.prefix_cache`)."""
        return torch.stack([torch.stack([c[:, start:end] for c in cache]) for cache in (self.k_cache, self.v_cache)])

    @torch.inference_mode()
    def write_kv(self, kv: torch.Tensor) -> None:
        """Make ``kv`` (as :meth:`read_kv` returns it) the cache's first positions, and
        the whole sequence: the next forward continues after them."""
        n = kv.shape[3]
        if n > self.capacity:
            self._grow(n)
        for i in range(self.num_layers):
            self.k_cache[i][:, :n] = kv[0, i]
            self.v_cache[i][:, :n] = kv[1, i]
        self.seq_len = n

    # ------------------------------------------------------------------ forward
    @torch.inference_mode()
    def forward(self, token_ids: list[int], num_logits: int) -> torch.Tensor:
        """Append ``token_ids`` to the sequence; the float32 logits of the last
        ``num_logits`` positions, shape (num_logits, vocab_limit)."""
        n = len(token_ids)
        if self.seq_len + n > self.capacity:
            self._grow(self.seq_len + n)
        if not self.native:
            return self._python_forward(token_ids, num_logits)
        # chunks of max_rows: every row is computed exactly as in a decode step, so no logit
        # depends on how a sequence was split into forwards
        logits = []
        for first in range(0, n, self.chunk):
            ids = token_ids[first : first + self.chunk]
            wanted = max(0, first + len(ids) - max(first, n - num_logits))  # logits from this chunk
            positions = torch.arange(self.seq_len, self.seq_len + len(ids))[None]
            cos, sin = self.rotary_emb(_FLOAT32, positions)
            out = self.native_model.forward(torch.tensor(ids), cos[0], sin[0], self.seq_len, wanted)
            self.seq_len += len(ids)
            if wanted:
                logits.append(out)
        return torch.cat(logits) if len(logits) > 1 else logits[0]

    def _python_forward(self, token_ids: list[int], num_logits: int) -> torch.Tensor:
        model = self.model
        start, end = self.seq_len, self.seq_len + len(token_ids)
        positions = torch.arange(start, end)[None]
        h = model.model.embed_tokens(torch.tensor([token_ids]))
        cos, sin = self.rotary_emb(h, positions)
        h = self._python_layers(list(model.model.layers), h, cos, sin, start, self.k_cache, self.v_cache,
                                self.qkv, self.gate_up)
        self.seq_len = end
        h = model.model.norm(h[:, -num_logits:])
        return F.linear(h[0], model.lm_head.weight[: self._vocab_limit],
                        model.lm_head.bias[: self._vocab_limit] if model.lm_head.bias is not None else None).float()

    def _python_layers(self, layers, h, cos, sin, start, k_cache, v_cache, qkv=None, gate_up=None):
        """The decoder layers in Python with torch's ops (the fallback, and the reference
        the C++ loop is probed against)."""
        n = h.shape[1]
        end = start + n
        H, KV, D = self.num_heads, self.num_kv_heads, self.head_dim
        apply_rotary = importlib.import_module(type(layers[0]).__module__).apply_rotary_pos_emb
        for i, layer in enumerate(layers):
            attn = layer.self_attn
            x = layer.input_layernorm(h)
            w, b = qkv[i] if qkv else self._fuse([attn.q_proj, attn.k_proj, attn.v_proj])
            q, k, v = F.linear(x, w, b).split([H * D, KV * D, KV * D], dim=-1)
            q = q.view(1, n, H, D)
            k = k.view(1, n, KV, D)
            v = v.view(1, n, KV, D).transpose(1, 2)
            if getattr(attn, "q_norm", None) is not None:  # Qwen3
                q, k = attn.q_norm(q), attn.k_norm(k)
            q, k = apply_rotary(q.transpose(1, 2), k.transpose(1, 2), cos, sin)
            k_cache[i][:, start:end] = k[0]
            v_cache[i][:, start:end] = v[0]
            mask = torch.ones(n, end, dtype=torch.bool).tril(diagonal=start) if n > 1 else None
            o = F.scaled_dot_product_attention(q, k_cache[i][:, :end].unsqueeze(0), v_cache[i][:, :end].unsqueeze(0),
                                               attn_mask=mask, scale=self.scaling, enable_gqa=H != KV)
            h = h + attn.o_proj(o.transpose(1, 2).reshape(1, n, H * D))
            w, b = gate_up[i] if gate_up else self._fuse([layer.mlp.gate_proj, layer.mlp.up_proj])
            gate, up = F.linear(layer.post_attention_layernorm(h), w, b).chunk(2, dim=-1)
            h = h + layer.mlp.down_proj(layer.mlp.act_fn(gate) * up)
        return h


_FLOAT32 = torch.empty(0)  # what the rotary embedding reads the dtype (float32) and device from


def _own(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A copy in memory of its own: a tensor kept from the model must not be a view of the
    checkpoint's memory map (transformers maps safetensors files), or the whole file would
    stay mapped, and counted as resident, after packing."""
    return t.detach().to(dtype, copy=True).contiguous()


def _cat_bias(linears) -> torch.Tensor | None:
    if all(lin.bias is None for lin in linears):
        return None
    return torch.cat([lin.bias.data if lin.bias is not None else torch.zeros(lin.out_features, dtype=lin.weight.dtype)
                      for lin in linears])


def _interleave_runs(gate: torch.Tensor | None, up: torch.Tensor | None) -> torch.Tensor:
    """[gate; up] reordered as [gate run 0][up run 0][gate run 1]..., runs of RUN units
    (each padded with zeros to a multiple of RUN): a thread computing some runs can apply
    silu(gate) * up to them at once (csrc/model.cpp)."""
    ref = gate if gate is not None else up
    gate = gate if gate is not None else torch.zeros_like(ref)
    up = up if up is not None else torch.zeros_like(ref)
    units = gate.shape[0]
    padded = -(-units // RUN) * RUN
    rest = tuple(gate.shape[1:])
    both = torch.zeros((2, padded, *rest), dtype=gate.dtype)
    both[0, :units], both[1, :units] = gate.detach(), up.detach()
    return both.view(2, padded // RUN, RUN, *rest).transpose(0, 1).reshape(2 * padded, *rest)


def _release(module) -> None:
    """Drop a module's parameters (their packed copies live on), and the pages of the
    checkpoint file they were read from: the file stays mapped until the last of them
    goes, and without this every page read would count as resident until then (loading
    a 15 GB checkpoint would show 15 GB more than it holds)."""
    for sub in module.modules():
        for name, p in list(sub.named_parameters(recurse=False)):
            _drop_file_pages(p)
            setattr(sub, name, torch.nn.Parameter(torch.empty(0, dtype=p.dtype), requires_grad=False))


def _drop_file_pages(t: torch.Tensor) -> None:
    """madvise(MADV_DONTNEED) the whole pages of ``t`` that lie in a mapped .safetensors
    file (a private, read-only mapping: dropped pages would be read again from the file
    if touched). Anything else (memory of its own) is left alone."""
    import ctypes

    start = t.data_ptr()
    end = start + t.numel() * t.element_size()
    if not t.numel() or not any(lo <= start and end <= hi for lo, hi in _file_mappings()):
        return
    page = 4096
    lo, hi = -(-start // page) * page, end // page * page
    if hi > lo:
        ctypes.CDLL(None).madvise(ctypes.c_void_p(lo), ctypes.c_size_t(hi - lo), 4)  # MADV_DONTNEED


def _file_mappings() -> list[tuple[int, int]]:
    """Address ranges of this process's mappings of .safetensors files (Linux)."""
    try:
        lines = open("/proc/self/maps").read().splitlines()
    except OSError:
        return []
    ranges = []
    for line in lines:
        fields = line.split()
        if fields[-1].endswith(".safetensors"):
            lo, hi = fields[0].split("-")
            ranges.append((int(lo, 16), int(hi, 16)))
    return ranges


def masked_forward(model, input_ids: torch.Tensor, position_ids: torch.Tensor,
                   attn_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Training forward of a Llama-family model with explicit position ids and an
    explicit boolean attention mask (B, T, T), True = may attend (None = causal).
    Reuses the model's modules, so gradients flow into its own weights. Returns logits
    (B, T, vocab)."""
    cfg = model.config
    B, T = input_ids.shape
    attn0 = model.model.layers[0].self_attn
    H = cfg.num_attention_heads
    KV = getattr(cfg, "num_key_value_heads", None) or H
    D = getattr(attn0, "head_dim", None) or cfg.hidden_size // H
    scaling = getattr(attn0, "scaling", D ** -0.5)
    apply_rotary = importlib.import_module(type(model).__module__).apply_rotary_pos_emb
    h = model.model.embed_tokens(input_ids)
    cos, sin = model.model.rotary_emb(h, position_ids)
    mask = attn_mask.unsqueeze(1) if attn_mask is not None else None
    for layer in model.model.layers:
        attn = layer.self_attn
        x = layer.input_layernorm(h)
        q = attn.q_proj(x).view(B, T, H, D)
        k = attn.k_proj(x).view(B, T, KV, D)
        v = attn.v_proj(x).view(B, T, KV, D).transpose(1, 2)
        if hasattr(attn, "q_norm"):
            q, k = attn.q_norm(q), attn.k_norm(k)
        q, k = apply_rotary(q.transpose(1, 2), k.transpose(1, 2), cos, sin)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, scale=scaling,
                                           enable_gqa=H != KV)
        h = h + attn.o_proj(o.transpose(1, 2).reshape(B, T, H * D))
        h = h + layer.mlp(layer.post_attention_layernorm(h))
    return model.lm_head(model.model.norm(h))
