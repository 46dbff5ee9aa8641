"""A lean forward pass for the Llama family (Llama, Qwen2, Qwen3, ...) with a
preallocated KV cache.

For small and medium models on CPU, the generic transformers forward spends more
time in Python (mask building, cache bookkeeping, output objects) than in matmuls.
This runner reuses the model's own modules and weights (norms, projections, MLP,
rotary embedding) and only replaces the glue: one contiguous K/V buffer per layer,
grown geometrically, where cropping is just moving the length back.

The layer loop runs in C++ (:mod:`pace_core.native`: the same ops, bit-identical,
without Python's per-op overhead) when the native kernels build and agree with the
Python loop below on a probe forward; otherwise in Python. In float32 both loops use
the few-rows kernels (csrc/few_rows.cpp) for every linear and attention: each weight is
streamed from memory once for all the tokens of a forward (a K+1-token verify costs far
less than K+1 decode steps), and each token's row is computed alone, so a verify, a
decode step and a prompt split in any way give bit-identical logits.

It is used when :func:`supports` says the architecture matches; anything else runs
through :class:`pace_core.runner.CausalLMRunner` with the same interface.
"""
from __future__ import annotations

import importlib
import logging
import math

import torch
import torch.nn.functional as F

from . import native

logger = logging.getLogger(__name__)

LLAMA_FAMILY = {"llama", "qwen2", "qwen3", "mistral"}


def supports(model) -> bool:
    cfg = model.config
    if cfg.model_type not in LLAMA_FAMILY:
        return False
    if getattr(cfg, "sliding_window", None) and getattr(cfg, "use_sliding_window", cfg.model_type == "mistral"):
        return False  # sliding-window attention: leave it to transformers
    layers = getattr(getattr(model, "model", None), "layers", None)
    return (layers is not None and hasattr(layers[0], "self_attn") and hasattr(model.model, "rotary_emb")
            and all(hasattr(layers[0].mlp, name) for name in ("gate_proj", "up_proj", "down_proj", "act_fn")))


