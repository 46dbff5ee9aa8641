// Few-rows kernels for CPU decoding: y = x @ W^T for the 1..64 rows of a decode step, a
// speculative verify or a chunk of a prompt, over weights packed for streaming; causal
// attention of a few query rows over a KV cache; the small row-wise ops between them.
//
// Decoding is memory-bound: every weight is read once per forward whatever the number of
// rows. A weight matrix is packed into blocks of kBlockRows output rows, and within a
// block the rows' k-chunks of kChunkBytes bytes are interleaved: [row0 chunk0][row1
// chunk0][row2 chunk0][row3 chunk0][row0 chunk1]..., so a thread reads its part of a
// matrix as one sequential stream (what the hardware prefetchers follow best) and applies
// each chunk to all the rows of the forward while it sits in registers / L1.
//
// Formats (one per linear): float32; bfloat16 (AVX512_BF16 dot products where the CPU has
// them, else widened exactly to float32); int8 (symmetric per output row, stored +128 as
// u8); int4 (symmetric in groups of 128 along k with a float scale each, stored +8 as
// nibbles: byte j of a group's chunk holds element j in its low nibble and element 64+j in
// its high one). For int8/int4 the input rows are quantized to int8 in groups of 128 along
// k (a float scale per group, as llama.cpp's q8 activations) and multiplied with integer
// dot products (AVX512-VNNI VPDPBUSD: u8 weights x s8 inputs, the zero points corrected
// by the input group's sum), each group's integer sum scaled once in float.
//
// Exactness: each output element is one fixed sequence of operations that depends on its
// own input row and weight row only (vector lanes over k in a fixed order, one fixed
// horizontal sum), never on how many rows a forward has, how they are split into passes,
// or which thread computes them: a K+1-row verify gives bit-identical results to K+1
// one-row steps, so speculation never changes a logit. (Results differ between ISAs and
// formats, never between runs.)
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
constexpr int kBlockRows = 4;    // output rows per packed block
constexpr int kChunkBytes = 64;  // bytes of one row per k-chunk
constexpr int kGroup = 128;      // int8/int4: input (and int4 weight) quantization group along k
constexpr int kMaxPass = 6;      // input rows per pass, at most

inline int64_t chunk_elems(int fmt) { return fmt == F32 ? 16 : fmt == BF16 ? 32 : fmt == INT8 ? 64 : 128; }
// k is padded (with zero weights) to a multiple of this
inline int64_t k_align(int fmt) { return fmt == INT8 || fmt == INT4 ? kGroup : chunk_elems(fmt); }
inline int64_t round_up(int64_t a, int64_t b) { return (a + b - 1) / b * b; }
inline int64_t packed_row_bytes(int fmt, int64_t kp) { return kp * kChunkBytes / chunk_elems(fmt); }

// One packed linear: N outputs (padded to Np), K inputs (padded to Kp).
struct Linear {
  int32_t fmt = F32;
  int64_t N = 0, K = 0, Np = 0, Kp = 0;
  const uint8_t* w = nullptr;
  const float* scale = nullptr;  // INT8: per output row (Np); INT4: [Np/4 blocks][Kp/128 groups][4 rows]
  const float* bias = nullptr;   // N floats or none
  int64_t blocks() const { return Np / kBlockRows; }
  int64_t groups() const { return Kp / kGroup; }
};

// A linear's input rows, in the form its kernel reads (prepare_row writes them).
struct Act {
  const float* f32 = nullptr;      // float32 rows (F32, and BF16 without dot products)
  const uint16_t* bf16 = nullptr;  // bfloat16 rows (BF16 with dot products)
  const int8_t* q = nullptr;       // int8 rows (INT8, INT4)
  const float* qscale = nullptr;   // per row and group
  const int32_t* qcorr = nullptr;  // per row and group: -zero_point * sum of the group's int8 values
  int64_t ld = 0;                  // elements per row (the linear's Kp)
  int64_t groups = 0;              // per row (Kp / 128)
};

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

