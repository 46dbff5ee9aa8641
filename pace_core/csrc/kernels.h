// Few-rows kernels for CPU decoding: y = x @ W^T for the 1..64 rows of a decode step, a
// speculative verify or a chunk of a prompt, over weights packed for streaming; causal
// attention of a few query rows over a KV cache; the small row-wise ops between them.
//
// Decoding is memory-bound: every weight is read once per forward whatever the number of
// rows, so a verify of K+1 rows can cost about one decode step if the arithmetic keeps up
// with the memory. A weight matrix is packed into panels of 32 output rows, k-major: for
// each k-step, the 32 rows' 4 bytes (1 float32 / 2 bfloat16 / 4 int8 / 8 int4 values)
// side by side, 128 bytes; a thread reads its panels as one sequential stream. The kernel
// holds, for up to 13 input rows, two 16-lane accumulators each (the panel's 32 outputs),
// and per k-step loads the panel's two weight vectors once and multiplies them by each
// input row's value(s) broadcast: one FMA (or dot-product instruction) per weight vector
// per row, no horizontal sums, outputs stored as vectors. (Outer-product register
// blocking, as GEMM micro-kernels do; one pass serves a K=12 verify.)
//
// Formats (one per linear): float32; bfloat16 (AVX512_BF16 VDPBF16PS on pairs of k where
// the CPU has it, else widened exactly to float32); int8 (symmetric per output row, stored
// +128 as u8); int4 (symmetric in groups of 64 along k with a float scale each, stored +8
// as nibbles: byte j of a lane's 4 holds k-step element j in its low nibble and 4 + j in
// its high one). For int8/int4 the input rows are quantized to int8 in groups of 64 along
// k (a float scale per group, as llama.cpp's q8 activations) and multiplied with integer
// dot products (AVX512-VNNI VPDPBUSD: u8 weights x s8 inputs, 4 products per lane; the
// zero point corrected by starting each group's integer sum at -zero_point * the input
// group's sum), each group's integer sum converted (exactly: |sum| < 2^24) and scaled once.
//
// Exactness: each output element is one fixed sequence of operations over its own input
// row and weight row (k in order into one lane), never depending on how many rows a
// forward has, how they are split into passes, or which thread computes them: a K+1-row
// verify gives bit-identical results to K+1 one-row steps, so speculation never changes a
// logit. (Results differ between ISAs and formats, never between runs.)
#pragma once

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

namespace pace {

#define PACE_AVX512 __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,fma,avx2"))) inline
#define PACE_AVX512_FN __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,fma,avx2"), flatten))
#define PACE_VNNI_FN __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,avx512vnni,fma,avx2"), flatten))
#define PACE_BF16_FN __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,avx512bf16,fma,avx2"), flatten))
#define PACE_AVX2 __attribute__((target("avx2,fma,f16c"))) inline
#define PACE_AVX2_FN __attribute__((target("avx2,fma,f16c"), flatten))

enum Format : int32_t { F32 = 0, BF16 = 1, INT8 = 2, INT4 = 3, NUM_FORMATS = 4 };
constexpr int kPanel = 32;     // output rows per packed panel
constexpr int kStepBytes = 4;  // bytes of one row per k-step
constexpr int kGroup = 64;     // int8/int4: input (and int4 weight) quantization group along k
constexpr int kMaxPass = 13;   // input rows per pass, at most

constexpr int64_t step_elems(int fmt) { return fmt == F32 ? 1 : fmt == BF16 ? 2 : fmt == INT8 ? 4 : 8; }
// k is padded (with zero weights, and zero inputs) to a multiple of this
constexpr int64_t k_align(int fmt) { return fmt == INT8 || fmt == INT4 ? kGroup : step_elems(fmt); }
constexpr int64_t round_up(int64_t a, int64_t b) { return (a + b - 1) / b * b; }
constexpr int64_t panel_bytes(int fmt, int64_t kp) { return kp / step_elems(fmt) * kPanel * kStepBytes; }

// One packed linear: N outputs (padded to Np), K inputs (padded to Kp).
struct Linear {
  int32_t fmt = F32;
  int64_t N = 0, K = 0, Np = 0, Kp = 0;
  const uint8_t* w = nullptr;
  const float* scale = nullptr;  // INT8: per output row (Np); INT4: [panel][group][32 rows]
  const float* bias = nullptr;   // Np floats (zero-padded) or none
  int64_t panels() const { return Np / kPanel; }
  int64_t groups() const { return Kp / kGroup; }
};

// A linear's input rows, in the form its kernel reads (prepare_row writes them).
struct Act {
  const float* f32 = nullptr;      // float32 rows (F32, and BF16 without dot products)
  const uint16_t* bf16 = nullptr;  // bfloat16 rows (BF16 with dot products)
  const int32_t* quads = nullptr;  // int8 inputs (INT8, INT4) by groups of 4 k, the rows of a quad
                                   // side by side: quads[(k / 4) * rows + m] holds row m's k..k+3
  const float* qscale = nullptr;   // per row and group
  const int32_t* qcorr = nullptr;  // per row and group: -zero_point * sum of the group's int8 values
  int64_t ld = 0;                  // elements per row (at least the linear's Kp; zero past K)
  int64_t groups = 0;              // per row (Kp / kGroup)
  int64_t rows = 0;                // rows in quads
};

// What a kernel does with each finished output: store it, add it to y (the residual), or,
// for a gate/up panel (16 gate units then the same 16 up units), store silu(gate) * up at
// the units' positions (p * 16 + j).
enum Out : int32_t { STORE = 0, ADD = 1, SILU_MUL = 2 };

inline float bf16_to_float(uint16_t v) {
  uint32_t bits = uint32_t(v) << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}
inline uint16_t float_to_bf16(float f) {  // round to nearest even (as torch; NaN stays NaN)
  uint32_t bits;
  std::memcpy(&bits, &f, 4);
  if ((bits & 0x7fffffffu) > 0x7f800000u) return uint16_t((bits >> 16) | 0x40);
  return uint16_t((bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16);
}
inline int32_t load_i32(const void* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return v;
}

// ---------------------------------------------------------------- vector helpers
struct Avx512 {
  using Vec = __m512;
  static constexpr int kLanes = 16;
  static PACE_AVX512 Vec zero() { return _mm512_setzero_ps(); }
  static PACE_AVX512 Vec load(const float* p) { return _mm512_loadu_ps(p); }
  static PACE_AVX512 Vec load(const uint16_t* p) {  // 16 bfloat16 -> float32 (exact)
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)p)), 16));
  }
  static PACE_AVX512 void store(float* p, Vec v) { _mm512_storeu_ps(p, v); }
  static PACE_AVX512 Vec set1(float a) { return _mm512_set1_ps(a); }
  static PACE_AVX512 Vec fma(Vec a, Vec b, Vec c) { return _mm512_fmadd_ps(a, b, c); }
  static PACE_AVX512 Vec add(Vec a, Vec b) { return _mm512_add_ps(a, b); }
  static PACE_AVX512 Vec sub(Vec a, Vec b) { return _mm512_sub_ps(a, b); }
  static PACE_AVX512 Vec mul(Vec a, Vec b) { return _mm512_mul_ps(a, b); }
  static PACE_AVX512 Vec div(Vec a, Vec b) { return _mm512_div_ps(a, b); }
  static PACE_AVX512 Vec max(Vec a, Vec b) { return _mm512_max_ps(a, b); }
  static PACE_AVX512 Vec min(Vec a, Vec b) { return _mm512_min_ps(a, b); }
  static PACE_AVX512 Vec abs(Vec a) { return _mm512_abs_ps(a); }
  static PACE_AVX512 Vec floor(Vec a) { return _mm512_roundscale_ps(a, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC); }
  static PACE_AVX512 Vec pow2(Vec n) {  // 2^n for integral n in the normal range
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)), 23));
  }
  static PACE_AVX512 float sum(Vec v) {  // 16 -> 8 -> 4 -> 2 -> 1
    __m256 s8 = _mm256_add_ps(_mm512_castps512_ps256(v), _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1)));
    __m128 s4 = _mm_add_ps(_mm256_castps256_ps128(s8), _mm256_extractf128_ps(s8, 1));
    __m128 s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
    return _mm_cvtss_f32(_mm_add_ss(s2, _mm_shuffle_ps(s2, s2, 1)));
  }
  static PACE_AVX512 float max_of(Vec v) { return _mm512_reduce_max_ps(v); }
};

