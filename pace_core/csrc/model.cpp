// The whole forward of a Llama-family model (Llama, Qwen2, Qwen3, Mistral without sliding
// window) in one native call: embedding lookup, decoder layers, final norm and output
// projection, over weights packed once at load (kernels.h) in float32, bfloat16, int8 or
// int4. One OpenMP parallel region per forward; the threads split every linear's output
// rows and every attention's heads, and meet at a barrier between stages, so nothing but
// the weights' streaming and the arithmetic is left of a decode step. The residual stream
// and every activation are float32 whatever the weights' format; the KV cache is the
// model's dtype (float32 or bfloat16). Built on first use by pace_core/native.py.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <omp.h>
#include <torch/custom_class.h>
#include <torch/library.h>

#include <chrono>
#include <cstdlib>
#include <string>
#include <vector>

#include "kernels.h"

namespace pace {

// ---------------------------------------------------------------- instruction sets
namespace {

#define PACE_FILL(table, fmt, fn, n)                                                                        \
  do {                                                                                                      \
    PanelsFn fns[] = {nullptr, fn<1>, fn<2>, fn<3>, fn<4>, fn<5>, fn<6>, fn<7>, fn<8>, fn<9>, fn<10>, fn<11>, \
                      fn<12>, fn<13>};                                                                      \
    for (int mb = 1; mb <= (n); ++mb) (table).panels[fmt][mb] = fns[mb];                                    \
    (table).max_pass[fmt] = (n);                                                                            \
  } while (0)

template <class V>
void attend_f32(const float* q, const void* k, const void* v, int64_t L, int64_t D, float scale, float* o, float* s) {
  attend_row<V, float>(q, static_cast<const float*>(k), static_cast<const float*>(v), L, D, scale, o, s);
}
template <class V>
void attend_bf16(const float* q, const void* k, const void* v, int64_t L, int64_t D, float scale, float* o, float* s) {
  attend_row<V, uint16_t>(q, static_cast<const uint16_t*>(k), static_cast<const uint16_t*>(v), L, D, scale, o, s);
}
PACE_AVX512_FN void attend_f32_avx512(const float* q, const void* k, const void* v, int64_t L, int64_t D, float scale,
                                      float* o, float* s) {
  attend_f32<Avx512>(q, k, v, L, D, scale, o, s);
}
PACE_AVX512_FN void attend_bf16_avx512(const float* q, const void* k, const void* v, int64_t L, int64_t D, float scale,
                                       float* o, float* s) {
  attend_bf16<Avx512>(q, k, v, L, D, scale, o, s);
}
PACE_AVX2_FN void attend_f32_avx2(const float* q, const void* k, const void* v, int64_t L, int64_t D, float scale,
                                  float* o, float* s) {
  attend_f32<Avx2>(q, k, v, L, D, scale, o, s);
}
PACE_AVX2_FN void attend_bf16_avx2(const float* q, const void* k, const void* v, int64_t L, int64_t D, float scale,
                                   float* o, float* s) {
  attend_bf16<Avx2>(q, k, v, L, D, scale, o, s);
}
PACE_AVX512_FN void norm_avx512(const float* x, const float* w, float* y, int64_t n, float eps) {
  rms_norm_row<Avx512>(x, w, y, n, eps);
}
PACE_AVX2_FN void norm_avx2(const float* x, const float* w, float* y, int64_t n, float eps) {
  rms_norm_row<Avx2>(x, w, y, n, eps);
}
PACE_AVX512_FN void quantize_avx512(const float* x, int64_t kp, int8_t* q, int64_t stride, float* s, int32_t* c,
                                    int32_t zp) {
  quantize_row<Avx512>(x, kp, q, stride, s, c, zp);
}
PACE_AVX2_FN void quantize_avx2(const float* x, int64_t kp, int8_t* q, int64_t stride, float* s, int32_t* c,
                                int32_t zp) {
  quantize_row<Avx2>(x, kp, q, stride, s, c, zp);
}

Isa pick_isa() {
  Isa t;
  __builtin_cpu_init();
  const char* forced = std::getenv("PACE_KERNEL_ISA");
  const std::string want = forced ? forced : "";
  const bool avx512 = want != "avx2" && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
  if (avx512) {
    PACE_FILL(t, F32, panels_f32_avx512, 13);
    t.bf16_dot = want != "avx512" && __builtin_cpu_supports("avx512bf16");
    if (t.bf16_dot)
      PACE_FILL(t, BF16, panels_bf16dp_avx512, 13);
    else
      PACE_FILL(t, BF16, panels_bf16_avx512, 12);
    if (want != "avx512" && __builtin_cpu_supports("avx512vnni")) {  // else as Skylake-X: AVX2 integer sums
      PACE_FILL(t, INT8, panels_int8_avx512, 13);
      PACE_FILL(t, INT4, panels_int4_avx512, 13);
    } else {
      PACE_FILL(t, INT8, panels_int8_avx2, 2);
      PACE_FILL(t, INT4, panels_int4_avx2, 2);
    }
    t.name = t.bf16_dot ? "avx512-bf16" : "avx512";
    t.attend_f32 = attend_f32_avx512;
    t.attend_bf16 = attend_bf16_avx512;
    t.rms_norm = norm_avx512;
    t.quantize = quantize_avx512;
  } else if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) {
    PACE_FILL(t, F32, panels_f32_avx2, 3);
    PACE_FILL(t, BF16, panels_bf16_avx2, 3);
    PACE_FILL(t, INT8, panels_int8_avx2, 2);
    PACE_FILL(t, INT4, panels_int4_avx2, 2);
    t.name = "avx2";
    t.attend_f32 = attend_f32_avx2;
    t.attend_bf16 = attend_bf16_avx2;
    t.rms_norm = norm_avx2;
    t.quantize = quantize_avx2;
  }
  return t;
}

}  // namespace

const Isa& isa() {
  static const Isa t = pick_isa();
  return t;
}

