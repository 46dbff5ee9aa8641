// Few-rows kernels: y = x @ W^T + b, and causal attention, for the 1..64 tokens of a
// decode step, a speculative verify or a chunk of a prompt.
//
// Decoding is memory-bound: every weight is read once per forward whatever the number
// of rows. CPU GEMM libraries are tuned for many rows and, for 2..33 rows, repack or
// re-read the weight and fall far behind the memory floor. The linear kernel streams
// each block of weight rows once (prefetched a block ahead) and applies it to all rows
// while it sits in L1/L2, so a verify costs far less than K+1 decode steps.
//
// Exactness: each output element is the same sequence of fp32 FMAs (vector lanes, each
// summing k = lane mod width in order, then one fixed horizontal sum) whatever the
// number of rows and whichever block or thread computes it; attention computes each
// query row alone. A 9-token verify therefore gives bit-identical results to nine
// 1-token forwards: speculation never changes a logit.
//
// Float32 and bfloat16 (linear: bfloat16 weights and inputs multiplied with AVX512_BF16
// dot products where the CPU has them, else widened exactly in registers; attention:
// a bfloat16 cache widened exactly, float32 sums), with AVX-512 or AVX2+FMA chosen at run
// time (PACE_KERNEL_ISA=avx2 / avx512 force the lesser paths); other dtypes and CPUs use
// torch's ops (callers check few_rows_linear_supported).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <immintrin.h>

#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <optional>
#include <string>

namespace {

// One output element = a vector accumulator of W[n, k..] * x[m, k..] over k in order,
// then a fixed horizontal sum, then the K % lanes tail in order. Blocks of NB weight
// rows x MB input rows keep NB*MB accumulators in registers: every weight vector is
// loaded once per block and used MB times; the block shape never changes a result.
// (rows_* are flattened: block and the vector helpers inline into their ISA's code)
#define PACE_AVX512 __attribute__((target("avx512f"))) inline
#define PACE_AVX2 __attribute__((target("avx2,fma"))) inline

struct Avx512 {
  using Vec = __m512;
  static constexpr int kLanes = 16, kMaxAcc = 24;  // of 32 registers: + NB weights + 1 input
  static PACE_AVX512 Vec zero() { return _mm512_setzero_ps(); }
  static PACE_AVX512 Vec load(const float* p) { return _mm512_loadu_ps(p); }
  static PACE_AVX512 Vec load(const uint16_t* p) {  // 16 bfloat16 -> float32 (exact)
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)p)), 16));
  }
  static PACE_AVX512 Vec fma(Vec a, Vec b, Vec c) { return _mm512_fmadd_ps(a, b, c); }
  static PACE_AVX512 Vec set1(float a) { return _mm512_set1_ps(a); }
  static PACE_AVX512 void store(float* p, Vec v) { _mm512_storeu_ps(p, v); }
  static PACE_AVX512 Vec add(Vec a, Vec b) { return _mm512_add_ps(a, b); }
  static PACE_AVX512 Vec mul(Vec a, Vec b) { return _mm512_mul_ps(a, b); }
  static PACE_AVX512 Vec max(Vec a, Vec b) { return _mm512_max_ps(a, b); }
  static PACE_AVX512 Vec min(Vec a, Vec b) { return _mm512_min_ps(a, b); }
  static PACE_AVX512 Vec floor(Vec a) { return _mm512_roundscale_ps(a, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC); }
  static PACE_AVX512 Vec pow2(Vec n) {  // 2^n for integral n in float range
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)), 23));
  }
  static PACE_AVX512 float sum(Vec v) {  // 16 -> 8 -> 4 -> 2 -> 1
    __m256 s8 = _mm256_add_ps(_mm512_castps512_ps256(v), _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1)));
    __m128 s4 = _mm_add_ps(_mm256_castps256_ps128(s8), _mm256_extractf128_ps(s8, 1));
    __m128 s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
    return _mm_cvtss_f32(_mm_add_ss(s2, _mm_shuffle_ps(s2, s2, 1)));
  }
};