struct Avx2 {
  using Vec = __m256;
  static constexpr int kLanes = 8;
  static PACE_AVX2 Vec zero() { return _mm256_setzero_ps(); }
  static PACE_AVX2 Vec load(const float* p) { return _mm256_loadu_ps(p); }
  static PACE_AVX2 Vec load(const uint16_t* p) {  // 8 bfloat16 -> float32 (exact)
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)p)), 16));
  }
  static PACE_AVX2 void store(float* p, Vec v) { _mm256_storeu_ps(p, v); }
  static PACE_AVX2 Vec set1(float a) { return _mm256_set1_ps(a); }
  static PACE_AVX2 Vec fma(Vec a, Vec b, Vec c) { return _mm256_fmadd_ps(a, b, c); }
  static PACE_AVX2 Vec add(Vec a, Vec b) { return _mm256_add_ps(a, b); }
  static PACE_AVX2 Vec sub(Vec a, Vec b) { return _mm256_sub_ps(a, b); }
  static PACE_AVX2 Vec mul(Vec a, Vec b) { return _mm256_mul_ps(a, b); }
  static PACE_AVX2 Vec div(Vec a, Vec b) { return _mm256_div_ps(a, b); }
  static PACE_AVX2 Vec max(Vec a, Vec b) { return _mm256_max_ps(a, b); }
  static PACE_AVX2 Vec min(Vec a, Vec b) { return _mm256_min_ps(a, b); }
  static PACE_AVX2 Vec abs(Vec a) { return _mm256_andnot_ps(_mm256_set1_ps(-0.0f), a); }
  static PACE_AVX2 Vec floor(Vec a) { return _mm256_floor_ps(a); }
  static PACE_AVX2 Vec pow2(Vec n) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23));
  }
  static PACE_AVX2 float sum(Vec v) {  // 8 -> 4 -> 2 -> 1
    __m128 s4 = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    __m128 s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
    return _mm_cvtss_f32(_mm_add_ss(s2, _mm_shuffle_ps(s2, s2, 1)));
  }
  static PACE_AVX2 float max_of(Vec v) {
    __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    __m128 m2 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
    return _mm_cvtss_f32(_mm_max_ss(m2, _mm_shuffle_ps(m2, m2, 1)));
  }
};

// exp(x), x clamped to [-87, 88] (Cephes' expf, ~1 ulp): softmax and SiLU
template <class V>
inline typename V::Vec vexp(typename V::Vec x) {
  using Vec = typename V::Vec;
  x = V::min(V::max(x, V::set1(-87.0f)), V::set1(88.0f));
  Vec n = V::floor(V::fma(x, V::set1(1.44269504088896341f), V::set1(0.5f)));
  x = V::fma(n, V::set1(-0.693359375f), x);
  x = V::fma(n, V::set1(2.12194440e-4f), x);
  Vec y = V::set1(1.9875691500e-4f);
  y = V::fma(y, x, V::set1(1.3981999507e-3f));
  y = V::fma(y, x, V::set1(8.3334519073e-3f));
  y = V::fma(y, x, V::set1(4.1665795894e-2f));
  y = V::fma(y, x, V::set1(1.6666665459e-1f));
  y = V::fma(y, x, V::set1(5.0000001201e-1f));
  y = V::fma(y, V::mul(x, x), V::add(x, V::set1(1.0f)));
  return V::mul(y, V::pow2(n));
}