namespace {

bool available() { return isa().max_pass[F32] > 0; }

// ---------------------------------------------------------------- packing
// A float matrix's element (n, k) as float32, for any source dtype
struct Rows {
  const at::Tensor& t;
  float at(int64_t n, int64_t k) const {
    switch (t.scalar_type()) {
      case at::kFloat: return t.data_ptr<float>()[n * t.stride(0) + k * t.stride(1)];
      case at::kBFloat16: return float(t.data_ptr<at::BFloat16>()[n * t.stride(0) + k * t.stride(1)]);
      case at::kHalf: return float(t.data_ptr<at::Half>()[n * t.stride(0) + k * t.stride(1)]);
      default: TORCH_CHECK(false, "pack: float32, bfloat16 or float16 weights only");
    }
  }
};

// std::nearbyint in the default rounding mode (half to even), inline: exact for |x| < 2^23
// (and inf / NaN), the only inputs here (a weight over its scale); nearbyint itself is a
// libm call that kept the int4 scale search from vectorizing (a 7B took minutes to pack)
inline float round_even(float x) { return (x + 12582912.0f) - 12582912.0f; }

// int4 scale of one group of 64: the extreme value maps to -8 (q4_0's choice of sign
// uses the whole [-8, 7] range), refined by a small search for the least squared error
float int4_scale(const float* w) {
  float ext = 0.0f;
  for (int i = 0; i < kGroup; ++i)
    if (std::fabs(w[i]) > std::fabs(ext)) ext = w[i];
  if (ext == 0.0f) return 0.0f;
  float best = ext / -8.0f, best_err = INFINITY;
  for (int step = -6; step <= 6; ++step) {
    const float d = ext / (-8.0f + 0.125f * step), inv = 1.0f / d;
    float err = 0.0f;
    for (int i = 0; i < kGroup; ++i) {
      const float q = std::max(-8.0f, std::min(7.0f, round_even(w[i] * inv)));
      const float e = w[i] - q * d;
      err += e * e;
    }
    if (err < best_err) best_err = err, best = d;
  }
  return best;
}

// (packed weights as bytes, scales) of weight (N, K) in format fmt
std::vector<at::Tensor> pack(const at::Tensor& weight, int64_t fmt) {
  TORCH_CHECK(weight.dim() == 2, "pack: a 2-d weight");
  TORCH_CHECK(fmt >= 0 && fmt < NUM_FORMATS, "pack: unknown format ", fmt);
  const at::Tensor w = weight.contiguous();
  const int64_t N = w.size(0), K = w.size(1), Np = round_up(N, kPanel), Kp = round_up(K, k_align(fmt));
  const int64_t se = step_elems(fmt), steps = Kp / se, groups = Kp / kGroup, pbytes = panel_bytes(fmt, Kp);
  at::Tensor packed = at::zeros({Np / kPanel * pbytes}, at::kByte);
  at::Tensor scale;
  if (fmt == INT8) scale = at::zeros({Np}, at::kFloat);
  if (fmt == INT4) scale = at::zeros({Np * groups}, at::kFloat);
  uint8_t* out = packed.data_ptr<uint8_t>();
  float* sp = scale.defined() ? scale.data_ptr<float>() : nullptr;
  const Rows src{w};
  at::parallel_for(0, Np / kPanel, 1, [&](int64_t p0, int64_t p1) {
    std::vector<float> row(Kp);
    for (int64_t p = p0; p < p1; ++p)
      for (int r = 0; r < kPanel; ++r) {
        const int64_t n = p * kPanel + r;
        std::fill(row.begin(), row.end(), 0.0f);
        if (n < N)
          for (int64_t k = 0; k < K; ++k) row[k] = src.at(n, k);
        // row r's 4 bytes of k-step s
        auto dst = [&](int64_t s) { return out + p * pbytes + (s * kPanel + r) * kStepBytes; };
        if (fmt == F32) {
          for (int64_t s = 0; s < steps; ++s) std::memcpy(dst(s), &row[s], 4);
        } else if (fmt == BF16) {  // low half: the even k
          for (int64_t s = 0; s < steps; ++s) {
            const uint16_t pair[2] = {float_to_bf16(row[2 * s]), float_to_bf16(row[2 * s + 1])};
            std::memcpy(dst(s), pair, 4);
          }
        } else if (fmt == INT8) {  // per row: scale = max|w| / 127, u8 = q + 128
          float amax = 0.0f;
          for (float v : row) amax = std::max(amax, std::fabs(v));
          const float inv = amax > 0.0f ? 127.0f / amax : 0.0f;
          sp[n] = amax / 127.0f;
          for (int64_t s = 0; s < steps; ++s)
            for (int j = 0; j < 4; ++j)
              dst(s)[j] = uint8_t(int(std::max(-127.0f, std::min(127.0f, round_even(row[4 * s + j] * inv)))) + 128);
        } else {  // INT4, per group of 64: nibbles q + 8; byte j: element j low, element 4 + j high
          for (int64_t g = 0; g < groups; ++g) {
            const float* wg = &row[g * kGroup];
            const float d = int4_scale(wg), inv = d != 0.0f ? 1.0f / d : 0.0f;
            sp[(p * groups + g) * kPanel + r] = d;
            auto q = [&](int i) { return int(std::max(-8.0f, std::min(7.0f, round_even(wg[i] * inv)))) + 8; };
            for (int64_t s = 0; s < kGroup / 8; ++s)
              for (int j = 0; j < 4; ++j) dst(g * kGroup / 8 + s)[j] = uint8_t(q(8 * s + j) | (q(8 * s + 4 + j) << 4));
          }
        }
      }
  });
  return {packed, scale.defined() ? scale : at::empty({0}, at::kFloat)};
}

// Row n of a packed linear's weight, as float32 (the dequantized values)
void unpack_row(const Linear& L, int64_t n, float* out) {
  const int64_t p = n / kPanel, r = n % kPanel, se = step_elems(L.fmt), pbytes = panel_bytes(L.fmt, L.Kp);
  for (int64_t k = 0; k < L.K; ++k) {
    const int64_t s = k / se, j = k % se;
    const uint8_t* src = L.w + p * pbytes + (s * kPanel + r) * kStepBytes;
    switch (L.fmt) {
      case F32: std::memcpy(&out[k], src, 4); break;
      case BF16: out[k] = bf16_to_float(reinterpret_cast<const uint16_t*>(src)[j]); break;
      case INT8: out[k] = float(int(src[j]) - 128) * L.scale[n]; break;
      default: {
        const int nib = j < 4 ? src[j] & 15 : src[j - 4] >> 4;
        out[k] = float(nib - 8) * L.scale[(p * L.groups() + k / kGroup) * kPanel + r];
      }
    }
  }
}

// ---------------------------------------------------------------- running a linear
constexpr int64_t kMaxRows = 64;  // rows of one forward (longer prompts run in chunks of it)

// Scratch for the prepared inputs of one linear call (rows x Kp)
struct Prepared {
  std::vector<uint16_t> bf16;
  std::vector<int32_t> quads;  // int8 inputs, 4 per int32, rows side by side (Act::quads)
  std::vector<float> scale;
  std::vector<int32_t> corr;
  void reserve(int64_t rows, int64_t kp) {
    bf16.assign(rows * kp, 0);
    quads.assign(rows * kp / 4 + 1, 0);
    scale.assign(rows * (kp / kGroup + 1), 0.0f);
    corr.assign(rows * (kp / kGroup + 1), 0);
  }
};

bool needs_prepare(const Linear& L) { return L.fmt == INT8 || L.fmt == INT4 || (L.fmt == BF16 && isa().bf16_dot); }

// Row m of the `rows` rows of x (float32, its padding zero) in the form L's kernel reads
void prepare_row(const Linear& L, const float* x, int64_t m, int64_t rows, Prepared& p) {
  if (L.fmt == BF16) {
    uint16_t* d = p.bf16.data() + m * L.Kp;
    for (int64_t k = 0; k < L.Kp; ++k) d[k] = float_to_bf16(x[k]);
  } else if (L.fmt == INT8 || L.fmt == INT4) {
    isa().quantize(x, L.Kp, reinterpret_cast<int8_t*>(p.quads.data() + m), 4 * rows, p.scale.data() + m * L.groups(),
                   p.corr.data() + m * L.groups(), L.fmt == INT8 ? 128 : 8);
  }
}

Act act_of(const Linear& L, const float* x, int64_t ldx, int64_t rows, const Prepared& p);

// Every one of the `rows` rows of x prepared (one thread), and the Act L's kernel reads
Act prepared_act(const Linear& L, const float* x, int64_t ldx, int64_t rows, Prepared& p) {
  if (needs_prepare(L))
    for (int64_t m = 0; m < rows; ++m) prepare_row(L, x + m * ldx, m, rows, p);
  return act_of(L, x, ldx, rows, p);
}

Act act_of(const Linear& L, const float* x, int64_t ldx, int64_t rows, const Prepared& p) {
  Act a;
  if (!needs_prepare(L)) {
    a.f32 = x;
    a.ld = ldx;
  } else {
    a.bf16 = p.bf16.data();
    a.quads = p.quads.data();
    a.qscale = p.scale.data();
    a.qcorr = p.corr.data();
    a.ld = L.Kp;
    a.groups = L.groups();
    a.rows = rows;
  }
  return a;
}

// Software prefetch distance of a pass over 2+ rows: its arithmetic per cache line is then
// enough for the hardware prefetchers to fall behind the memory latency (measured,
// Qwen2.5-0.5B shape, int8, 9 rows: 24.6 -> 13.6 ms a forward). One row streams fast
// enough for them alone.
constexpr int64_t kPrefetchAhead = 8192;

// Rows 0..M-1 against panels [p0, p1): passes of at most max_pass rows (balanced); with
// several passes, tiles of panels that stay in L2 while every pass reads them, the first
// pass prefetching the next tile (the memory stream goes on while later passes compute)
void linear_panels(const Linear& L, const Act& a, int64_t M, float* y, int64_t ldy, int64_t p0, int64_t p1, Out mode) {
  const Isa& I = isa();
  const int max_pass = I.max_pass[L.fmt];
  TORCH_CHECK(max_pass > 0, "no kernel for this weight format on this CPU");
  const int64_t passes = (M + max_pass - 1) / max_pass;
  if (passes == 1) {
    I.panels[L.fmt][M](L, a, 0, y, ldy, p0, p1, mode, M > 1 ? kPrefetchAhead : 0);
    return;
  }
  const int64_t pbytes = panel_bytes(L.fmt, L.Kp);
  const int64_t tile = std::max<int64_t>(1, (128 << 10) / pbytes);
  for (int64_t t0 = p0; t0 < p1; t0 += tile) {
    const int64_t t1 = std::min(p1, t0 + tile);
    for (int64_t p = 0, m = 0; p < passes; ++p) {
      const int64_t mb = (M - m) / (passes - p);
      I.panels[L.fmt][mb](L, a, m, y, ldy, t0, t1, mode, p == 0 && t1 < p1 ? (t1 - t0) * pbytes : 0);
      m += mb;
    }
  }
}

inline std::pair<int64_t, int64_t> share(int64_t count, int t, int T) { return {count * t / T, count * (t + 1) / T}; }

// ---------------------------------------------------------------- the model
// gate and up are packed interleaved in runs of 16 units, one panel each: [gate 0..15 | up
// 0..15], [gate 16..31 | up 16..31]...; the panel's kernel stores silu(gate) * up (Out::SILU_MUL)
constexpr int64_t kRun = kPanel / 2;

struct Layer {
  Linear qkv, o, gate_up, down;
  const float *in_norm = nullptr, *post_norm = nullptr, *q_norm = nullptr, *k_norm = nullptr;
};

class Model : public torch::CustomClassHolder {
 public:
  Model(c10::Dict<std::string, at::Tensor> tensors, c10::Dict<std::string, int64_t> ints,
        c10::Dict<std::string, double> floats)
      : tensors_(std::move(tensors)) {
    TORCH_CHECK(available(), "the native kernels need a CPU with AVX2 and FMA");
    auto i = [&](const std::string& k) { return ints.at(k); };
    hidden_ = i("hidden");
    heads_ = i("heads");
    kv_heads_ = i("kv_heads");
    head_dim_ = i("head_dim");
    units_ = i("units");  // intermediate size padded to kRun
    vocab_ = i("vocab");
    logit_rows_ = i("logit_rows");
    eps_ = float(floats.at("eps"));
    scaling_ = float(floats.at("scaling"));
    const int64_t num_layers = i("layers");
    for (int64_t l = 0; l < num_layers; ++l) {
      const std::string p = "layers." + std::to_string(l) + ".";
      Layer L;
      L.qkv = linear(p + "qkv", ints);
      L.o = linear(p + "o", ints);
      L.gate_up = linear(p + "gate_up", ints);
      L.down = linear(p + "down", ints);
      L.in_norm = floats_of(p + "in_norm");
      L.post_norm = floats_of(p + "post_norm");
      L.q_norm = floats_of(p + "q_norm", false);
      L.k_norm = floats_of(p + "k_norm", false);
      TORCH_CHECK(L.gate_up.N == 2 * units_ && L.down.K <= units_ + kRun, "gate_up / down shapes do not match");
      layers_.push_back(L);
    }
    has_head_ = tensors_.contains("head.w");
    if (has_head_) {
      head_ = linear("head", ints);
      final_norm_ = floats_of("final_norm");
    }
    if (tensors_.contains("embed")) {
      embed_ = tensors_.at("embed");
      TORCH_CHECK(embed_.dim() == 2 && embed_.size(1) == hidden_ && embed_.is_contiguous(), "embed: (vocab, hidden)");
    } else {
      TORCH_CHECK(has_head_ && head_.K == hidden_, "no embedding and no tied output projection to read it from");
    }
    // scratch for kMaxRows rows; float buffers zero beyond their logical width
    int64_t in_kp = 0;  // padded width of the inputs of qkv, gate_up and head (all hidden wide)
    for (auto& L : layers_) in_kp = std::max({in_kp, L.qkv.Kp, L.gate_up.Kp});
    if (has_head_) in_kp = std::max(in_kp, head_.Kp);
    ld_h_ = round_up(hidden_, kGroup);
    ld_xn_ = std::max(in_kp, ld_h_);
    ld_attn_ = round_up(heads_ * head_dim_, kGroup);
    ld_act_ = round_up(units_, kGroup);
    ld_qkv_ = 0;
    int64_t max_kp = ld_xn_;
    for (auto& L : layers_) {
      ld_qkv_ = std::max(ld_qkv_, L.qkv.Np);
      ld_attn_ = std::max(ld_attn_, L.o.Kp);
      ld_act_ = std::max(ld_act_, L.down.Kp);
      max_kp = std::max({max_kp, L.o.Kp, L.down.Kp});
    }
    h_.assign(kMaxRows * ld_h_, 0.0f);
    xn_.assign(kMaxRows * ld_xn_, 0.0f);
    qkv_.assign(kMaxRows * ld_qkv_, 0.0f);
    attn_.assign(kMaxRows * ld_attn_, 0.0f);
    act_.assign(kMaxRows * ld_act_, 0.0f);
    prepared_.reserve(kMaxRows, max_kp);
  }