def _fuse(linears: list[torch.nn.Linear]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One (out_total, in) weight for several linears that read the same input; each
    linear's own weight (and bias) becomes a view into it: no extra memory, and
    transformers' forward still sees the same values."""
    fused = torch.cat([lin.weight.data for lin in linears], 0)
    bias = None
    if any(lin.bias is not None for lin in linears):
        bias = torch.cat([lin.bias.data if lin.bias is not None else torch.zeros(lin.out_features, dtype=fused.dtype)
                          for lin in linears])
    offset = 0
    for lin in linears:
        n = lin.out_features
        lin.weight.data = fused[offset : offset + n]
        if lin.bias is not None:
            lin.bias.data = bias[offset : offset + n]
        offset += n
    return fused, bias


class LeanRunner:
    """Same interface as CausalLMRunner: reset / forward / drop_last / seq_len / vocab_limit."""

    def __init__(self, model, vocab_limit: int | None = None, initial_capacity: int = 256,
                 use_native: bool = True):
        self.model = model
        self.vocab_limit = vocab_limit or model.config.vocab_size
        cfg = model.config
        self.layers = list(model.model.layers)
        attn = self.layers[0].self_attn
        self.num_heads = cfg.num_attention_heads
        self.num_kv_heads = getattr(cfg, "num_key_value_heads", None) or self.num_heads
        self.head_dim = getattr(attn, "head_dim", None) or cfg.hidden_size // self.num_heads
        self.scaling = getattr(attn, "scaling", self.head_dim ** -0.5)
        modeling = importlib.import_module(type(model).__module__)
        self.apply_rotary = modeling.apply_rotary_pos_emb
        self.max_len = getattr(cfg, "max_position_embeddings", None) or 1 << 20
        self.dtype = model.model.embed_tokens.weight.dtype
        # q/k/v and gate/up as single GEMMs (views: no extra memory)
        self.qkv = [_fuse([l.self_attn.q_proj, l.self_attn.k_proj, l.self_attn.v_proj]) for l in self.layers]
        self.gate_up = [_fuse([l.mlp.gate_proj, l.mlp.up_proj]) for l in self.layers]
        # the output projection over the ids that can be emitted only (padding rows unread)
        self.lm_head_weight = model.lm_head.weight[: self.vocab_limit]
        self.lm_head_bias = model.lm_head.bias[: self.vocab_limit] if model.lm_head.bias is not None else None
        # every linear through the native op when it builds: in float32 the few-rows kernels
        # (csrc/few_rows.cpp: each weight read once for up to 64 rows, each row computed
        # alone), torch's own GEMM otherwise
        kernels = native.load()
        self.linear = torch.ops.pace_core.linear if kernels else F.linear
        # forwards of up to this many tokens go through the few-rows linear and attention
        # kernels (0: no native kernels); float32 ones of any length run in chunks of it
        # (forward), bfloat16 prompts beyond it through torch's GEMM (faster there)
        self.few_rows = torch.ops.pace_core.few_rows_limit() if kernels else 0
        self.prompt_chunk = self.few_rows if self.dtype == torch.float32 else 0  # 0: one piece
        # rows computed alone (CausalLMRunner.row_exact_limit): those of the few-rows
        # kernels, so any length when every forward is chunked
        self.row_exact_limit = math.inf if self.prompt_chunk else self.few_rows
        self.capacity = 0
        self.k_cache: list[torch.Tensor] = []
        self.v_cache: list[torch.Tensor] = []
        self._grow(min(initial_capacity, self.max_len))
        self.seq_len = 0
        self.native_weights = [w for i in range(len(self.layers)) for w in self._layer_weights(i)]
        self.norm_eps = self._eps(self.layers[0].input_layernorm)
        self.native = use_native and self._native_usable()

    @staticmethod
    def _eps(norm) -> float:
        return getattr(norm, "variance_epsilon", None) or getattr(norm, "eps")

    def _layer_weights(self, i: int) -> list[torch.Tensor | None]:
        """One layer's weights in the order csrc/llama_layers.cpp reads them."""
        layer = self.layers[i]
        attn, mlp = layer.self_attn, layer.mlp
        q_norm, k_norm = getattr(attn, "q_norm", None), getattr(attn, "k_norm", None)
        return [layer.input_layernorm.weight, *self.qkv[i],
                q_norm.weight if q_norm is not None else None, k_norm.weight if k_norm is not None else None,
                attn.o_proj.weight, attn.o_proj.bias, layer.post_attention_layernorm.weight,
                *self.gate_up[i], mlp.down_proj.weight, mlp.down_proj.bias]

    def _native_usable(self) -> bool:
        """The C++ layer loop hard-codes SiLU, the Llama RMSNorm and rotary formulas and one
        epsilon: use it only if it builds and reproduces the Python loop exactly on a
        probe forward (a model variant that differs falls back, with a log line)."""
        cfg = self.model.config
        if getattr(cfg, "hidden_act", "silu") not in ("silu", "swish") or not native.load():
            return False
        probe = [i % self.vocab_limit for i in range(1, 6)]
        self.native = False
        expected = self.forward(probe, len(probe))
        self.native, self.seq_len = True, 0
        agrees = torch.equal(self.forward(probe, len(probe)), expected)
        self.seq_len = 0
        if not agrees:
            logger.warning("native layer loop disagrees with the Python one for %s: using the Python loop",
                           cfg.model_type)
        return agrees

    def _grow(self, needed: int) -> None:
        capacity = max(needed, min(2 * self.capacity, self.max_len))
        shape = (self.num_kv_heads, capacity, self.head_dim)
        for i in range(len(self.layers)):
            k, v = torch.empty(shape, dtype=self.dtype), torch.empty(shape, dtype=self.dtype)
            if self.capacity:
                k[:, : self.capacity] = self.k_cache[i]
                v[:, : self.capacity] = self.v_cache[i]
                self.k_cache[i], self.v_cache[i] = k, v
            else:
                self.k_cache.append(k)
                self.v_cache.append(v)
        self.capacity = capacity

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
        for i in range(len(self.layers)):
            self.k_cache[i][:, :n] = kv[0, i]
            self.v_cache[i][:, :n] = kv[1, i]
        self.seq_len = n

    @torch.inference_mode()
    def forward(self, token_ids: list[int], num_logits: int) -> torch.Tensor:
        n = len(token_ids)
        if self.seq_len + n > self.capacity:
            self._grow(self.seq_len + n)
        chunk = self.prompt_chunk or n
        # a long prompt runs in chunks of the few-rows kernels' size (as fast as one big
        # GEMM on CPU): every row is then computed exactly as in a decode step, so no
        # logit depends on how a sequence was split into forwards
        last = []  # hidden states of the last num_logits positions
        for first in range(0, n, chunk):
            h = self._hidden(token_ids[first : first + chunk])
            keep = first + h.shape[1] - (n - num_logits)
            if keep > 0:
                last.append(h[:, -keep:])
        h = self.model.model.norm(torch.cat(last, dim=1) if len(last) > 1 else last[0])
        return self.linear(h[0], self.lm_head_weight, self.lm_head_bias).float()

    def _hidden(self, token_ids: list[int]) -> torch.Tensor:
        """Run the decoder layers over ``token_ids`` (appending them to the cache)."""
        start = self.seq_len
        end = start + len(token_ids)
        ids = torch.tensor([token_ids], dtype=torch.long)
        positions = torch.arange(start, end).unsqueeze(0)
        h = self.model.model.embed_tokens(ids)
        cos, sin = self.model.model.rotary_emb(h, positions)
        if self.native:
            h = torch.ops.pace_core.llama_layers(h, cos, sin, self.native_weights, self.k_cache, self.v_cache, start,
                                                 self.num_heads, self.num_kv_heads, self.head_dim, self.scaling,
                                                 self.norm_eps)
        else:
            h = self._layers(h, cos, sin, start, end)
        self.seq_len = end
        return h

    def attention(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, start: int) -> torch.Tensor:
        """Causal attention of the new queries q (1, H, n, D) over the cache, which holds
        them at start..start+n-1 (query i sees keys 0..start+i): the native op when the
        kernels are built (it picks the few-rows kernel or SDPA, as the C++ loop does),
        else SDPA with a causal mask."""
        if self.few_rows:
            return torch.ops.pace_core.attention(q, k_cache, v_cache, start, self.scaling)
        n = q.shape[2]
        end = start + n
        mask = torch.ones(n, end, dtype=torch.bool).tril(diagonal=start) if n > 1 else None
        return F.scaled_dot_product_attention(q, k_cache[:, :end].unsqueeze(0), v_cache[:, :end].unsqueeze(0),
                                              attn_mask=mask, scale=self.scaling,
                                              enable_gqa=self.num_heads != self.num_kv_heads)

    def _layers(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, start: int, end: int) -> torch.Tensor:
        """The decoder layers in Python (the reference for csrc/llama_layers.cpp)."""
        n = end - start
        H, KV, D = self.num_heads, self.num_kv_heads, self.head_dim
        for i, layer in enumerate(self.layers):
            attn = layer.self_attn
            x = layer.input_layernorm(h)
            q, k, v = self.linear(x, *self.qkv[i]).split([H * D, KV * D, KV * D], dim=-1)
            q = q.view(1, n, H, D)
            k = k.view(1, n, KV, D)
            v = v.view(1, n, KV, D).transpose(1, 2)
            if hasattr(attn, "q_norm"):  # Qwen3
                q, k = attn.q_norm(q), attn.k_norm(k)
            q, k = self.apply_rotary(q.transpose(1, 2), k.transpose(1, 2), cos, sin)
            self.k_cache[i][:, start:end] = k[0]
            self.v_cache[i][:, start:end] = v[0]
            o = self.attention(q, self.k_cache[i], self.v_cache[i], start)
            h = h + self.linear(o.transpose(1, 2).reshape(1, n, H * D), attn.o_proj.weight, attn.o_proj.bias)
            gate, up = self.linear(layer.post_attention_layernorm(h), *self.gate_up[i]).chunk(2, dim=-1)
            h = h + self.linear(layer.mlp.act_fn(gate) * up, layer.mlp.down_proj.weight, layer.mlp.down_proj.bias)
        return h


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