// silu(g) * u = g / (1 + exp(-g)) * u
template <class V>
inline typename V::Vec silu_mul(typename V::Vec g, typename V::Vec u) {
  return V::mul(V::div(g, V::add(V::set1(1.0f), vexp<V>(V::sub(V::zero(), g)))), u);
}

// ---------------------------------------------------------------- linear kernels
// Each computes input rows m0..m0+MB-1 against panels [p0, p1) and hands every panel's
// 32 outputs of a row to emit(). pf: prefetch this many bytes ahead of the weights read
// (the next tile, while a multi-pass tile is read from cache), or 0.
using PanelsFn = void (*)(const Linear&, const Act&, int64_t m0, float* y, int64_t ldy, int64_t p0, int64_t p1,
                          Out mode, int64_t pf);

inline void prefetch_step(const uint8_t* w, int64_t pf) {
  if (pf) {
    _mm_prefetch(reinterpret_cast<const char*>(w + pf), _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(w + pf + 64), _MM_HINT_T0);
  }
}

// The panel's 32 outputs of one row (two vectors): the row scale (int8), the bias, then
// the output mode; outputs past N are not written.
PACE_AVX512 void emit_avx512(const Linear& L, Out mode, float* yrow, int64_t p, __m512 a0, __m512 a1) {
  const int64_t n0 = p * kPanel;
  if (L.fmt == INT8) {
    a0 = _mm512_mul_ps(a0, _mm512_loadu_ps(L.scale + n0));
    a1 = _mm512_mul_ps(a1, _mm512_loadu_ps(L.scale + n0 + 16));
  }
  if (L.bias) {
    a0 = _mm512_add_ps(a0, _mm512_loadu_ps(L.bias + n0));
    a1 = _mm512_add_ps(a1, _mm512_loadu_ps(L.bias + n0 + 16));
  }
  if (mode == SILU_MUL) {
    _mm512_storeu_ps(yrow + p * 16, silu_mul<Avx512>(a0, a1));
    return;
  }
  const int64_t left = L.N - n0;
  const __mmask16 k0 = left >= 16 ? 0xffff : left <= 0 ? 0 : __mmask16((1u << left) - 1);
  const __mmask16 k1 = left >= 32 ? 0xffff : left <= 16 ? 0 : __mmask16((1u << (left - 16)) - 1);
  if (mode == ADD) {
    a0 = _mm512_add_ps(_mm512_maskz_loadu_ps(k0, yrow + n0), a0);
    a1 = _mm512_add_ps(_mm512_maskz_loadu_ps(k1, yrow + n0 + 16), a1);
  }
  _mm512_mask_storeu_ps(yrow + n0, k0, a0);
  _mm512_mask_storeu_ps(yrow + n0 + 16, k1, a1);
}

// Each kernel below handles NP panels at once (NP = 2 or 3 for few rows: more independent
// accumulator chains than a single panel's 2 x rows, which leave the FMA units waiting on
// their latency); every output is still one chain over k, whatever NP or the rows.
#define PACE_PANEL_PAIRS(kernel, few)                                                                      \
  constexpr int NP = MB <= (few) / 2 ? 3 : MB <= (few) ? 2 : 1;                                            \
  int64_t p = p0;                                                                                          \
  for (; p + NP <= p1; p += NP) kernel<MB, NP>(L, a, m0, y, ldy, p, mode, pf);                            \
  for (; p < p1; ++p) kernel<MB, 1>(L, a, m0, y, ldy, p, mode, pf)

template <int MB, int NP>
PACE_AVX512_FN void panel_f32_avx512(const Linear& L, const Act& a, int64_t m0, float* y, int64_t ldy, int64_t p,
                                     Out mode, int64_t pf) {
  const int64_t pbytes = panel_bytes(F32, L.Kp);
  const float* x = a.f32 + m0 * a.ld;
  const uint8_t* w = L.w + p * pbytes;
  __m512 s[NP][2][MB];
  for (int j = 0; j < NP; ++j)
    for (int m = 0; m < MB; ++m) s[j][0][m] = s[j][1][m] = _mm512_setzero_ps();
  for (int64_t k = 0; k < L.Kp; ++k, w += 128) {
    __m512 wv[NP][2];
    for (int j = 0; j < NP; ++j) {
      prefetch_step(w + j * pbytes, pf);
      wv[j][0] = _mm512_loadu_ps(w + j * pbytes);
      wv[j][1] = _mm512_loadu_ps(w + j * pbytes + 64);
    }
    for (int m = 0; m < MB; ++m) {
      const __m512 xv = _mm512_set1_ps(x[m * a.ld + k]);
      for (int j = 0; j < NP; ++j) {
        s[j][0][m] = _mm512_fmadd_ps(wv[j][0], xv, s[j][0][m]);
        s[j][1][m] = _mm512_fmadd_ps(wv[j][1], xv, s[j][1][m]);
      }
    }
  }
  for (int j = 0; j < NP; ++j)
    for (int m = 0; m < MB; ++m) emit_avx512(L, mode, y + (m0 + m) * ldy, p + j, s[j][0][m], s[j][1][m]);
}
template <int MB>
PACE_AVX512_FN void panels_f32_avx512(const Linear& L, const Act& a, int64_t m0, float* y, int64_t ldy, int64_t p0,
                                      int64_t p1, Out mode, int64_t pf) {
  PACE_PANEL_PAIRS(panel_f32_avx512, 4);
}