// ---------------------------------------------------------------- linear kernels
// Each computes input rows m0..m0+MB-1 against packed blocks [b0, b1) and finishes every
// (row, output) with finish(): the horizontal sum of its accumulator, then the row scale
// (int8), the bias, and the residual (accumulate: y += value, else y = value).
using RowsFn = void (*)(const Linear&, const Act&, int64_t m0, float* y, int64_t ldy, int64_t b0, int64_t b1,
                        bool accumulate);

inline void finish(const Linear& L, int64_t n, float v, float* y, bool accumulate) {
  if (n >= L.N) return;
  if (L.fmt == INT8) v *= L.scale[n];
  if (L.bias) v += L.bias[n];
  *y = accumulate ? *y + v : v;
}

template <int MB>
PACE_AVX512_FN void rows_f32_avx512(const Linear& L, const Act& a, int64_t m0, float* y, int64_t ldy, int64_t b0,
                                    int64_t b1, bool accumulate) {
  const int64_t chunks = L.Kp / 16;
  for (int64_t b = b0; b < b1; ++b) {
    const float* w = reinterpret_cast<const float*>(L.w) + b * kBlockRows * L.Kp;
    __m512 s[kBlockRows][MB];
    for (int n = 0; n < kBlockRows; ++n)
      for (int m = 0; m < MB; ++m) s[n][m] = _mm512_setzero_ps();
    for (int64_t c = 0; c < chunks; ++c, w += 64) {
      __m512 wv[kBlockRows];
      for (int n = 0; n < kBlockRows; ++n) wv[n] = _mm512_loadu_ps(w + 16 * n);
      for (int m = 0; m < MB; ++m) {
        const __m512 xv = _mm512_loadu_ps(a.f32 + (m0 + m) * a.ld + c * 16);
        for (int n = 0; n < kBlockRows; ++n) s[n][m] = _mm512_fmadd_ps(wv[n], xv, s[n][m]);
      }
    }
    for (int m = 0; m < MB; ++m)
      for (int n = 0; n < kBlockRows; ++n)
        finish(L, b * kBlockRows + n, Avx512::sum(s[n][m]), y + (m0 + m) * ldy + b * kBlockRows + n, accumulate);
  }
}

// bfloat16 weights widened exactly to float32 (AVX-512 without BF16 dot products)
template <int MB>
PACE_AVX512_FN void rows_bf16_avx512(const Linear& L, const Act& a, int64_t m0, float* y, int64_t ldy, int64_t b0,
                                     int64_t b1, bool accumulate) {
  const int64_t chunks = L.Kp / 32;
  for (int64_t b = b0; b < b1; ++b) {
    const uint16_t* w = reinterpret_cast<const uint16_t*>(L.w) + b * kBlockRows * L.Kp;
    __m512 s[kBlockRows][MB];
    for (int n = 0; n < kBlockRows; ++n)
      for (int m = 0; m < MB; ++m) s[n][m] = _mm512_setzero_ps();
    for (int64_t c = 0; c < chunks; ++c, w += 128) {
      __m512 lo[kBlockRows], hi[kBlockRows];
      for (int n = 0; n < kBlockRows; ++n) {
        lo[n] = Avx512::load(w + 32 * n);
        hi[n] = Avx512::load(w + 32 * n + 16);
      }
      for (int m = 0; m < MB; ++m) {
        const float* x = a.f32 + (m0 + m) * a.ld + c * 32;
        const __m512 xl = _mm512_loadu_ps(x), xh = _mm512_loadu_ps(x + 16);
        for (int n = 0; n < kBlockRows; ++n) s[n][m] = _mm512_fmadd_ps(hi[n], xh, _mm512_fmadd_ps(lo[n], xl, s[n][m]));
      }
    }
    for (int m = 0; m < MB; ++m)
      for (int n = 0; n < kBlockRows; ++n)
        finish(L, b * kBlockRows + n, Avx512::sum(s[n][m]), y + (m0 + m) * ldy + b * kBlockRows + n, accumulate);
  }
}