  void set_cache(std::vector<at::Tensor> k, std::vector<at::Tensor> v) {
    TORCH_CHECK(k.size() == layers_.size() && v.size() == layers_.size(), "set_cache: one K and one V per layer");
    for (size_t l = 0; l < k.size(); ++l)
      TORCH_CHECK(k[l].is_contiguous() && v[l].is_contiguous() && k[l].dim() == 3 && k[l].size(0) == kv_heads_ &&
                      k[l].size(2) == head_dim_ && k[l].sizes() == v[l].sizes() &&
                      (k[l].scalar_type() == at::kFloat || k[l].scalar_type() == at::kBFloat16) &&
                      v[l].scalar_type() == k[l].scalar_type(),
                  "set_cache: contiguous (kv_heads, capacity, head_dim) float32 or bfloat16 tensors");
    k_cache_ = std::move(k);
    v_cache_ = std::move(v);
  }

  void set_logit_rows(int64_t rows) {
    TORCH_CHECK(has_head_ && rows >= 1 && rows <= head_.N, "set_logit_rows: 1..", head_.N);
    logit_rows_ = rows;
  }

  // Appends ids (n <= 64 positions start..start+n-1) to the cache; returns the float32
  // logits of the last num_logits positions (num_logits, logit_rows), or with
  // num_logits == 0 the hidden states after the last layer (n, hidden).
  at::Tensor forward(const at::Tensor& ids_in, const at::Tensor& cos_in, const at::Tensor& sin_in, int64_t start,
                     int64_t num_logits) {
    const at::Tensor ids = ids_in.to(at::kLong).contiguous();
    const int64_t n = ids.numel();
    TORCH_CHECK(n >= 1 && n <= kMaxRows, "forward: 1..", kMaxRows, " tokens at a time (got ", n, ")");
    TORCH_CHECK(num_logits >= 0 && num_logits <= n, "forward: num_logits must be 0..", n);
    TORCH_CHECK(num_logits == 0 || has_head_, "forward: this model has no output projection");
    TORCH_CHECK(!k_cache_.empty() || layers_.empty(), "forward: set_cache first");
    TORCH_CHECK(layers_.empty() || start + n <= k_cache_[0].size(1), "forward: the cache holds ",
                layers_.empty() ? 0 : k_cache_[0].size(1), " positions, ", start + n, " needed");
    const at::Tensor cos = cos_in.to(at::kFloat).reshape({n, head_dim_}).contiguous();
    const at::Tensor sin = sin_in.to(at::kFloat).reshape({n, head_dim_}).contiguous();
    const int64_t* idp = ids.data_ptr<int64_t>();
    for (int64_t m = 0; m < n; ++m) TORCH_CHECK(idp[m] >= 0 && idp[m] < vocab_, "forward: token id ", idp[m], " out of range");
    at::Tensor out = num_logits ? at::empty({num_logits, logit_rows_}, at::kFloat) : at::empty({n, hidden_}, at::kFloat);
    run(idp, n, cos.data_ptr<float>(), sin.data_ptr<float>(), start, num_logits, out.data_ptr<float>());
    return out;
  }