// bfloat16 weights and inputs, VDPBF16PS: a lane adds w[2s] x[2s] + w[2s+1] x[2s+1]
template <int MB, int NP>
PACE_BF16_FN void panel_bf16dp_avx512(const Linear& L, const Act& a, int64_t m0, float* y, int64_t ldy, int64_t p,
                                      Out mode, int64_t pf) {
  const int64_t pbytes = panel_bytes(BF16, L.Kp);
  const uint16_t* x = a.bf16 + m0 * a.ld;
  const uint8_t* w = L.w + p * pbytes;
  __m512 s[NP][2][MB];
  for (int j = 0; j < NP; ++j)
    for (int m = 0; m < MB; ++m) s[j][0][m] = s[j][1][m] = _mm512_setzero_ps();
  for (int64_t k = 0; k < L.Kp / 2; ++k, w += 128) {
    __m512bh wv[NP][2];
    for (int j = 0; j < NP; ++j) {
      prefetch_step(w + j * pbytes, pf);
      wv[j][0] = (__m512bh)_mm512_loadu_si512(w + j * pbytes);
      wv[j][1] = (__m512bh)_mm512_loadu_si512(w + j * pbytes + 64);
    }
    for (int m = 0; m < MB; ++m) {
      const __m512bh xv = (__m512bh)_mm512_set1_epi32(load_i32(x + m * a.ld + 2 * k));
      for (int j = 0; j < NP; ++j) {
        s[j][0][m] = _mm512_dpbf16_ps(s[j][0][m], wv[j][0], xv);
        s[j][1][m] = _mm512_dpbf16_ps(s[j][1][m], wv[j][1], xv);
      }
    }
  }
  for (int j = 0; j < NP; ++j)
    for (int m = 0; m < MB; ++m) emit_avx512(L, mode, y + (m0 + m) * ldy, p + j, s[j][0][m], s[j][1][m]);
}
template <int MB>
PACE_BF16_FN void panels_bf16dp_avx512(const Linear& L, const Act& a, int64_t m0, float* y, int64_t ldy, int64_t p0,
                                       int64_t p1, Out mode, int64_t pf) {
  PACE_PANEL_PAIRS(panel_bf16dp_avx512, 4);
}

// bfloat16 weights widened exactly to float32 (AVX-512 without BF16 dot products):
// the even k of a lane is its low half, the odd k its high half
template <int MB, int NP>
PACE_AVX512_FN void panel_bf16_avx512(const Linear& L, const Act& a, int64_t m0, float* y, int64_t ldy, int64_t p,
                                      Out mode, int64_t pf) {
  const int64_t pbytes = panel_bytes(BF16, L.Kp);
  const float* x = a.f32 + m0 * a.ld;
  const __m512i high = _mm512_set1_epi32(int32_t(0xffff0000u));
  const uint8_t* w = L.w + p * pbytes;
  __m512 s[NP][2][MB];
  for (int j = 0; j < NP; ++j)
    for (int m = 0; m < MB; ++m) s[j][0][m] = s[j][1][m] = _mm512_setzero_ps();
  for (int64_t k = 0; k < L.Kp / 2; ++k, w += 128) {
    __m512 ev[NP][2], od[NP][2];
    for (int j = 0; j < NP; ++j) {
      prefetch_step(w + j * pbytes, pf);
      for (int h = 0; h < 2; ++h) {
        const __m512i r = _mm512_loadu_si512(w + j * pbytes + 64 * h);
        ev[j][h] = _mm512_castsi512_ps(_mm512_slli_epi32(r, 16));
        od[j][h] = _mm512_castsi512_ps(_mm512_and_si512(r, high));
      }
    }
    for (int m = 0; m < MB; ++m) {
      const __m512 xe = _mm512_set1_ps(x[m * a.ld + 2 * k]), xo = _mm512_set1_ps(x[m * a.ld + 2 * k + 1]);
      for (int j = 0; j < NP; ++j)
        for (int h = 0; h < 2; ++h) s[j][h][m] = _mm512_fmadd_ps(od[j][h], xo, _mm512_fmadd_ps(ev[j][h], xe, s[j][h][m]));
    }
  }
  for (int j = 0; j < NP; ++j)
    for (int m = 0; m < MB; ++m) emit_avx512(L, mode, y + (m0 + m) * ldy, p + j, s[j][0][m], s[j][1][m]);
}
template <int MB>
PACE_AVX512_FN void panels_bf16_avx512(const Linear& L, const Act& a, int64_t m0, float* y, int64_t ldy, int64_t p0,
                                       int64_t p1, Out mode, int64_t pf) {
  PACE_PANEL_PAIRS(panel_bf16_avx512, 2);
}