struct Avx2 {
  using Vec = __m256;
  static constexpr int kLanes = 8, kMaxAcc = 12;  // of 16 registers
  static PACE_AVX2 Vec zero() { return _mm256_setzero_ps(); }
  static PACE_AVX2 Vec load(const float* p) { return _mm256_loadu_ps(p); }
  static PACE_AVX2 Vec load(const uint16_t* p) {  // 8 bfloat16 -> float32 (exact)
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)p)), 16));
  }
  static PACE_AVX2 Vec fma(Vec a, Vec b, Vec c) { return _mm256_fmadd_ps(a, b, c); }
  static PACE_AVX2 Vec set1(float a) { return _mm256_set1_ps(a); }
  static PACE_AVX2 void store(float* p, Vec v) { _mm256_storeu_ps(p, v); }
  static PACE_AVX2 Vec add(Vec a, Vec b) { return _mm256_add_ps(a, b); }
  static PACE_AVX2 Vec mul(Vec a, Vec b) { return _mm256_mul_ps(a, b); }
  static PACE_AVX2 Vec max(Vec a, Vec b) { return _mm256_max_ps(a, b); }
  static PACE_AVX2 Vec min(Vec a, Vec b) { return _mm256_min_ps(a, b); }
  static PACE_AVX2 Vec floor(Vec a) { return _mm256_floor_ps(a); }
  static PACE_AVX2 Vec pow2(Vec n) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23));
  }
  static PACE_AVX2 float sum(Vec v) {  // 8 -> 4 -> 2 -> 1
    __m128 s4 = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    __m128 s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
    return _mm_cvtss_f32(_mm_add_ss(s2, _mm_shuffle_ps(s2, s2, 1)));
  }
};

// Weight rows are streamed from memory once: prefetch them this many blocks ahead
// (a block's NB rows are contiguous, so this runs ahead in one sequential stream).
// With one or two input rows the loop is load-bound and the hardware prefetcher keeps up.
#ifndef PACE_PREFETCH_BLOCKS
#define PACE_PREFETCH_BLOCKS 1
#endif
constexpr int kPrefetchBlocks = PACE_PREFETCH_BLOCKS;