// bfloat16 weights and inputs, VDPBF16PS: 32 pairs of products (exact) summed into 16
// float32 lanes per instruction
template <int MB>
PACE_BF16_FN void rows_bf16dp_avx512(const Linear& L, const Act& a, int64_t m0, float* y, int64_t ldy, int64_t b0,
                                     int64_t b1, bool accumulate) {
  const int64_t chunks = L.Kp / 32;
  for (int64_t b = b0; b < b1; ++b) {
    const uint16_t* w = reinterpret_cast<const uint16_t*>(L.w) + b * kBlockRows * L.Kp;
    __m512 s[kBlockRows][MB];
    for (int n = 0; n < kBlockRows; ++n)
      for (int m = 0; m < MB; ++m) s[n][m] = _mm512_setzero_ps();
    for (int64_t c = 0; c < chunks; ++c, w += 128) {
      __m512i wv[kBlockRows];
      for (int n = 0; n < kBlockRows; ++n) wv[n] = _mm512_loadu_si512(w + 32 * n);
      for (int m = 0; m < MB; ++m) {
        const __m512bh xv = (__m512bh)_mm512_loadu_si512(a.bf16 + (m0 + m) * a.ld + c * 32);
        for (int n = 0; n < kBlockRows; ++n) s[n][m] = _mm512_dpbf16_ps(s[n][m], (__m512bh)wv[n], xv);
      }
    }
    for (int m = 0; m < MB; ++m)
      for (int n = 0; n < kBlockRows; ++n)
        finish(L, b * kBlockRows + n, Avx512::sum(s[n][m]), y + (m0 + m) * ldy + b * kBlockRows + n, accumulate);
  }
}

// int8 weights (u8 = q + 128) x int8 inputs, VPDPBUSD; per group of 128: two dot products
// onto the zero-point correction, converted exactly (|lane| < 2^24) and scaled by the
// input group's scale; the row scale at the end
template <int MB>
PACE_VNNI_FN void rows_int8_avx512(const Linear& L, const Act& a, int64_t m0, float* y, int64_t ldy, int64_t b0,
                                   int64_t b1, bool accumulate) {
  const int64_t groups = L.groups();
  for (int64_t b = b0; b < b1; ++b) {
    const uint8_t* w = L.w + b * kBlockRows * L.Kp;
    __m512 s[kBlockRows][MB];
    for (int n = 0; n < kBlockRows; ++n)
      for (int m = 0; m < MB; ++m) s[n][m] = _mm512_setzero_ps();
    for (int64_t g = 0; g < groups; ++g, w += 2 * kBlockRows * 64) {
      __m512i w0[kBlockRows], w1[kBlockRows];
      for (int n = 0; n < kBlockRows; ++n) {
        w0[n] = _mm512_loadu_si512(w + 64 * n);
        w1[n] = _mm512_loadu_si512(w + kBlockRows * 64 + 64 * n);
      }
      for (int m = 0; m < MB; ++m) {
        const int8_t* x = a.q + (m0 + m) * a.ld + g * kGroup;
        const __m512i x0 = _mm512_loadu_si512(x), x1 = _mm512_loadu_si512(x + 64);
        const __m512i init = _mm512_zextsi128_si512(_mm_cvtsi32_si128(a.qcorr[(m0 + m) * a.groups + g]));
        const __m512 sx = _mm512_set1_ps(a.qscale[(m0 + m) * a.groups + g]);
        for (int n = 0; n < kBlockRows; ++n) {
          const __m512i t = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(init, w0[n], x0), w1[n], x1);
          s[n][m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(t), sx, s[n][m]);
        }
      }
    }
    for (int m = 0; m < MB; ++m)
      for (int n = 0; n < kBlockRows; ++n)
        finish(L, b * kBlockRows + n, Avx512::sum(s[n][m]), y + (m0 + m) * ldy + b * kBlockRows + n, accumulate);
  }
}