// int8 / int4 weights x int8 inputs, VPDPBUSD: per group of 64 k, integer sums started at
// the zero-point correction, then one float fma by the group's scale (int4: the weights'
// group scales times the input's); float partial sums live in a small L1 buffer
template <int MB, int NP, bool kInt4>
PACE_VNNI_FN void panel_int_avx512(const Linear& L, const Act& a, int64_t m0, float* y, int64_t ldy, int64_t p,
                                   Out mode, int64_t pf) {
  constexpr int fmt = kInt4 ? INT4 : INT8;
  constexpr int64_t steps = kGroup / step_elems(fmt);
  const int64_t groups = L.groups(), pbytes = panel_bytes(fmt, L.Kp);
  const __m512i low4 = _mm512_set1_epi8(0x0f);
  alignas(64) float acc[NP][MB][kPanel];
  const uint8_t* w = L.w + p * pbytes;
  std::memset(acc, 0, sizeof(acc));
  for (int64_t g = 0; g < groups; ++g) {
    __m512i is[NP][2][MB];
    for (int m = 0; m < MB; ++m) {
      const __m512i c = _mm512_set1_epi32(a.qcorr[(m0 + m) * a.groups + g]);
      for (int j = 0; j < NP; ++j) is[j][0][m] = is[j][1][m] = c;
    }
    const int32_t* xq = a.quads + g * (kGroup / 4) * a.rows + m0;  // this group's quads, rows side by side
#pragma GCC unroll 16
    for (int64_t s = 0; s < steps; ++s, w += 128) {
      __m512i lo[NP][2], hi[NP][2];
      for (int j = 0; j < NP; ++j) {
        prefetch_step(w + j * pbytes, pf);
        for (int h = 0; h < 2; ++h) {
          const __m512i r = _mm512_loadu_si512(w + j * pbytes + 64 * h);
          lo[j][h] = kInt4 ? _mm512_and_si512(r, low4) : r;
          hi[j][h] = kInt4 ? _mm512_and_si512(_mm512_srli_epi16(r, 4), low4) : r;
        }
      }
      for (int m = 0; m < MB; ++m) {
        if (kInt4) {
          const __m512i xa = _mm512_set1_epi32(xq[(2 * s) * a.rows + m]);
          const __m512i xb = _mm512_set1_epi32(xq[(2 * s + 1) * a.rows + m]);
          for (int j = 0; j < NP; ++j)
            for (int h = 0; h < 2; ++h)
              is[j][h][m] = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(is[j][h][m], lo[j][h], xa), hi[j][h], xb);
        } else {
          const __m512i xv = _mm512_set1_epi32(xq[s * a.rows + m]);
          for (int j = 0; j < NP; ++j)
            for (int h = 0; h < 2; ++h) is[j][h][m] = _mm512_dpbusd_epi32(is[j][h][m], lo[j][h], xv);
        }
      }
    }
    for (int j = 0; j < NP; ++j) {
      __m512 sw[2] = {_mm512_set1_ps(1.0f), _mm512_set1_ps(1.0f)};
      if (kInt4)
        for (int h = 0; h < 2; ++h) sw[h] = _mm512_loadu_ps(L.scale + ((p + j) * groups + g) * kPanel + 16 * h);
      for (int m = 0; m < MB; ++m) {
        const __m512 sx = _mm512_set1_ps(a.qscale[(m0 + m) * a.groups + g]);
        for (int h = 0; h < 2; ++h) {
          const __m512 c = kInt4 ? _mm512_mul_ps(sw[h], sx) : sx;
          float* out = acc[j][m] + 16 * h;
          _mm512_store_ps(out, _mm512_fmadd_ps(_mm512_cvtepi32_ps(is[j][h][m]), c, _mm512_load_ps(out)));
        }
      }
    }
  }
  for (int j = 0; j < NP; ++j)
    for (int m = 0; m < MB; ++m)
      emit_avx512(L, mode, y + (m0 + m) * ldy, p + j, _mm512_load_ps(acc[j][m]), _mm512_load_ps(acc[j][m] + 16));
}
template <int MB, int NP>
PACE_VNNI_FN void panel_int8_avx512(const Linear& L, const Act& a, int64_t m0, float* y, int64_t ldy, int64_t p,
                                    Out mode, int64_t pf) {
  panel_int_avx512<MB, NP, false>(L, a, m0, y, ldy, p, mode, pf);
}
template <int MB, int NP>
PACE_VNNI_FN void panel_int4_avx512(const Linear& L, const Act& a, int64_t m0, float* y, int64_t ldy, int64_t p,
                                    Out mode, int64_t pf) {
  panel_int_avx512<MB, NP, true>(L, a, m0, y, ldy, p, mode, pf);
}
template <int MB>
PACE_VNNI_FN void panels_int8_avx512(const Linear& L, const Act& a, int64_t m0, float* y, int64_t ldy, int64_t p0,
                                     int64_t p1, Out mode, int64_t pf) {
  PACE_PANEL_PAIRS(panel_int8_avx512, 0);
}
template <int MB>
PACE_VNNI_FN void panels_int4_avx512(const Linear& L, const Act& a, int64_t m0, float* y, int64_t ldy, int64_t p0,
                                     int64_t p1, Out mode, int64_t pf) {
  PACE_PANEL_PAIRS(panel_int4_avx512, 3);
}

// ---- AVX2 (and FMA): the same panels as four 8-lane vectors
PACE_AVX2 void emit_avx2(const Linear& L, Out mode, float* yrow, int64_t p, __m256* v) {
  const int64_t n0 = p * kPanel;
  for (int q = 0; q < 4; ++q) {
    if (L.fmt == INT8) v[q] = _mm256_mul_ps(v[q], _mm256_loadu_ps(L.scale + n0 + 8 * q));
    if (L.bias) v[q] = _mm256_add_ps(v[q], _mm256_loadu_ps(L.bias + n0 + 8 * q));
  }
  if (mode == SILU_MUL) {
    _mm256_storeu_ps(yrow + p * 16, silu_mul<Avx2>(v[0], v[2]));
    _mm256_storeu_ps(yrow + p * 16 + 8, silu_mul<Avx2>(v[1], v[3]));
    return;
  }
  alignas(32) float out[kPanel];
  for (int q = 0; q < 4; ++q) _mm256_store_ps(out + 8 * q, v[q]);
  const int64_t n = std::min<int64_t>(kPanel, L.N - n0);
  for (int64_t j = 0; j < n; ++j) yrow[n0 + j] = mode == ADD ? yrow[n0 + j] + out[j] : out[j];
}

template <int MB>
PACE_AVX2_FN void panels_f32_avx2(const Linear& L, const Act& a, int64_t m0, float* y, int64_t ldy, int64_t p0,
                                  int64_t p1, Out mode, int64_t pf) {
  const float* x = a.f32 + m0 * a.ld;
  for (int64_t p = p0; p < p1; ++p) {
    const uint8_t* w = L.w + p * panel_bytes(F32, L.Kp);
    __m256 s[MB][4];
    for (int m = 0; m < MB; ++m)
      for (int q = 0; q < 4; ++q) s[m][q] = _mm256_setzero_ps();
    for (int64_t k = 0; k < L.Kp; ++k, w += 128) {
      prefetch_step(w, pf);
      for (int m = 0; m < MB; ++m) {
        const __m256 xv = _mm256_set1_ps(x[m * a.ld + k]);
        for (int q = 0; q < 4; ++q) s[m][q] = _mm256_fmadd_ps(_mm256_loadu_ps((const float*)w + 8 * q), xv, s[m][q]);
      }
    }
    for (int m = 0; m < MB; ++m) emit_avx2(L, mode, y + (m0 + m) * ldy, p, s[m]);
  }
}