inline float to_float(float v) { return v; }
inline float to_float(uint16_t v) {  // bfloat16 bits -> float32
  uint32_t bits = uint32_t(v) << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

// y[m * ldy + n] for m < MB, n < NB, from input rows x + m*K and weight rows w + n*K
// (T: float, or uint16_t for bfloat16 weights, widened exactly to float32 in registers)
template <class V, class T, int NB, int MB>
inline void block(const float* x, const T* w, int64_t K, float* y, int64_t ldy) {
  typename V::Vec acc[NB][MB];
  for (int n = 0; n < NB; ++n)
    for (int m = 0; m < MB; ++m) acc[n][m] = V::zero();
  int64_t k = 0;
  for (; k + V::kLanes <= K; k += V::kLanes) {
    typename V::Vec wv[NB];
    for (int n = 0; n < NB; ++n) {
      wv[n] = V::load(w + n * K + k);
      if (MB > 2) __builtin_prefetch(w + (n + kPrefetchBlocks * NB) * K + k);  // the same place, blocks ahead
    }
    for (int m = 0; m < MB; ++m) {
      typename V::Vec xv = V::load(x + m * K + k);
      for (int n = 0; n < NB; ++n) acc[n][m] = V::fma(wv[n], xv, acc[n][m]);
    }
  }
  for (int m = 0; m < MB; ++m)
    for (int n = 0; n < NB; ++n) {
      float s = V::sum(acc[n][m]);
      for (int64_t t = k; t < K; ++t) s = std::fma(to_float(w[n * K + t]), x[m * K + t], s);
      y[m * ldy + n] = s;
    }
}

// Weight rows [first, last) in blocks of NB (last - first divisible by NB), input rows
// in one pass of MB.
template <class T, int NB, int MB>
__attribute__((target("avx512f"), flatten)) void rows_avx512(const void* x, const void* w, int64_t K, float* y, int64_t ldy,
                                                    int64_t first, int64_t last) {
  for (int64_t n = first; n < last; n += NB)
    block<Avx512, T, NB, MB>(static_cast<const float*>(x), static_cast<const T*>(w) + n * K, K, y + n, ldy);
}

template <class T, int NB, int MB>
__attribute__((target("avx2,fma"), flatten)) void rows_avx2(const void* x, const void* w, int64_t K, float* y, int64_t ldy,
                                                   int64_t first, int64_t last) {
  for (int64_t n = first; n < last; n += NB)
    block<Avx2, T, NB, MB>(static_cast<const float*>(x), static_cast<const T*>(w) + n * K, K, y + n, ldy);
}

// bfloat16 weights and inputs on CPUs with AVX512_BF16: VDPBF16PS multiplies 32 pairs
// of bfloat16 (products exact) and adds each pair into a float32 lane, a quarter of the
// instructions of widening both and FMA-ing (which streamed at ~0.78 of float32's
// bandwidth: the extra instructions, not the arithmetic, held back the loads). Each
// output element is still the same sequence of operations for any row count.
template <int NB, int MB>
__attribute__((target("avx512f,avx512bf16"))) inline void block_dpbf16(const uint16_t* x, const uint16_t* w, int64_t K,
                                                                        float* y, int64_t ldy) {
  __m512 acc[NB][MB];
  for (int n = 0; n < NB; ++n)
    for (int m = 0; m < MB; ++m) acc[n][m] = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + 32 <= K; k += 32) {
    __m512i wv[NB];
    for (int n = 0; n < NB; ++n) {
      wv[n] = _mm512_loadu_si512(w + n * K + k);
      if (MB > 2) __builtin_prefetch(w + (n + kPrefetchBlocks * NB) * K + k);
    }
    for (int m = 0; m < MB; ++m) {
      const __m512bh xv = (__m512bh)_mm512_loadu_si512(x + m * K + k);
      for (int n = 0; n < NB; ++n) acc[n][m] = _mm512_dpbf16_ps(acc[n][m], (__m512bh)wv[n], xv);
    }
  }
  for (int m = 0; m < MB; ++m)
    for (int n = 0; n < NB; ++n) {
      float s = Avx512::sum(acc[n][m]);
      for (int64_t t = k; t < K; ++t) s = std::fma(to_float(w[n * K + t]), to_float(x[m * K + t]), s);
      y[m * ldy + n] = s;
    }
}

template <int NB, int MB>
__attribute__((target("avx512f,avx512bf16"), flatten)) void rows_dpbf16(const void* x, const void* w, int64_t K, float* y,
                                                                       int64_t ldy, int64_t first, int64_t last) {
  for (int64_t n = first; n < last; n += NB)
    block_dpbf16<NB, MB>(static_cast<const uint16_t*>(x), static_cast<const uint16_t*>(w) + n * K, K, y + n, ldy);
}

// exp(x) for x <= 0 (softmax after subtracting the max): Cephes' expf, ~1 ulp
template <class V>
inline typename V::Vec exp_nonpositive(typename V::Vec x) {
  using Vec = typename V::Vec;
  x = V::max(x, V::set1(-87.0f));  // exp(-87) ~ 1.6e-38: the smallest normal float's range
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

// One query row of one head: o = softmax(q . K^T * scale) V over keys 0..L-1.
// Scores, exponentials and the weighted sum of values each run in key order, so the
// result depends on nothing but this query and these keys. (T: the cache's float, or
// uint16_t for a bfloat16 cache, widened exactly to float32 in registers)
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
    for (; d < D; ++d) s = std::fma(q[d], to_float(k[j * D + d]), s);
    scores[j] = s * scale;
    top = std::max(top, scores[j]);
  }
  const int64_t L_vec = L / W * W;
  Vec total = V::zero();
  for (int64_t j = 0; j < L_vec; j += W) {
    Vec e = exp_nonpositive<V>(V::add(V::load(scores + j), V::set1(-top)));
    V::store(scores + j, e);
    total = V::add(total, e);
  }
  float sum = V::sum(total);
  if (L_vec < L) {  // the tail through the same vector exp, zero-padded lanes unused
    float tail[W];
    for (int t = 0; t < W; ++t) tail[t] = L_vec + t < L ? scores[L_vec + t] - top : 0.0f;
    V::store(tail, exp_nonpositive<V>(V::load(tail)));
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
    for (int64_t j = 0; j < L; ++j) acc = std::fma(scores[j], to_float(v[j * D + d]), acc);
    o[d] = acc * inv;
  }
}