// int4 weights (nibbles q + 8, a scale per row and group) x int8 inputs, VPDPBUSD
template <int MB>
PACE_VNNI_FN void rows_int4_avx512(const Linear& L, const Act& a, int64_t m0, float* y, int64_t ldy, int64_t b0,
                                   int64_t b1, bool accumulate) {
  const int64_t groups = L.groups();
  const __m512i low4 = _mm512_set1_epi8(0x0f);
  for (int64_t b = b0; b < b1; ++b) {
    const uint8_t* w = L.w + b * kBlockRows * (L.Kp / 2);
    const float* ws = L.scale + b * groups * kBlockRows;
    __m512 s[kBlockRows][MB];
    for (int n = 0; n < kBlockRows; ++n)
      for (int m = 0; m < MB; ++m) s[n][m] = _mm512_setzero_ps();
    for (int64_t g = 0; g < groups; ++g, w += kBlockRows * 64, ws += kBlockRows) {
      __m512i lo[kBlockRows], hi[kBlockRows];
      __m512 sw[kBlockRows];
      for (int n = 0; n < kBlockRows; ++n) {
        const __m512i raw = _mm512_loadu_si512(w + 64 * n);
        lo[n] = _mm512_and_si512(raw, low4);
        hi[n] = _mm512_and_si512(_mm512_srli_epi16(raw, 4), low4);
        sw[n] = _mm512_set1_ps(ws[n]);
      }
      for (int m = 0; m < MB; ++m) {
        const int8_t* x = a.q + (m0 + m) * a.ld + g * kGroup;
        const __m512i x0 = _mm512_loadu_si512(x), x1 = _mm512_loadu_si512(x + 64);
        const __m512i init = _mm512_zextsi128_si512(_mm_cvtsi32_si128(a.qcorr[(m0 + m) * a.groups + g]));
        const __m512 sx = _mm512_set1_ps(a.qscale[(m0 + m) * a.groups + g]);
        for (int n = 0; n < kBlockRows; ++n) {
          const __m512i t = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(init, lo[n], x0), hi[n], x1);
          s[n][m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(t), _mm512_mul_ps(sw[n], sx), s[n][m]);
        }
      }
    }
    for (int m = 0; m < MB; ++m)
      for (int n = 0; n < kBlockRows; ++n)
        finish(L, b * kBlockRows + n, Avx512::sum(s[n][m]), y + (m0 + m) * ldy + b * kBlockRows + n, accumulate);
  }
}

// ---- AVX2 (and FMA): the same layouts, 8-lane accumulators
template <int MB>
PACE_AVX2_FN void rows_f32_avx2(const Linear& L, const Act& a, int64_t m0, float* y, int64_t ldy, int64_t b0,
                                int64_t b1, bool accumulate) {
  const int64_t chunks = L.Kp / 16;
  for (int64_t b = b0; b < b1; ++b) {
    const float* w = reinterpret_cast<const float*>(L.w) + b * kBlockRows * L.Kp;
    __m256 s[kBlockRows][MB];
    for (int n = 0; n < kBlockRows; ++n)
      for (int m = 0; m < MB; ++m) s[n][m] = _mm256_setzero_ps();
    for (int64_t c = 0; c < chunks; ++c, w += 64)
      for (int m = 0; m < MB; ++m) {
        const float* x = a.f32 + (m0 + m) * a.ld + c * 16;
        const __m256 xl = _mm256_loadu_ps(x), xh = _mm256_loadu_ps(x + 8);
        for (int n = 0; n < kBlockRows; ++n)
          s[n][m] = _mm256_fmadd_ps(_mm256_loadu_ps(w + 16 * n + 8), xh,
                                    _mm256_fmadd_ps(_mm256_loadu_ps(w + 16 * n), xl, s[n][m]));
      }
    for (int m = 0; m < MB; ++m)
      for (int n = 0; n < kBlockRows; ++n)
        finish(L, b * kBlockRows + n, Avx2::sum(s[n][m]), y + (m0 + m) * ldy + b * kBlockRows + n, accumulate);
  }
}