template <int MB>
PACE_AVX2_FN void panels_bf16_avx2(const Linear& L, const Act& a, int64_t m0, float* y, int64_t ldy, int64_t p0,
                                   int64_t p1, Out mode, int64_t pf) {
  const float* x = a.f32 + m0 * a.ld;
  const __m256i high = _mm256_set1_epi32(int32_t(0xffff0000u));
  for (int64_t p = p0; p < p1; ++p) {
    const uint8_t* w = L.w + p * panel_bytes(BF16, L.Kp);
    __m256 s[MB][4];
    for (int m = 0; m < MB; ++m)
      for (int q = 0; q < 4; ++q) s[m][q] = _mm256_setzero_ps();
    for (int64_t k = 0; k < L.Kp / 2; ++k, w += 128) {
      prefetch_step(w, pf);
      for (int m = 0; m < MB; ++m) {
        const __m256 xe = _mm256_set1_ps(x[m * a.ld + 2 * k]), xo = _mm256_set1_ps(x[m * a.ld + 2 * k + 1]);
        for (int q = 0; q < 4; ++q) {
          const __m256i r = _mm256_loadu_si256((const __m256i*)(w + 32 * q));
          s[m][q] = _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_and_si256(r, high)), xo,
                                    _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_slli_epi32(r, 16)), xe, s[m][q]));
        }
      }
    }
    for (int m = 0; m < MB; ++m) emit_avx2(L, mode, y + (m0 + m) * ldy, p, s[m]);
  }
}

// int8 / int4 on AVX2 (no VNNI): VPMADDUBSW (u8 x s8 pairs into int16) then VPMADDWD by
// ones into the lanes' int32 sums. int4 weights (0..15) never saturate the pairs; int8
// weights use the sign trick instead (|x| as u8 times the weight carrying x's sign: at
// most 2 * 127 * 127), so no zero-point correction: same integer sums as VPDPBUSD
template <int MB, bool kInt4>
PACE_AVX2_FN void panels_int_avx2(const Linear& L, const Act& a, int64_t m0, float* y, int64_t ldy, int64_t p0,
                                  int64_t p1, Out mode, int64_t pf) {
  constexpr int fmt = kInt4 ? INT4 : INT8;
  constexpr int64_t steps = kGroup / step_elems(fmt);
  const int64_t groups = L.groups();
  const __m256i low4 = _mm256_set1_epi8(0x0f), ones = _mm256_set1_epi16(1), flip = _mm256_set1_epi8(char(0x80));
  alignas(32) float acc[MB][kPanel];
  for (int64_t p = p0; p < p1; ++p) {
    const uint8_t* w = L.w + p * panel_bytes(fmt, L.Kp);
    for (int m = 0; m < MB; ++m) std::memset(acc[m], 0, sizeof(acc[m]));
    for (int64_t g = 0; g < groups; ++g) {
      __m256i is[MB][4];
      for (int m = 0; m < MB; ++m)
        for (int q = 0; q < 4; ++q)
          is[m][q] = _mm256_set1_epi32(kInt4 ? a.qcorr[(m0 + m) * a.groups + g] : 0);
      const int32_t* xq = a.quads + g * (kGroup / 4) * a.rows + m0;
      for (int64_t s = 0; s < steps; ++s, w += 128) {
        prefetch_step(w, pf);
        for (int q = 0; q < 4; ++q) {
          const __m256i r = _mm256_loadu_si256((const __m256i*)(w + 32 * q));
          for (int m = 0; m < MB; ++m) {
            if (kInt4) {
              const __m256i xa = _mm256_set1_epi32(xq[(2 * s) * a.rows + m]);
              const __m256i xb = _mm256_set1_epi32(xq[(2 * s + 1) * a.rows + m]);
              const __m256i lo = _mm256_and_si256(r, low4), hi = _mm256_and_si256(_mm256_srli_epi16(r, 4), low4);
              const __m256i pairs = _mm256_add_epi16(_mm256_maddubs_epi16(lo, xa), _mm256_maddubs_epi16(hi, xb));
              is[m][q] = _mm256_add_epi32(is[m][q], _mm256_madd_epi16(pairs, ones));
            } else {
              const __m256i xv = _mm256_set1_epi32(xq[s * a.rows + m]);
              const __m256i signed_w = _mm256_sign_epi8(_mm256_xor_si256(r, flip), xv);
              is[m][q] = _mm256_add_epi32(is[m][q],
                                          _mm256_madd_epi16(_mm256_maddubs_epi16(_mm256_abs_epi8(xv), signed_w), ones));
            }
          }
        }
      }
      for (int m = 0; m < MB; ++m) {
        const __m256 sx = _mm256_set1_ps(a.qscale[(m0 + m) * a.groups + g]);
        for (int q = 0; q < 4; ++q) {
          const __m256 c = kInt4 ? _mm256_mul_ps(_mm256_loadu_ps(L.scale + (p * groups + g) * kPanel + 8 * q), sx) : sx;
          _mm256_store_ps(acc[m] + 8 * q, _mm256_fmadd_ps(_mm256_cvtepi32_ps(is[m][q]), c, _mm256_load_ps(acc[m] + 8 * q)));
        }
      }
    }
    for (int m = 0; m < MB; ++m) {
      __m256 v[4];
      for (int q = 0; q < 4; ++q) v[q] = _mm256_load_ps(acc[m] + 8 * q);
      emit_avx2(L, mode, y + (m0 + m) * ldy, p, v);
    }
  }
}
template <int MB>
PACE_AVX2_FN void panels_int8_avx2(const Linear& L, const Act& a, int64_t m0, float* y, int64_t ldy, int64_t p0,
                                   int64_t p1, Out mode, int64_t pf) {
  panels_int_avx2<MB, false>(L, a, m0, y, ldy, p0, p1, mode, pf);
}
template <int MB>
PACE_AVX2_FN void panels_int4_avx2(const Linear& L, const Act& a, int64_t m0, float* y, int64_t ldy, int64_t p0,
                                   int64_t p1, Out mode, int64_t pf) {
  panels_int_avx2<MB, true>(L, a, m0, y, ldy, p0, p1, mode, pf);
}

