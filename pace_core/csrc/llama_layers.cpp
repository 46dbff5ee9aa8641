// The decoder layers of a Llama-family model (Llama, Qwen2, Qwen3, Mistral) in one
// call: the same ATen ops, in the same order, as the Python loop in pace_core/lean.py,
// so the results are bit-identical; only the per-op Python overhead (about half of a
// small model's forward on CPU) is gone. Built on first use by pace_core/native.py.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <optional>
#include <vector>

using at::Tensor;

// Up to this many rows (tokens in one forward) use the few-rows kernel.
constexpr int64_t kFewRows = 64;

namespace {

// transformers' LlamaRMSNorm / Qwen2RMSNorm, op for op
Tensor rms_norm(const Tensor& x, const Tensor& weight, double eps) {
  Tensor h = x.to(at::kFloat);
  Tensor variance = h.pow(2).mean(-1, /*keepdim=*/true);
  h = h * at::rsqrt(variance + eps);
  return weight * h.to(x.scalar_type());
}

// transformers' apply_rotary_pos_emb for one of q / k: x * cos + rotate_half(x) * sin
Tensor rotary(const Tensor& x, const Tensor& cos, const Tensor& sin) {
  int64_t half = x.size(-1) / 2;
  Tensor rotated = at::cat({-x.slice(-1, half), x.slice(-1, 0, half)}, -1);
  return x * cos + rotated * sin;
}

}  // namespace

// few_rows.cpp
bool few_rows_linear_supported();
Tensor few_rows_linear(const Tensor& x, const Tensor& weight, const std::optional<Tensor>& bias);
Tensor few_rows_attention(const Tensor& q, const Tensor& k_cache, const Tensor& v_cache, int64_t start, double scaling);
std::string few_rows_isa();

// x @ weight^T + bias: the few-rows kernel for up to kFewRows rows of float32 or
// bfloat16 (bit-identical whatever the row count), the library GEMM otherwise.
Tensor pace_linear(const Tensor& x, const Tensor& weight, const std::optional<Tensor>& bias) {
  const int64_t rows = x.numel() / std::max<int64_t>(x.size(-1), 1);
  const bool dtype_ok = x.scalar_type() == weight.scalar_type() &&
                        (x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16);
  if (rows <= kFewRows && dtype_ok && few_rows_linear_supported())
    return few_rows_linear(x, weight, bias);
  return at::linear(x, weight, bias);
}

int64_t few_rows_limit() { return kFewRows; }

namespace {

// Causal attention of the n new queries over [cache + new] (query i sees keys
// 0..start+i): the few-rows kernel for decode steps and verifies of float32 and bfloat16
// models (each query row computed alone: a verify's rows equal one-token steps'), SDPA
// otherwise.
Tensor attention(const Tensor& q, const Tensor& k_cache, const Tensor& v_cache, int64_t start, double scaling) {
  const int64_t n = q.size(2), end = start + n, H = q.size(1), KV = k_cache.size(0);
  const bool dtype_ok = q.scalar_type() == at::kFloat || q.scalar_type() == at::kBFloat16;
  if (n <= kFewRows && dtype_ok && q.scalar_type() == k_cache.scalar_type() && few_rows_linear_supported())
    return few_rows_attention(q, k_cache, v_cache, start, scaling);
  std::optional<Tensor> mask;
  if (n > 1) mask = at::ones({n, end}, at::kBool).tril(start);
  return at::scaled_dot_product_attention(q, k_cache.slice(1, 0, end).unsqueeze(0), v_cache.slice(1, 0, end).unsqueeze(0),
                                          mask, 0.0, false, scaling, H != KV);
}

Tensor linear(const Tensor& x, const std::optional<Tensor>& weight, const std::optional<Tensor>& bias) {
  TORCH_CHECK(weight.has_value(), "llama_layers: a linear weight is missing");
  return pace_linear(x, *weight, bias);
}

// Weights per layer, in this order (absent ones are None):
enum Slot { IN_NORM, QKV_W, QKV_B, Q_NORM, K_NORM, O_W, O_B, POST_NORM, GATE_UP_W, GATE_UP_B, DOWN_W, DOWN_B, NUM_SLOTS };

Tensor llama_layers(Tensor h, const Tensor& cos_in, const Tensor& sin_in, const std::vector<std::optional<Tensor>>& weights,
                    std::vector<Tensor> k_cache, std::vector<Tensor> v_cache, int64_t start, int64_t num_heads,
                    int64_t num_kv_heads, int64_t head_dim, double scaling, double eps) {
  const int64_t n = h.size(1), end = start + n, H = num_heads, KV = num_kv_heads, D = head_dim;
  TORCH_CHECK(weights.size() == k_cache.size() * NUM_SLOTS, "llama_layers: expected ", NUM_SLOTS, " weights per layer");
  const Tensor cos = cos_in.unsqueeze(1), sin = sin_in.unsqueeze(1);
  for (size_t i = 0; i < k_cache.size(); ++i) {
    const std::optional<Tensor>* w = &weights[i * NUM_SLOTS];
    Tensor x = rms_norm(h, *w[IN_NORM], eps);
    std::vector<Tensor> qkv = linear(x, w[QKV_W], w[QKV_B]).split_with_sizes({H * D, KV * D, KV * D}, -1);
    Tensor q = qkv[0].view({1, n, H, D});
    Tensor k = qkv[1].view({1, n, KV, D});
    Tensor v = qkv[2].view({1, n, KV, D}).transpose(1, 2);
    if (w[Q_NORM].has_value()) {  // Qwen3
      q = rms_norm(q, *w[Q_NORM], eps);
      k = rms_norm(k, *w[K_NORM], eps);
    }
    q = rotary(q.transpose(1, 2), cos, sin);
    k = rotary(k.transpose(1, 2), cos, sin);
    k_cache[i].slice(1, start, end).copy_(k[0]);
    v_cache[i].slice(1, start, end).copy_(v[0]);
    Tensor o = attention(q, k_cache[i], v_cache[i], start, scaling);
    h = h + linear(o.transpose(1, 2).reshape({1, n, H * D}), w[O_W], w[O_B]);
    std::vector<Tensor> gate_up = linear(rms_norm(h, *w[POST_NORM], eps), w[GATE_UP_W], w[GATE_UP_B]).chunk(2, -1);
    h = h + linear(at::silu(gate_up[0]) * gate_up[1], w[DOWN_W], w[DOWN_B]);
  }
  return h;
}

}  // namespace

TORCH_LIBRARY(pace_core, m) {
  m.def(
      "llama_layers(Tensor h, Tensor cos, Tensor sin, Tensor?[] weights, Tensor(a!)[] k_cache, Tensor(b!)[] v_cache, "
      "int start, int num_heads, int num_kv_heads, int head_dim, float scaling, float eps) -> Tensor");
  m.def("linear(Tensor x, Tensor weight, Tensor? bias) -> Tensor");
  m.def("few_rows_limit() -> int", &few_rows_limit);
  m.def("few_rows_isa() -> str", &few_rows_isa);
  m.def("attention(Tensor q, Tensor k_cache, Tensor v_cache, int start, float scaling) -> Tensor");
}

TORCH_LIBRARY_IMPL(pace_core, CPU, m) {
  m.impl("llama_layers", llama_layers);
  m.impl("linear", pace_linear);
  m.impl("attention", attention);
}