  int64_t logit_rows() const { return logit_rows_; }

  // Where forwards spend their time, by stage (seconds summed over the forwards since
  // profiling was turned on; thread 0's view: a stage's time includes waiting for the
  // other threads at its closing barrier)
  void set_profiling(bool on) {
    profiling_ = on;
    stage_seconds_.assign(kStages, 0.0);
  }
  c10::Dict<std::string, double> profile() const {
    c10::Dict<std::string, double> out;
    for (int i = 0; i < kStages && i < int(stage_seconds_.size()); ++i) out.insert(kStageNames[i], stage_seconds_[i]);
    return out;
  }

 private:
  Linear linear(const std::string& name, const c10::Dict<std::string, int64_t>& ints) {
    Linear L;
    L.fmt = int32_t(ints.at(name + ".fmt"));
    L.N = ints.at(name + ".N");
    L.K = ints.at(name + ".K");
    L.Np = round_up(L.N, kPanel);
    L.Kp = round_up(L.K, k_align(L.fmt));
    const at::Tensor& w = tensors_.at(name + ".w");
    TORCH_CHECK(w.scalar_type() == at::kByte && w.numel() == L.Np / kPanel * panel_bytes(L.fmt, L.Kp),
                name, ": packed weight of the wrong size");
    L.w = w.data_ptr<uint8_t>();
    if (L.fmt == INT8 || L.fmt == INT4) {
      const at::Tensor& s = tensors_.at(name + ".scale");
      TORCH_CHECK(s.scalar_type() == at::kFloat && s.numel() == (L.fmt == INT8 ? L.Np : L.Np * L.groups()),
                  name, ": scales of the wrong size");
      L.scale = s.data_ptr<float>();
    }
    if (tensors_.contains(name + ".bias")) {  // zero-padded to Np: the kernels read whole panels
      at::Tensor bias = at::zeros({L.Np}, at::kFloat);
      bias.slice(0, 0, L.N).copy_(tensors_.at(name + ".bias").reshape({-1}));
      owned_.push_back(bias);
      L.bias = bias.data_ptr<float>();
    }
    TORCH_CHECK(isa().max_pass[L.fmt] > 0, name, ": no kernel for its weight format on this CPU");
    return L;
  }