using AttendFn = void (*)(const float*, const void*, const void*, int64_t, int64_t, float, float*, float*);

template <class T>
__attribute__((target("avx512f"), flatten)) void attend_avx512(const float* q, const void* k, const void* v, int64_t L,
                                                               int64_t D, float scale, float* o, float* scores) {
  attend_row<Avx512>(q, static_cast<const T*>(k), static_cast<const T*>(v), L, D, scale, o, scores);
}

template <class T>
__attribute__((target("avx2,fma"), flatten)) void attend_avx2(const float* q, const void* k, const void* v, int64_t L,
                                                              int64_t D, float scale, float* o, float* scores) {
  attend_row<Avx2>(q, static_cast<const T*>(k), static_cast<const T*>(v), L, D, scale, o, scores);
}

using RowsFn = void (*)(const void*, const void*, int64_t, float*, int64_t, int64_t, int64_t);

struct Pass {
  RowsFn fn = nullptr;
  int weight_rows = 0;  // NB
};

// Input rows per pass; more rows take several passes over each chunk of weight rows while
// it is in cache. On AVX-512, passes of up to 6 rows with 4 weight rows a block beat single
// passes of 7..12 rows with 2 (forward_profile.py, Qwen2.5-0.5B shape, float32: 9 tokens
// 67 -> 52-57 ms, 13 tokens 79 -> 62-67 ms; bfloat16 9 tokens 35-37 -> 29-30 ms); 3-row
// passes lost. On AVX2, 6 rows with 2 weight rows a block or 3 with 4 measured the same.
constexpr int kMaxPass = 6;
constexpr int64_t kChunkRows = 4;  // weight rows per chunk: a multiple of every NB

struct Kernels {
  Pass pass[kMaxPass + 1];  // by input rows in the pass (MB): float32 weights
  Pass pass_bf16[kMaxPass + 1];  // bfloat16 weights
  Pass pass_dpbf16[kMaxPass + 1];  // bfloat16 weights and inputs, AVX512_BF16 (none: widen)
  int max_pass = 0;
  const char* isa = "";  // few_rows_isa()
  AttendFn attend = nullptr;  // float32 cache
  AttendFn attend_bf16 = nullptr;  // bfloat16 cache
};

// NB x MB blocks with at most V::kMaxAcc accumulators
template <class T>
void fill_avx512(Pass* t) {
  Pass p[] = {{}, {rows_avx512<T, 4, 1>, 4}, {rows_avx512<T, 4, 2>, 4}, {rows_avx512<T, 4, 3>, 4},
              {rows_avx512<T, 4, 4>, 4}, {rows_avx512<T, 4, 5>, 4}, {rows_avx512<T, 4, 6>, 4}};
  std::copy(std::begin(p), std::end(p), t);
}

void fill_dpbf16(Pass* t) {
  Pass p[] = {{}, {rows_dpbf16<4, 1>, 4}, {rows_dpbf16<4, 2>, 4}, {rows_dpbf16<4, 3>, 4},
              {rows_dpbf16<4, 4>, 4}, {rows_dpbf16<4, 5>, 4}, {rows_dpbf16<4, 6>, 4}};
  std::copy(std::begin(p), std::end(p), t);
}

template <class T>
void fill_avx2(Pass* t) {
  Pass p[] = {{}, {rows_avx2<T, 4, 1>, 4}, {rows_avx2<T, 4, 2>, 4}, {rows_avx2<T, 4, 3>, 4},
              {rows_avx2<T, 2, 4>, 2}, {rows_avx2<T, 2, 5>, 2}, {rows_avx2<T, 2, 6>, 2}};
  std::copy(std::begin(p), std::end(p), t);
}