template <int MB>
PACE_AVX2_FN void rows_bf16_avx2(const Linear& L, const Act& a, int64_t m0, float* y, int64_t ldy, int64_t b0,
                                 int64_t b1, bool accumulate) {
  const int64_t chunks = L.Kp / 32;
  for (int64_t b = b0; b < b1; ++b) {
    const uint16_t* w = reinterpret_cast<const uint16_t*>(L.w) + b * kBlockRows * L.Kp;
    __m256 s[kBlockRows][MB];
    for (int n = 0; n < kBlockRows; ++n)
      for (int m = 0; m < MB; ++m) s[n][m] = _mm256_setzero_ps();
    for (int64_t c = 0; c < chunks; ++c, w += 128)
      for (int m = 0; m < MB; ++m) {
        const float* x = a.f32 + (m0 + m) * a.ld + c * 32;
        for (int n = 0; n < kBlockRows; ++n)
          for (int q = 0; q < 4; ++q)
            s[n][m] = _mm256_fmadd_ps(Avx2::load(w + 32 * n + 8 * q), _mm256_loadu_ps(x + 8 * q), s[n][m]);
      }
    for (int m = 0; m < MB; ++m)
      for (int n = 0; n < kBlockRows; ++n)
        finish(L, b * kBlockRows + n, Avx2::sum(s[n][m]), y + (m0 + m) * ldy + b * kBlockRows + n, accumulate);
  }
}

// int8 / int4 on AVX2: u8 weights and s8 inputs widened to int16, VPMADDWD into int32
// lanes (exact, as VPDPBUSD), the same zero-point correction and scales
template <int MB, bool kInt4>
PACE_AVX2_FN void rows_int_avx2(const Linear& L, const Act& a, int64_t m0, float* y, int64_t ldy, int64_t b0,
                                int64_t b1, bool accumulate) {
  const int64_t groups = L.groups();
  const int64_t group_bytes = kInt4 ? 64 : 128;  // one row's bytes of one group
  const __m128i low4 = _mm_set1_epi8(0x0f);
  for (int64_t b = b0; b < b1; ++b) {
    const uint8_t* w = L.w + b * kBlockRows * groups * group_bytes;
    __m256 s[kBlockRows][MB];
    for (int n = 0; n < kBlockRows; ++n)
      for (int m = 0; m < MB; ++m) s[n][m] = _mm256_setzero_ps();
    for (int64_t g = 0; g < groups; ++g, w += kBlockRows * group_bytes) {
      for (int m = 0; m < MB; ++m) {
        const int8_t* x = a.q + (m0 + m) * a.ld + g * kGroup;
        const __m256i init = _mm256_zextsi128_si256(_mm_cvtsi32_si128(a.qcorr[(m0 + m) * a.groups + g]));
        const float sx = a.qscale[(m0 + m) * a.groups + g];
        for (int n = 0; n < kBlockRows; ++n) {
          __m256i t = init;
          for (int j = 0; j < 8; ++j) {  // 16 elements at a time
            __m128i wb;
            if (kInt4) {  // elements 16j..16j+15: low nibbles of bytes 16j.. (j < 4), high nibbles of 16(j-4).. after
              const __m128i raw = _mm_loadu_si128((const __m128i*)(w + 64 * n + 16 * (j & 3)));
              wb = j < 4 ? _mm_and_si128(raw, low4) : _mm_and_si128(_mm_srli_epi16(raw, 4), low4);
            } else {  // chunk j/4 of the group (rows interleaved per chunk), bytes 16*(j%4)..
              wb = _mm_loadu_si128((const __m128i*)(w + (j / 4) * kBlockRows * 64 + 64 * n + 16 * (j & 3)));
            }
            const __m256i xw = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i*)(x + 16 * j)));
            t = _mm256_add_epi32(t, _mm256_madd_epi16(_mm256_cvtepu8_epi16(wb), xw));
          }
          const float scale = kInt4 ? L.scale[(b * groups + g) * kBlockRows + n] * sx : sx;
          s[n][m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(t), _mm256_set1_ps(scale), s[n][m]);
        }
      }
    }
    for (int m = 0; m < MB; ++m)
      for (int n = 0; n < kBlockRows; ++n)
        finish(L, b * kBlockRows + n, Avx2::sum(s[n][m]), y + (m0 + m) * ldy + b * kBlockRows + n, accumulate);
  }
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