  const float* floats_of(const std::string& name, bool required = true) {
    if (!tensors_.contains(name)) {
      TORCH_CHECK(!required, "missing tensor ", name);
      return nullptr;
    }
    const at::Tensor& t = tensors_.at(name);
    TORCH_CHECK(t.scalar_type() == at::kFloat && t.is_contiguous(), name, ": contiguous float32 expected");
    return t.data_ptr<float>();
  }

  void embed_row(int64_t id, float* out) const {
    if (!embed_.defined()) return unpack_row(head_, id, out);
    switch (embed_.scalar_type()) {
      case at::kFloat: std::memcpy(out, embed_.data_ptr<float>() + id * hidden_, hidden_ * 4); break;
      case at::kBFloat16: {
        const at::BFloat16* e = embed_.data_ptr<at::BFloat16>() + id * hidden_;
        for (int64_t k = 0; k < hidden_; ++k) out[k] = float(e[k]);
        break;
      }
      case at::kHalf: {
        const at::Half* e = embed_.data_ptr<at::Half>() + id * hidden_;
        for (int64_t k = 0; k < hidden_; ++k) out[k] = float(e[k]);
        break;
      }
      default: TORCH_CHECK(false, "embed: float32, bfloat16 or float16");
    }
  }

  // every stage below is split over the T threads of one parallel region; a barrier
  // separates a stage from the next one that reads what it wrote
  void run(const int64_t* ids, int64_t n, const float* cos, const float* sin, int64_t start, int64_t num_logits,
           float* out) {
    const Isa& I = isa();
    const int64_t H = heads_, KV = kv_heads_, D = head_dim_, group = H / KV, half = D / 2;
    const bool bf16_cache = !k_cache_.empty() && k_cache_[0].scalar_type() == at::kBFloat16;
    float* h = h_.data();
    float* xn = xn_.data();
    float* qkv = qkv_.data();
    float* attn = attn_.data();
    float* act = act_.data();
    Prepared& prep = prepared_;
    using Clock = std::chrono::steady_clock;
    auto last = Clock::now();
#pragma omp parallel num_threads(at::get_num_threads())
    {
      const int t = omp_get_thread_num(), T = omp_get_num_threads();
      auto mark = [&](Stage stage) {  // after a stage's closing barrier
        if (!profiling_ || t != 0) return;
        const auto now = Clock::now();
        stage_seconds_[stage] += std::chrono::duration<double>(now - last).count();
        last = now;
      };
      std::vector<float> scores(start + n + 16);
      auto [r0, r1] = share(n, t, T);
      // this thread's panels of L over the `rows` rows of x (prepared in prep where L needs it)
      auto linear = [&](const Linear& L, const float* x, int64_t ldx, int64_t rows, float* y, int64_t ldy, Out mode) {
        auto [p0, p1] = share(L.panels(), t, T);
        linear_panels(L, act_of(L, x, ldx, rows, prep), rows, y, ldy, p0, p1, mode);
      };
      // a linear whose input rows are not prepared yet: this thread's rows, then the linear
      auto prepare_and_linear = [&](const Linear& L, const float* x, int64_t ldx, float* y, int64_t ldy, Out mode,
                                    Stage prep_stage, Stage stage) {
        if (needs_prepare(L)) {
          for (int64_t m = r0; m < r1; ++m) prepare_row(L, x + m * ldx, m, n, prep);
#pragma omp barrier
          mark(prep_stage);
        }
        linear(L, x, ldx, n, y, ldy, mode);
#pragma omp barrier
        mark(stage);
      };
      for (int64_t m = r0; m < r1; ++m) embed_row(ids[m], h + m * ld_h_);
#pragma omp barrier
        mark(EMBED);
      for (size_t l = 0; l < layers_.size(); ++l) {
        const Layer& L = layers_[l];
        // input norm, prepared for qkv
        for (int64_t m = r0; m < r1; ++m) {
          I.rms_norm(h + m * ld_h_, L.in_norm, xn + m * ld_xn_, hidden_, eps_);
          if (needs_prepare(L.qkv)) prepare_row(L.qkv, xn + m * ld_xn_, m, n, prep);
        }
#pragma omp barrier
        mark(NORM);
        linear(L.qkv, xn, ld_xn_, n, qkv, ld_qkv_, STORE);
#pragma omp barrier
        mark(QKV);
        // q/k norms (Qwen3), rotary embedding, K and V into the cache
        {
          char* kc = static_cast<char*>(k_cache_[l].data_ptr());
          char* vc = static_cast<char*>(v_cache_[l].data_ptr());
          const int64_t cap = k_cache_[l].size(1), esize = k_cache_[l].element_size();
          auto [i0, i1] = share(n * (H + 2 * KV), t, T);
          for (int64_t item = i0; item < i1; ++item) {
            const int64_t m = item / (H + 2 * KV), head = item % (H + 2 * KV);
            float* x = qkv + m * ld_qkv_ + head * D;
            if (head < H + KV) {
              const float* nw = head < H ? L.q_norm : L.k_norm;
              if (nw) I.rms_norm(x, nw, x, D, eps_);
              const float *c = cos + m * D, *s = sin + m * D;
              for (int64_t j = 0; j < half; ++j) {
                const float a = x[j], b = x[j + half];
                x[j] = a * c[j] - b * s[j];
                x[j + half] = b * c[j + half] + a * s[j + half];
              }
              if (head < H) continue;
            }
            const bool is_k = head < H + KV;
            const int64_t kvh = is_k ? head - H : head - H - KV;
            char* dst = (is_k ? kc : vc) + ((kvh * cap) + start + m) * D * esize;
            if (bf16_cache) {
              uint16_t* d = reinterpret_cast<uint16_t*>(dst);
              for (int64_t j = 0; j < D; ++j) d[j] = float_to_bf16(x[j]);
            } else {
              std::memcpy(dst, x, D * 4);
            }
          }
        }
#pragma omp barrier
        mark(ROPE);
        // attention, (head, row) items
        {
          const char* kc = static_cast<const char*>(k_cache_[l].data_ptr());
          const char* vc = static_cast<const char*>(v_cache_[l].data_ptr());
          const int64_t head_bytes = k_cache_[l].size(1) * D * k_cache_[l].element_size();
          const AttendFn attend = bf16_cache ? I.attend_bf16 : I.attend_f32;
          auto [i0, i1] = share(H * n, t, T);
          for (int64_t item = i0; item < i1; ++item) {
            const int64_t hq = item / n, m = item % n, g = hq / group;
            attend(qkv + m * ld_qkv_ + hq * D, kc + g * head_bytes, vc + g * head_bytes, start + m + 1, D, scaling_,
                   attn + m * ld_attn_ + hq * D, scores.data());
          }
        }
#pragma omp barrier
        mark(ATTENTION);
        prepare_and_linear(L.o, attn, ld_attn_, h, ld_h_, ADD, O_PREP, O);
        for (int64_t m = r0; m < r1; ++m) {
          I.rms_norm(h + m * ld_h_, L.post_norm, xn + m * ld_xn_, hidden_, eps_);
          if (needs_prepare(L.gate_up)) prepare_row(L.gate_up, xn + m * ld_xn_, m, n, prep);
        }
#pragma omp barrier
        mark(POST_NORM);
        linear(L.gate_up, xn, ld_xn_, n, act, ld_act_, SILU_MUL);  // silu(gate) * up, a panel (16 units) at a time
#pragma omp barrier
        mark(GATE_UP);
        prepare_and_linear(L.down, act, ld_act_, h, ld_h_, ADD, DOWN_PREP, DOWN);
      }
      if (num_logits == 0) {
        for (int64_t m = r0; m < r1; ++m) std::memcpy(out + m * hidden_, h + m * ld_h_, hidden_ * 4);
      } else {
        // the last num_logits rows: final norm, output projection over the first logit_rows ids
        auto [q0, q1] = share(num_logits, t, T);
        for (int64_t j = q0; j < q1; ++j) {
          I.rms_norm(h + (n - num_logits + j) * ld_h_, final_norm_, xn + j * ld_xn_, hidden_, eps_);
          if (needs_prepare(head_)) prepare_row(head_, xn + j * ld_xn_, j, num_logits, prep);
        }
#pragma omp barrier
        mark(HEAD_NORM);
        Linear head = head_;
        head.N = logit_rows_;
        head.Np = round_up(logit_rows_, kPanel);
        linear(head, xn, ld_xn_, num_logits, out, logit_rows_, STORE);
#pragma omp barrier
        mark(HEAD);
      }
    }
  }