// ---------------------------------------------------------------- row-wise ops
// transformers' LlamaRMSNorm in float32: y = w * (x * rsqrt(mean(x^2) + eps))
template <class V>
inline void rms_norm_row(const float* x, const float* w, float* y, int64_t n, float eps) {
  constexpr int W = V::kLanes;
  typename V::Vec acc = V::zero();
  int64_t i = 0;
  for (; i + W <= n; i += W) {
    const auto v = V::load(x + i);
    acc = V::fma(v, v, acc);
  }
  float ss = V::sum(acc);
  for (; i < n; ++i) ss = std::fma(x[i], x[i], ss);
  const float r = 1.0f / std::sqrt(ss / float(n) + eps);
  i = 0;
  const auto rv = V::set1(r);
  for (; i + W <= n; i += W) V::store(y + i, V::mul(V::load(w + i), V::mul(V::load(x + i), rv)));
  for (; i < n; ++i) y[i] = w[i] * (x[i] * r);
}

// An input row in int8 for the int8/int4 kernels, in groups of 64: scale = max|x| / 127,
// values x * (127 / max|x|) rounded to nearest even (the vector conversion's default
// rounding), and each group's correction -zero_point * sum. Writes all kp elements (x's
// padding is 0) as the row's quads: the 4 bytes of k..k+3 at q + (k / 4) * stride.
template <class V>
inline void quantize_row(const float* x, int64_t kp, int8_t* q, int64_t stride, float* scale, int32_t* corr,
                         int32_t zero_point);

template <>
PACE_AVX512 void quantize_row<Avx512>(const float* x, int64_t kp, int8_t* q, int64_t stride, float* scale,
                                      int32_t* corr, int32_t zero_point) {
  static_assert(kGroup == 64, "four vectors a group");
  for (int64_t g = 0; g < kp / kGroup; ++g) {
    const float* xg = x + g * kGroup;
    __m512 v[4];
    __m512 amax = _mm512_setzero_ps();
    for (int i = 0; i < 4; ++i) amax = _mm512_max_ps(amax, _mm512_abs_ps(v[i] = _mm512_loadu_ps(xg + 16 * i)));
    const float m = _mm512_reduce_max_ps(amax);
    const __m512 inv = _mm512_set1_ps(m > 0.0f ? 127.0f / m : 0.0f);
    __m512i sum = _mm512_setzero_si512();
    for (int i = 0; i < 4; ++i) {
      __m512i iv = _mm512_cvtps_epi32(_mm512_mul_ps(v[i], inv));
      iv = _mm512_max_epi32(_mm512_min_epi32(iv, _mm512_set1_epi32(127)), _mm512_set1_epi32(-127));
      sum = _mm512_add_epi32(sum, iv);
      const __m128i bytes = _mm512_cvtepi32_epi8(iv);  // k = g*64 + 16i .. +15: four quads
      int8_t* dst = q + ((g * kGroup + 16 * i) / 4) * stride;
      const int32_t quads[4] = {_mm_extract_epi32(bytes, 0), _mm_extract_epi32(bytes, 1), _mm_extract_epi32(bytes, 2),
                                _mm_extract_epi32(bytes, 3)};
      for (int j = 0; j < 4; ++j) std::memcpy(dst + j * stride, &quads[j], 4);
    }
    scale[g] = m / 127.0f;
    corr[g] = -zero_point * _mm512_reduce_add_epi32(sum);
  }
}

template <>
PACE_AVX2 void quantize_row<Avx2>(const float* x, int64_t kp, int8_t* q, int64_t stride, float* scale, int32_t* corr,
                                  int32_t zero_point) {
  for (int64_t g = 0; g < kp / kGroup; ++g) {
    const float* xg = x + g * kGroup;
    __m256 amax = _mm256_setzero_ps();
    for (int i = 0; i < kGroup; i += 8) amax = _mm256_max_ps(amax, Avx2::abs(_mm256_loadu_ps(xg + i)));
    const float m = Avx2::max_of(amax);
    const __m256 inv = _mm256_set1_ps(m > 0.0f ? 127.0f / m : 0.0f);
    alignas(32) int32_t iv[kGroup];
    for (int i = 0; i < kGroup; i += 8) {
      const __m256i v = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(xg + i), inv));
      _mm256_store_si256((__m256i*)(iv + i),
                         _mm256_max_epi32(_mm256_min_epi32(v, _mm256_set1_epi32(127)), _mm256_set1_epi32(-127)));
    }
    int32_t sum = 0;
    for (int i = 0; i < kGroup; ++i) {
      const int64_t k = g * kGroup + i;
      q[(k / 4) * stride + k % 4] = int8_t(iv[i]);
      sum += iv[i];
    }
    scale[g] = m / 127.0f;
    corr[g] = -zero_point * sum;
  }
}