Kernels pick_kernels() {
  Kernels k;
  __builtin_cpu_init();
  // PACE_KERNEL_ISA=avx2 takes the AVX2 path on an AVX-512 CPU, =avx512 the AVX-512
  // path without BF16 dot products on a CPU that has them (tests run every path)
  const char* isa = std::getenv("PACE_KERNEL_ISA");
  const bool allow_avx512 = !(isa && std::string(isa) == "avx2");
  const bool allow_dpbf16 = allow_avx512 && !(isa && std::string(isa) == "avx512");
  if (allow_avx512 && __builtin_cpu_supports("avx512f")) {
    fill_avx512<float>(k.pass);
    fill_avx512<uint16_t>(k.pass_bf16);
    const bool dpbf16 = allow_dpbf16 && __builtin_cpu_supports("avx512bf16");
    if (dpbf16) fill_dpbf16(k.pass_dpbf16);
    k.max_pass = 6;
    k.isa = dpbf16 ? "avx512-bf16" : "avx512";
    k.attend = attend_avx512<float>;
    k.attend_bf16 = attend_avx512<uint16_t>;
  } else if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) {
    fill_avx2<float>(k.pass);
    fill_avx2<uint16_t>(k.pass_bf16);
    k.max_pass = 6;
    k.isa = "avx2";
    k.attend = attend_avx2<float>;
    k.attend_bf16 = attend_avx2<uint16_t>;
  }
  return k;
}

const Kernels& kernels() {
  static const Kernels k = pick_kernels();
  return k;
}

}  // namespace

bool few_rows_linear_supported() { return kernels().max_pass > 0; }

// x (..., K), weight (N, K) with contiguous rows, bias (N) or none; float32, or bfloat16
// (weights widened in registers, products summed in float32, the result rounded to
// bfloat16 once, as oneDNN's bf16 GEMM does).
at::Tensor few_rows_linear(const at::Tensor& x_in, const at::Tensor& weight, const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(few_rows_linear_supported(), "few_rows_linear needs AVX2+FMA or AVX-512");
  const bool bf16 = weight.scalar_type() == at::kBFloat16;
  TORCH_CHECK(weight.scalar_type() == at::kFloat || bf16, "few_rows_linear: float32 or bfloat16 weights only");
  TORCH_CHECK(x_in.scalar_type() == weight.scalar_type(), "few_rows_linear: x and the weight differ in dtype");
  const int64_t K = weight.size(1), N = weight.size(0);
  TORCH_CHECK(x_in.size(-1) == K, "few_rows_linear: x has ", x_in.size(-1), " features, the weight ", K);
  const at::Tensor w = weight.stride(1) == 1 && weight.stride(0) == K ? weight : weight.contiguous();
  const Kernels& kern = kernels();
  const bool dp = bf16 && kern.pass_dpbf16[1].fn != nullptr;  // bfloat16 dot products: the input stays bfloat16
  const at::Tensor x = dp ? x_in.reshape({-1, K}).contiguous() : x_in.reshape({-1, K}).to(at::kFloat).contiguous();
  const int64_t M = x.size(0);
  at::Tensor y = at::empty({M, N}, x.options().dtype(at::kFloat));
  const char* xp = static_cast<const char*>(x.data_ptr());
  const int64_t x_row_bytes = K * x.element_size();
  const void* wp = w.data_ptr();
  float* yp = y.data_ptr<float>();
  // input rows in balanced passes of at most max_pass rows, all passes over one chunk of
  // weight rows before the next chunk: the chunk is read from memory once, then from cache
  struct PassRows {
    int64_t first, rows;
    const Pass* pass;
  };
  std::vector<PassRows> passes;
  const int64_t num_passes = (M + kern.max_pass - 1) / kern.max_pass;
  for (int64_t p = 0, m = 0; p < num_passes; ++p) {
    const int64_t mb = (M - m) / (num_passes - p);
    passes.push_back({m, mb, dp ? &kern.pass_dpbf16[mb] : bf16 ? &kern.pass_bf16[mb] : &kern.pass[mb]});
    m += mb;
  }
  const int64_t chunks = N / kChunkRows;
  // each task takes consecutive chunks (a sequential stream for the prefetcher)
  at::parallel_for(0, chunks, 4, [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c)
      for (const PassRows& p : passes)
        p.pass->fn(xp + p.first * x_row_bytes, wp, K, yp + p.first * N, N, c * kChunkRows, (c + 1) * kChunkRows);
  });
  if (const int64_t rest = N - chunks * kChunkRows) {  // the last N % 4 outputs, via a zero-padded chunk
    at::Tensor pad = at::zeros({kChunkRows, K}, w.options());
    pad.slice(0, 0, rest).copy_(w.slice(0, N - rest));
    at::Tensor out = at::empty({M, kChunkRows}, y.options());
    for (const PassRows& p : passes)
      p.pass->fn(xp + p.first * x_row_bytes, pad.data_ptr(), K, out.data_ptr<float>() + p.first * kChunkRows, kChunkRows, 0,
                 kChunkRows);
    y.slice(1, N - rest).copy_(out.slice(1, 0, rest));
  }
  if (bias.has_value() && bias->defined()) y.add_(*bias);
  std::vector<int64_t> shape(x_in.sizes().begin(), x_in.sizes().end());
  shape.back() = N;
  return y.view(shape).to(x_in.scalar_type());
}