  enum Stage { EMBED, NORM, QKV, ROPE, ATTENTION, O_PREP, O, POST_NORM, GATE_UP, DOWN_PREP, DOWN, HEAD_NORM, HEAD, kStages };
  static constexpr const char* kStageNames[kStages] = {"embed", "norm", "qkv", "rope_cache", "attention", "o_prepare",
                                                       "o", "post_norm", "gate_up_silu", "down_prepare", "down",
                                                       "head_norm", "head"};
  bool profiling_ = false;
  std::vector<double> stage_seconds_;

  c10::Dict<std::string, at::Tensor> tensors_;  // owns every array the pointers below read
  int64_t hidden_ = 0, heads_ = 0, kv_heads_ = 0, head_dim_ = 0, units_ = 0, vocab_ = 0, logit_rows_ = 0;
  float eps_ = 1e-6f, scaling_ = 1.0f;
  std::vector<Layer> layers_;
  bool has_head_ = false;
  Linear head_;
  const float* final_norm_ = nullptr;
  at::Tensor embed_;
  std::vector<at::Tensor> k_cache_, v_cache_;
  int64_t ld_h_ = 0, ld_xn_ = 0, ld_qkv_ = 0, ld_attn_ = 0, ld_act_ = 0;
  std::vector<at::Tensor> owned_;  // padded copies (biases)
  std::vector<float> h_, xn_, qkv_, attn_, act_;
  Prepared prepared_;
};

// ---------------------------------------------------------------- standalone ops (tests, profiling)
// The Linear of a packed (N, K) weight in format fmt (its scales for int8/int4)
Linear standalone_linear(const at::Tensor& packed, const at::Tensor& scale, int64_t fmt, int64_t N, int64_t K,
                         const char* op) {
  Linear L;
  L.fmt = int32_t(fmt);
  L.N = N;
  L.K = K;
  L.Np = round_up(N, kPanel);
  L.Kp = round_up(K, k_align(fmt));
  TORCH_CHECK(packed.numel() == L.Np / kPanel * panel_bytes(L.fmt, L.Kp), op, ": packed weight of the wrong size");
  L.w = packed.data_ptr<uint8_t>();
  if (fmt == INT8 || fmt == INT4) L.scale = scale.data_ptr<float>();
  return L;
}

// y = x @ W^T (+ bias) for x (M, K) float32 and a packed weight
at::Tensor linear_op(const at::Tensor& x_in, const at::Tensor& packed, const at::Tensor& scale,
                     const std::optional<at::Tensor>& bias_in, int64_t fmt, int64_t N) {
  TORCH_CHECK(available(), "the native kernels need a CPU with AVX2 and FMA");
  const int64_t K = x_in.size(-1);
  Linear L = standalone_linear(packed, scale, fmt, N, K, "linear");
  at::Tensor bias;
  if (bias_in.has_value() && bias_in->defined()) {
    bias = at::zeros({L.Np}, at::kFloat);
    bias.slice(0, 0, N).copy_(bias_in->reshape({-1}));
    L.bias = bias.data_ptr<float>();
  }
  at::Tensor x = at::zeros({x_in.numel() / K, L.Kp}, at::kFloat);
  x.slice(1, 0, K).copy_(x_in.reshape({-1, K}));
  const int64_t M = x.size(0);
  at::Tensor y = at::empty({M, N}, at::kFloat);
  Prepared prep;
  prep.reserve(std::min(M, kMaxRows), L.Kp);
  for (int64_t m0 = 0; m0 < M; m0 += kMaxRows) {
    const int64_t rows = std::min(kMaxRows, M - m0);
    const float* xp = x.data_ptr<float>() + m0 * L.Kp;
    const Act a = prepared_act(L, xp, L.Kp, rows, prep);
#pragma omp parallel num_threads(at::get_num_threads())
    {
      auto [p0, p1] = share(L.panels(), omp_get_thread_num(), omp_get_num_threads());
      linear_panels(L, a, rows, y.data_ptr<float>() + m0 * N, N, p0, p1, STORE);
    }
  }
  std::vector<int64_t> shape(x_in.sizes().begin(), x_in.sizes().end());
  shape.back() = N;
  return y.view(shape);
}

// Causal attention of n query rows q (H, n, D) float32 over a cache (KV, capacity, D) that
// holds them at start..start+n-1: query i sees keys 0..start+i
at::Tensor attention_op(const at::Tensor& q_in, const at::Tensor& k_cache, const at::Tensor& v_cache, int64_t start,
                        double scaling) {
  TORCH_CHECK(available(), "the native kernels need a CPU with AVX2 and FMA");
  const at::Tensor q = q_in.to(at::kFloat).contiguous();
  const int64_t H = q.size(0), n = q.size(1), D = q.size(2), KV = k_cache.size(0), cap = k_cache.size(1);
  TORCH_CHECK(H % KV == 0 && start + n <= cap && k_cache.is_contiguous() && v_cache.is_contiguous(), "attention: bad shapes");
  const bool bf16 = k_cache.scalar_type() == at::kBFloat16;
  at::Tensor o = at::empty_like(q);
  const AttendFn attend = bf16 ? isa().attend_bf16 : isa().attend_f32;
  const int64_t head_bytes = cap * D * k_cache.element_size();
  const char* kc = static_cast<const char*>(k_cache.data_ptr());
  const char* vc = static_cast<const char*>(v_cache.data_ptr());
  std::vector<float> scores(start + n + 16);
  for (int64_t h = 0; h < H; ++h)
    for (int64_t i = 0; i < n; ++i)
      attend(q.data_ptr<float>() + (h * n + i) * D, kc + (h / (H / KV)) * head_bytes, vc + (h / (H / KV)) * head_bytes,
             start + i + 1, D, float(scaling), o.data_ptr<float>() + (h * n + i) * D, scores.data());
  return o;
}

// The dequantized (N, K) float32 weight of a packed linear: what its kernel multiplies by
at::Tensor unpack_op(const at::Tensor& packed, const at::Tensor& scale, int64_t fmt, int64_t N, int64_t K) {
  const Linear L = standalone_linear(packed, scale, fmt, N, K, "unpack");
  at::Tensor out = at::empty({N, K}, at::kFloat);
  for (int64_t n = 0; n < N; ++n) unpack_row(L, n, out.data_ptr<float>() + n * K);
  return out;
}

bool format_available(int64_t fmt) { return fmt >= 0 && fmt < NUM_FORMATS && isa().max_pass[fmt] > 0; }

// Seconds per call of one thread's kernel for `rows` input rows over a random (N, K)
// weight in format fmt, repeated `reps` times over the same weight: with a weight that
// fits in L2 this is the kernel's arithmetic rate (benchmarks/kernel_rate.py)
double kernel_seconds(int64_t fmt, int64_t rows, int64_t N, int64_t K, int64_t reps) {
  TORCH_CHECK(format_available(fmt) && rows >= 1 && rows <= kMaxRows, "kernel_seconds: bad arguments");
  const at::Tensor weight = at::randn({N, K}) * 0.05;
  const std::vector<at::Tensor> packed = pack(weight, fmt);
  const Linear L = standalone_linear(packed[0], packed[1], fmt, N, K, "kernel_seconds");
  const at::Tensor x = at::randn({rows, L.Kp});
  Prepared prep;
  prep.reserve(rows, L.Kp);
  const Act a = prepared_act(L, x.data_ptr<float>(), L.Kp, rows, prep);
  std::vector<float> y(rows * L.Np);
  linear_panels(L, a, rows, y.data(), L.Np, 0, L.panels(), STORE);  // warm-up: the weight into cache
  const auto t0 = std::chrono::steady_clock::now();
  for (int64_t r = 0; r < reps; ++r) linear_panels(L, a, rows, y.data(), L.Np, 0, L.panels(), STORE);
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count() / reps;
}

// This core's peak rate of one instruction kind in multiply-adds per second, from a loop of
// twelve independent instructions: "fma" (float32 FMA, 16 per zmm / 8 per ymm), "bf16"
// (VDPBF16PS, 32), "int8" (VPDPBUSD, 64); 0 where the CPU lacks it
constexpr int kPeakChains = 12;  // independent chains: latency x issue rate of every instruction kind here
#define PACE_PEAK_LOOP(name, isa_str, type, init, op)                                                          \
  __attribute__((target(isa_str))) void name(int64_t n) {                                                   \
    type a[kPeakChains];                                                                                    \
    for (int j = 0; j < kPeakChains; ++j) a[j] = init;                                                      \
    for (int64_t i = 0; i < n; ++i) {                                                                       \
      for (int j = 0; j < kPeakChains; ++j) a[j] = op(a[j]);                                                \
      __asm__ volatile("" : "+x"(a[0]), "+x"(a[1]), "+x"(a[2]), "+x"(a[3]), "+x"(a[4]), "+x"(a[5]),         \
                       "+x"(a[6]), "+x"(a[7]), "+x"(a[8]), "+x"(a[9]), "+x"(a[10]), "+x"(a[11]));           \
    }                                                                                                       \
  }
#define PACE_FMA512(a) _mm512_fmadd_ps(a, _mm512_set1_ps(0.999999f), _mm512_set1_ps(1e-6f))
#define PACE_FMA256(a) _mm256_fmadd_ps(a, _mm256_set1_ps(0.999999f), _mm256_set1_ps(1e-6f))
#define PACE_DPBF16(a) _mm512_dpbf16_ps(a, (__m512bh)_mm512_set1_epi16(0x3f80), (__m512bh)_mm512_set1_epi16(0x3f80))
#define PACE_DPBUSD(a) _mm512_dpbusd_epi32(a, _mm512_set1_epi8(1), _mm512_set1_epi8(1))
PACE_PEAK_LOOP(peak_fma512, "avx512f", __m512, _mm512_set1_ps(1.0f), PACE_FMA512)
PACE_PEAK_LOOP(peak_fma256, "avx2,fma", __m256, _mm256_set1_ps(1.0f), PACE_FMA256)
PACE_PEAK_LOOP(peak_bf16, "avx512f,avx512bf16", __m512, _mm512_setzero_ps(), PACE_DPBF16)
PACE_PEAK_LOOP(peak_vnni, "avx512f,avx512vnni", __m512i, _mm512_setzero_si512(), PACE_DPBUSD)

double rate(void (*loop)(int64_t), int64_t macs_per_instruction) {
  const int64_t iters = 20000000;
  loop(iters / 10);  // warm up (clock)
  const auto t0 = std::chrono::steady_clock::now();
  loop(iters);
  return double(kPeakChains) * iters * macs_per_instruction / std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}
double peak_rate(const std::string& kind) {
  __builtin_cpu_init();
  const bool avx512 = __builtin_cpu_supports("avx512f");
  if (kind == "fma") return avx512 ? rate(peak_fma512, 16) : __builtin_cpu_supports("fma") ? rate(peak_fma256, 8) : 0.0;
  if (kind == "bf16") return __builtin_cpu_supports("avx512bf16") ? rate(peak_bf16, 32) : 0.0;
  if (kind == "int8") return __builtin_cpu_supports("avx512vnni") ? rate(peak_vnni, 64) : 0.0;
  TORCH_CHECK(false, "peak_rate: fma, bf16 or int8");
}

std::string isa_name() { return isa().name; }

}  // namespace
}  // namespace pace