// o[0 .. NB vectors) = inv * sum over j of p[j] * v[j, 0 .. NB vectors), each lane summed in
// key order (one FMA chain per lane, as a single vector's loop would: the same bits), the NB
// chains side by side so that the FMA latency is paid once per key, not NB times
template <class V, class T, int NB>
inline void weighted_sum(const float* p, const T* v, int64_t L, int64_t D, float inv, float* o) {
  using Vec = typename V::Vec;
  constexpr int W = V::kLanes;
  Vec acc[NB];
  for (int b = 0; b < NB; ++b) acc[b] = V::zero();
  for (int64_t j = 0; j < L; ++j) {
    const Vec s = V::set1(p[j]);
    for (int b = 0; b < NB; ++b) acc[b] = V::fma(s, V::load(v + j * D + b * W), acc[b]);
  }
  for (int b = 0; b < NB; ++b) V::store(o + b * W, V::mul(acc[b], V::set1(inv)));
}

// One query row of one head: o = softmax(q . K^T * scale) V over keys 0..L-1, each stage
// in key order, so the result depends on nothing but this query and these keys. (T: the
// cache's float, or uint16_t for a bfloat16 cache, widened exactly)
template <class V, class T>
inline void attend_row(const float* q, const T* k, const T* v, int64_t L, int64_t D, float scale, float* o,
                       float* scores) {
  using Vec = typename V::Vec;
  constexpr int W = V::kLanes;
  float top = -INFINITY;
  int64_t j = 0;
  if (D % W == 0)  // four keys side by side (four FMA chains), each summed as alone below
    for (; j + 4 <= L; j += 4) {
      Vec acc[4] = {V::zero(), V::zero(), V::zero(), V::zero()};
      for (int64_t d = 0; d < D; d += W) {
        const Vec qd = V::load(q + d);
        for (int u = 0; u < 4; ++u) acc[u] = V::fma(qd, V::load(k + (j + u) * D + d), acc[u]);
      }
      for (int u = 0; u < 4; ++u) {
        scores[j + u] = V::sum(acc[u]) * scale;
        top = std::max(top, scores[j + u]);
      }
    }
  for (; j < L; ++j) {
    Vec acc = V::zero();
    int64_t d = 0;
    for (; d + W <= D; d += W) acc = V::fma(V::load(q + d), V::load(k + j * D + d), acc);
    float s = V::sum(acc);
    for (; d < D; ++d) {
      float kv;
      if constexpr (sizeof(T) == 2) kv = bf16_to_float(k[j * D + d]); else kv = k[j * D + d];
      s = std::fma(q[d], kv, s);
    }
    scores[j] = s * scale;
    top = std::max(top, scores[j]);
  }
  const int64_t L_vec = L / W * W;
  Vec total = V::zero();
  for (int64_t j = 0; j < L_vec; j += W) {
    Vec e = vexp<V>(V::sub(V::load(scores + j), V::set1(top)));
    V::store(scores + j, e);
    total = V::add(total, e);
  }
  float sum = V::sum(total);
  if (L_vec < L) {  // the tail through the same vector exp
    alignas(64) float tail[W];
    for (int t = 0; t < W; ++t) tail[t] = L_vec + t < L ? scores[L_vec + t] - top : 0.0f;
    V::store(tail, vexp<V>(V::load(tail)));
    for (int64_t j = L_vec; j < L; ++j) sum += (scores[j] = tail[j - L_vec]);
  }
  const float inv = 1.0f / sum;
  int64_t d = 0;
  while (d + W <= D) {  // up to kMaxBlocks vectors of the output a pass over the values
    constexpr int64_t kMaxBlocks = W == 16 ? 8 : 4;
    const int64_t nb = std::min<int64_t>(kMaxBlocks, (D - d) / W);
    switch (nb) {
      case 8: weighted_sum<V, T, (W == 16 ? 8 : 4)>(scores, v + d, L, D, inv, o + d); break;
      case 7: weighted_sum<V, T, (W == 16 ? 7 : 4)>(scores, v + d, L, D, inv, o + d); break;
      case 6: weighted_sum<V, T, (W == 16 ? 6 : 4)>(scores, v + d, L, D, inv, o + d); break;
      case 5: weighted_sum<V, T, (W == 16 ? 5 : 4)>(scores, v + d, L, D, inv, o + d); break;
      case 4: weighted_sum<V, T, 4>(scores, v + d, L, D, inv, o + d); break;
      case 3: weighted_sum<V, T, 3>(scores, v + d, L, D, inv, o + d); break;
      case 2: weighted_sum<V, T, 2>(scores, v + d, L, D, inv, o + d); break;
      default: weighted_sum<V, T, 1>(scores, v + d, L, D, inv, o + d);
    }
    d += nb * W;
  }
  for (; d < D; ++d) {
    float acc = 0.0f;
    for (int64_t j = 0; j < L; ++j) {
      float vv;
      if constexpr (sizeof(T) == 2) vv = bf16_to_float(v[j * D + d]); else vv = v[j * D + d];
      acc = std::fma(scores[j], vv, acc);
    }
    o[d] = acc * inv;
  }
}

// ---------------------------------------------------------------- dispatch
using AttendFn = void (*)(const float* q, const void* k, const void* v, int64_t L, int64_t D, float scale, float* o,
                          float* scores);
using NormFn = void (*)(const float* x, const float* w, float* y, int64_t n, float eps);
using QuantizeFn = void (*)(const float* x, int64_t kp, int8_t* q, int64_t stride, float* scale, int32_t* corr,
                           int32_t zero_point);

// The kernels of one instruction set.
struct Isa {
  const char* name = "";
  PanelsFn panels[NUM_FORMATS][kMaxPass + 1] = {};  // by format and input rows per pass
  int max_pass[NUM_FORMATS] = {};                   // 0: the format is not available
  bool bf16_dot = false;                            // BF16 reads bfloat16 inputs (dot products)
  AttendFn attend_f32 = nullptr, attend_bf16 = nullptr;
  NormFn rms_norm = nullptr;
  QuantizeFn quantize = nullptr;
};

const Isa& isa();  // the best this CPU runs (PACE_KERNEL_ISA=avx2 / avx512 force the lesser paths)

}  // namespace pace