// Causal attention of n new queries q (1, H, n, D) over a KV cache (KV, capacity, D) that
// already holds them at start..start+n-1: query i sees keys 0..start+i. Float32.
at::Tensor few_rows_attention(const at::Tensor& q_in, const at::Tensor& k_cache, const at::Tensor& v_cache,
                              int64_t start, double scaling) {
  TORCH_CHECK(few_rows_linear_supported(), "few_rows_attention needs AVX2+FMA or AVX-512");
  const bool bf16 = k_cache.scalar_type() == at::kBFloat16;
  TORCH_CHECK((k_cache.scalar_type() == at::kFloat || bf16) && q_in.scalar_type() == k_cache.scalar_type() &&
                  v_cache.scalar_type() == k_cache.scalar_type(),
              "few_rows_attention: float32 or bfloat16 only, the same for q and the caches");
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous(), "few_rows_attention: contiguous caches only");
  const at::Tensor q = q_in.to(at::kFloat).contiguous();  // bfloat16 queries widen exactly
  const int64_t H = q.size(1), n = q.size(2), D = q.size(3), KV = k_cache.size(0), cap = k_cache.size(1);
  TORCH_CHECK(H % KV == 0 && start + n <= cap, "few_rows_attention: bad shapes");
  at::Tensor o = at::empty_like(q);
  const float* qp = q.data_ptr<float>();
  const char* kp = static_cast<const char*>(k_cache.data_ptr());
  const char* vp = static_cast<const char*>(v_cache.data_ptr());
  const int64_t head_bytes = cap * D * k_cache.element_size();
  float* op = o.data_ptr<float>();
  const AttendFn attend = bf16 ? kernels().attend_bf16 : kernels().attend;
  const int64_t group = H / KV;
  const float scale = static_cast<float>(scaling);
  at::parallel_for(0, H * n, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores(start + n + 16);
    for (int64_t t = begin; t < end; ++t) {
      const int64_t h = t / n, i = t % n, g = h / group;
      attend(qp + t * D, kp + g * head_bytes, vp + g * head_bytes, start + i + 1, D, scale, op + t * D, scores.data());
    }
  });
  return o.to(q_in.scalar_type());  // float32 sums, rounded to bfloat16 once
}

// Which vector path runs: "avx512-bf16" (AVX-512 with BF16 dot products for bfloat16),
// "avx512", "avx2" or "" (none: callers use torch's ops).
std::string few_rows_isa() {
  return kernels().isa;
}