TORCH_LIBRARY(pace_core, m) {
  m.class_<pace::Model>("Model")
      .def(torch::init<c10::Dict<std::string, at::Tensor>, c10::Dict<std::string, int64_t>,
                       c10::Dict<std::string, double>>())
      .def("forward", &pace::Model::forward)
      .def("set_cache", &pace::Model::set_cache)
      .def("set_logit_rows", &pace::Model::set_logit_rows)
      .def("logit_rows", &pace::Model::logit_rows)
      .def("set_profiling", &pace::Model::set_profiling)
      .def("profile", &pace::Model::profile);
  m.def("pack(Tensor weight, int fmt) -> Tensor[]", &pace::pack);
  m.def("linear(Tensor x, Tensor packed, Tensor scale, Tensor? bias, int fmt, int N) -> Tensor", &pace::linear_op);
  m.def("unpack(Tensor packed, Tensor scale, int fmt, int N, int K) -> Tensor", &pace::unpack_op);
  m.def("attention(Tensor q, Tensor k_cache, Tensor v_cache, int start, float scaling) -> Tensor", &pace::attention_op);
  m.def("isa() -> str", &pace::isa_name);
  m.def("kernel_seconds(int fmt, int rows, int N, int K, int reps) -> float", &pace::kernel_seconds);
  m.def("peak_rate(str kind) -> float", &pace::peak_rate);
  m.def("format_available(int fmt) -> bool", &pace::format_available);
  m.def("max_rows() -> int", [] { return pace::kMaxRows; });
}