// act[u] = silu(gate[u]) * up[u]
template <class V>
inline void silu_mul_row(const float* gate, const float* up, float* act, int64_t n) {
  constexpr int W = V::kLanes;
  int64_t i = 0;
  const auto one = V::set1(1.0f), zero = V::zero();
  for (; i + W <= n; i += W) {
    const auto g = V::load(gate + i);
    V::store(act + i, V::mul(V::div(g, V::add(one, vexp<V>(V::sub(zero, g)))), V::load(up + i)));
  }
  for (; i < n; ++i) act[i] = gate[i] / (1.0f + std::exp(-gate[i])) * up[i];
}

// An input row in the form a format's kernel reads: bfloat16 (rounded to nearest even),
// or int8 in groups of 128 (scale = max|x| / 127, values rounded to nearest even) with
// each group's correction -zero_point * sum. Writes all kp elements (x's padding is 0).
template <class V>
inline void quantize_row(const float* x, int64_t kp, int8_t* q, float* scale, int32_t* corr, int32_t zero_point) {
  constexpr int W = V::kLanes;
  for (int64_t g = 0; g < kp / kGroup; ++g) {
    const float* xg = x + g * kGroup;
    auto amax = V::zero();
    for (int i = 0; i < kGroup; i += W) amax = V::max(amax, V::abs(V::load(xg + i)));
    const float m = V::max_of(amax);
    const float d = m / 127.0f, inv = m > 0.0f ? 127.0f / m : 0.0f;
    int32_t sum = 0;
    for (int i = 0; i < kGroup; ++i) {
      const int32_t v = int32_t(std::nearbyint(xg[i] * inv));
      q[g * kGroup + i] = int8_t(std::max(-127, std::min(127, v)));
      sum += q[g * kGroup + i];
    }
    scale[g] = d;
    corr[g] = -zero_point * sum;
  }
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
  for (int64_t j = 0; j < L; ++j) {
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
  for (; d + W <= D; d += W) {
    Vec acc = V::zero();
    for (int64_t j = 0; j < L; ++j) acc = V::fma(V::set1(scores[j]), V::load(v + j * D + d), acc);
    V::store(o + d, V::mul(acc, V::set1(inv)));
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
using SiluMulFn = void (*)(const float* gate, const float* up, float* act, int64_t n);
using QuantizeFn = void (*)(const float* x, int64_t kp, int8_t* q, float* scale, int32_t* corr, int32_t zero_point);

// The kernels of one instruction set.
struct Isa {
  const char* name = "";
  RowsFn rows[NUM_FORMATS][kMaxPass + 1] = {};  // by format and input rows per pass
  int max_pass[NUM_FORMATS] = {};               // 0: the format is not available
  bool bf16_dot = false;                        // BF16 reads bfloat16 inputs (dot products)
  AttendFn attend_f32 = nullptr, attend_bf16 = nullptr;
  NormFn rms_norm = nullptr;
  SiluMulFn silu_mul = nullptr;
  QuantizeFn quantize = nullptr;
};

const Isa& isa();  // the best this CPU runs (PACE_KERNEL_ISA=avx2 / avx512 force the lesser paths)

}  // namespace pace
