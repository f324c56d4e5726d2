// Linear layers for the small M of decoding (batch 1 to a few dozen rows), float32 activations:
//
//   float32: y[m, n] = sum_k x[m, k] * w[n, k]
//   int8:    y[m, n] = scale[n] * sum_k x[m, k] * q[n, k]               q int8 [N, K], per-output-row scale
//   int4:    y[m, n] = sum_g sum_{k in g} x[m, k] * (q[n, k] * s[n, g] + z[n, g])
//            q packed two per byte, group size 32: byte j of a group holds k = j (low nibble) and j + 16 (high)
//   int8 in groups: y[m, n] = sum_g sum_{k in g} x[m, k] * (q[n, k] * s[n, g] + z[n, g]), group size 16,
//            q int8 [N, K]: holds the other ggml Q/K types and IQ4_NL/IQ4_XS exactly (engine/quant.py);
//            without the min (z = 0), groups of 16 or 32: ggml's types whose blocks have no minimum (Q8_0 ...),
//            s float32 or float16 (where a layer's scales are exactly float16: Q8_0's are), widened by F16C
//
// Work is split in blocks of 4 output rows (parallel_for over blocks, parallel.h). For one or two rows of x the
// quantised weights are widened to float32 in registers and used at once: decoding is bound by reading
// the weights, so the win is bytes (1 or 0.5 instead of 4 per weight), provided the arithmetic keeps up:
// for one row, each output sums a few steps into a fresh register (and the int4 layout, and for two rows
// too the scale-only one, apply their scales once per group), since one chain of dependent FMAs per output
// was the bound. For more rows the block is widened once into a float32 buffer that stays in cache and
// every row of x is multiplied against it, 3 rows at a time, so the widening is paid once per block rather
// than once per row (continuous batching). Beyond the caller's tiles_max_m rows (prefill) the weights are
// widened a few megabytes at a time and multiplied by oneDNN's blocked GEMM instead, which re-reads x far
// less than 4 outputs at a time can (kernels.h says which limit suits which caller). AVX2 + FMA (+ F16C).
#include <immintrin.h>

#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <algorithm>
#include <atomic>
#include <type_traits>
#include <vector>

#include "kernels.h"
#include "parallel.h"
#include "simd.h"

namespace {

constexpr int64_t NB = 4;         // output rows per block
constexpr int64_t STREAM_M = 2;   // up to this many rows of x, quantised weights are widened in registers

inline __m256 widen8(const int8_t* p) {  // 8 int8 -> 8 float32
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
}

// a scale as float32: int8s holds a layer's scales as float16 where they are exactly so (half the bytes)
inline float scale_f32(float s) { return s; }
inline float scale_f32(uint16_t s) { return _cvtsh_ss(s); }

// the n <= 8 scales at p as float32: float32 ones where they are, float16 ones widened into out
inline const float* scales8(const float* p, int64_t, float*) { return p; }
inline const float* scales8(const uint16_t* p, int64_t n, float out[8]) {
  if (n == 8) {
    _mm256_storeu_ps(out, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
    return out;
  }
  for (int64_t i = 0; i < n; ++i) out[i] = _cvtsh_ss(p[i]);
  return out;
}

// 32 packed 4-bit codes (16 bytes) of one group -> 4 x 8 float32 in k order
inline void codes4(const uint8_t* p, __m256 out[4]) {
  __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  __m128i lo = _mm_and_si128(b, _mm_set1_epi8(0x0F));                     // k = 0..15
  __m128i hi = _mm_and_si128(_mm_srli_epi16(b, 4), _mm_set1_epi8(0x0F));  // k = 16..31
  out[0] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(lo));
  out[1] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(lo, 8)));
  out[2] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(hi));
  out[3] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(hi, 8)));
}

// the same weights as q * s + z
inline void widen_group4(const uint8_t* p, __m256 s, __m256 z, __m256 out[4]) {
  codes4(p, out);
  for (int c = 0; c < 4; ++c) out[c] = _mm256_fmadd_ps(out[c], s, z);
}

// A block's weights and scales, pulled into cache a line of each per step of the loop over the block
// before it, at the rate that loop reads its own: widened in registers straight from memory without it,
// the int8 layouts read 12 GB/s where float32, prefetched, reads 26 (2 cores, SmolLM2's output projection).
struct Ahead {
  const char* p[2] = {nullptr, nullptr};
  int64_t stride[2] = {0, 0};  // bytes per step
  void step(int64_t i) const {
    if (p[0] == nullptr) return;
    _mm_prefetch(p[0] + i * stride[0], _MM_HINT_T0);
    _mm_prefetch(p[1] + i * stride[1], _MM_HINT_T0);
  }
};

// y[m + r, n0 + j] = post[j] * sum_k x[m + r, k] * w_j[k] for r < MR, j < NB, where load(j, k) gives the
// 8 weights w_j[k : k + 8] as float32 (read, or widened from a quantised row) and one(j, k) a single one
// (the K % 8 tail). With `prefetch`, also pulls prefetch_bytes from there into cache (its share of the
// next block), spread evenly over the k loop so the memory system is never asked for all of it at once.
template <int MR, class Load, class One>
inline void tile(const float* x, int64_t K, Load load, One one, const float* post, float* y, int64_t N, int64_t m,
                 int64_t n0, const char* prefetch = nullptr, int64_t prefetch_bytes = 0) {
  __m256 acc[MR][NB];
  for (int r = 0; r < MR; ++r)
    for (int j = 0; j < NB; ++j) acc[r][j] = _mm256_setzero_ps();
  const int64_t K8 = K & ~int64_t(7);
  const int64_t lines = (prefetch_bytes + 63) / 64, per_step = K8 ? (lines * 8 + K8 - 1) / K8 : 0;
  for (int64_t k = 0; k < K8; k += 8) {
    __m256 xv[MR];
    for (int r = 0; r < MR; ++r) xv[r] = _mm256_loadu_ps(x + (m + r) * K + k);
    if (prefetch)
      for (int64_t l = (k / 8) * per_step, end = l + per_step; l < end && l < lines; ++l)
        _mm_prefetch(prefetch + l * 64, _MM_HINT_T0);
    for (int j = 0; j < NB; ++j) {
      const __m256 wv = load(j, k);
      for (int r = 0; r < MR; ++r) acc[r][j] = _mm256_fmadd_ps(wv, xv[r], acc[r][j]);
    }
  }
  for (int r = 0; r < MR; ++r)
    for (int j = 0; j < NB; ++j) {
      float s = hsum(acc[r][j]);
      for (int64_t k = K8; k < K; ++k) s += x[(m + r) * K + k] * one(j, k);
      y[(m + r) * N + n0 + j] = s * post[j];
    }
}

// tile() over float32 rows
template <int MR>
inline void float_tile(const float* x, int64_t K, const float* const rows[NB], const float post[NB], float* y,
                       int64_t N, int64_t m, int64_t n0, const char* prefetch, int64_t prefetch_bytes) {
  tile<MR>(
      x, K, [&](int j, int64_t k) { return _mm256_loadu_ps(rows[j] + k); }, [&](int j, int64_t k) { return rows[j][k]; },
      post, y, N, m, n0, prefetch, prefetch_bytes);
}

// All rows of x against one block of float rows, 3 rows of x at a time. Not inlined: inlined into the
// quantised callers, GCC allocated the 3 x 4 accumulators worse and the tile ran at half speed.
__attribute__((noinline)) void float_block(const float* x, int64_t M, int64_t K, const float* const rows[NB], const float post[NB],
                        float* y, int64_t N, int64_t n0, const char* prefetch, int64_t prefetch_bytes) {
  // each tile prefetches its share of the next block: with weights streamed from memory, 16 rows ran at
  // 52-55 G multiply-adds/s when the first tile prefetched it all, 57-66 now (2 cores)
  const int64_t tiles = (M + 2) / 3;
  auto share = [&](int64_t t) { return prefetch ? prefetch_bytes * t / tiles : 0; };
  int64_t m = 0, t = 0;
  for (; m + 3 <= M; m += 3, ++t)
    float_tile<3>(x, K, rows, post, y, N, m, n0, prefetch ? prefetch + share(t) : nullptr, share(t + 1) - share(t));
  const char* rest = prefetch ? prefetch + share(t) : nullptr;
  if (M - m == 2) float_tile<2>(x, K, rows, post, y, N, m, n0, rest, share(t + 1) - share(t));
  if (M - m == 1) float_tile<1>(x, K, rows, post, y, N, m, n0, rest, share(t + 1) - share(t));
}

// float_block with 512-bit registers, for CPUs with AVX-512F (checked at run time: the kernels are built for
// AVX2). Twice the lanes per FMA, and 32 registers hold 6 x 4 accumulators: on Zen 4 cores, which run 512-bit
// FMAs at full rate (oneDNN's GEMM reaches 2.2x our AVX2 tiles there), 16 rows ran 1.4-1.6x faster.
template <int MR>
__attribute__((target("avx512f,fma"))) inline void float_tile512(
    const float* x, int64_t K, const float* const rows[NB], float* y, int64_t N, int64_t m, int64_t n0,
    const char* prefetch, int64_t prefetch_bytes) {
  __m512 acc[MR][NB];
  for (int r = 0; r < MR; ++r)
    for (int j = 0; j < NB; ++j) acc[r][j] = _mm512_setzero_ps();
  const int64_t K16 = K & ~int64_t(15);
  const int64_t lines = (prefetch_bytes + 63) / 64, per_step = K16 ? (lines * 16 + K16 - 1) / K16 : 0;
  for (int64_t k = 0; k < K16; k += 16) {
    __m512 xv[MR];
    for (int r = 0; r < MR; ++r) xv[r] = _mm512_loadu_ps(x + (m + r) * K + k);
    if (prefetch)
      for (int64_t l = (k / 16) * per_step, end = l + per_step; l < end && l < lines; ++l)
        _mm_prefetch(prefetch + l * 64, _MM_HINT_T0);
    for (int j = 0; j < NB; ++j) {
      const __m512 wv = _mm512_loadu_ps(rows[j] + k);
      for (int r = 0; r < MR; ++r) acc[r][j] = _mm512_fmadd_ps(wv, xv[r], acc[r][j]);
    }
  }
  for (int r = 0; r < MR; ++r)
    for (int j = 0; j < NB; ++j) {
      float s = _mm512_reduce_add_ps(acc[r][j]);
      for (int64_t k = K16; k < K; ++k) s += x[(m + r) * K + k] * rows[j][k];
      y[(m + r) * N + n0 + j] = s;
    }
}

__attribute__((target("avx512f,fma"), noinline)) void float_block512(
    const float* x, int64_t M, int64_t K, const float* const rows[NB], const float post[NB], float* y, int64_t N,
    int64_t n0, const char* prefetch, int64_t prefetch_bytes) {
  const int64_t tiles = (M + 5) / 6;
  auto share = [&](int64_t t) { return prefetch ? prefetch_bytes * t / tiles : 0; };
  int64_t m = 0, t = 0;
  auto at = [&](int64_t t) { return prefetch ? prefetch + share(t) : nullptr; };
  for (; m + 6 <= M; m += 6, ++t) float_tile512<6>(x, K, rows, y, N, m, n0, at(t), share(t + 1) - share(t));
  switch (M - m) {  // the last rows
    case 5: float_tile512<5>(x, K, rows, y, N, m, n0, at(t), share(t + 1) - share(t)); break;
    case 4: float_tile512<4>(x, K, rows, y, N, m, n0, at(t), share(t + 1) - share(t)); break;
    case 3: float_tile512<3>(x, K, rows, y, N, m, n0, at(t), share(t + 1) - share(t)); break;
    case 2: float_tile512<2>(x, K, rows, y, N, m, n0, at(t), share(t + 1) - share(t)); break;
    case 1: float_tile512<1>(x, K, rows, y, N, m, n0, at(t), share(t + 1) - share(t)); break;
  }
  for (int j = 0; j < NB; ++j)  // the rows' scales (quantised weights widened without them)
    if (post[j] != 1.0f)
      for (int64_t r = 0; r < M; ++r) y[r * N + n0 + j] *= post[j];
}

// float_block512 where the CPU has it; use_wide_tiles switches it (tests, from Python), hence atomic
std::atomic<bool> wide_tiles{__builtin_cpu_supports("avx512f") != 0};
// fewer rows stay on the 256-bit tiles: streaming a float32 model's weights for one row, the 512-bit tile
// decoded 73 tokens/s against their 101 (SmolLM2, 2 Zen 4 cores); 4 rows ran 1.6x faster on them
constexpr int64_t WIDE_MIN_M = 4;

// acc[r][j] = sum_k x[m + r, k] * w_j[k] over k < 16 * steps for the NB rows of a block, which load(j, g,
// wv) gives 16 weights at a time (group g) widened to 2 x 8 float32 in registers, while `next` pulls the
// next block into cache at the same rate (the int8 layouts' streaming path, M <= STREAM_M).
// With one row of x, each output sums 32 weights at a time into a fresh register, then adds it to its
// total: one chain of dependent FMAs per output over the whole row ran at one FMA per 4 cycles (their
// latency), which bound batch-1 decoding instead of memory; the fresh sums of successive steps overlap.
template <int MR, class Load16>
inline void stream16(const float* x, int64_t K, int64_t m, int64_t steps, const Ahead& next, Load16 load,
                     __m256 acc[MR][NB]) {
  for (int r = 0; r < MR; ++r)
    for (int j = 0; j < NB; ++j) acc[r][j] = _mm256_setzero_ps();
  // the products of steps g (and g + 1, one row of x) into fresh sums, then into the totals
  auto span = [&](int64_t g, auto two) {
    __m256 part[MR][NB];
    for (int t = 0; t < (two ? 2 : 1); ++t, ++g) {
      next.step(g);
      __m256 xv[MR][2];
      for (int r = 0; r < MR; ++r)
        for (int c = 0; c < 2; ++c) xv[r][c] = _mm256_loadu_ps(x + (m + r) * K + g * 16 + c * 8);
      for (int j = 0; j < NB; ++j) {
        __m256 wv[2];
        load(j, g, wv);
        for (int r = 0; r < MR; ++r) {
          part[r][j] = t == 0 ? _mm256_mul_ps(wv[0], xv[r][0]) : _mm256_fmadd_ps(wv[0], xv[r][0], part[r][j]);
          part[r][j] = _mm256_fmadd_ps(wv[1], xv[r][1], part[r][j]);
        }
      }
    }
    for (int r = 0; r < MR; ++r)
      for (int j = 0; j < NB; ++j) acc[r][j] = _mm256_add_ps(acc[r][j], part[r][j]);
  };
  int64_t g = 0;
  if constexpr (MR == 1)
    for (; g + 2 <= steps; g += 2) span(g, std::true_type());
  for (; g < steps; ++g) span(g, std::false_type());
}

// The four weight formats. Each gives: widen (the block as float32 rows, possibly into buf, with a
// per-row factor applied after the sum), one weight (at), its raw bytes (for prefetching) and, quantised
// ones only, stream<MR> (widened in registers, for M <= STREAM_M, prefetching what ahead() names).
struct Float32W {
  const float* w;
  int64_t K;
  static constexpr bool quantised = false;
  void widen(int64_t n0, float*, const float* rows[NB], float post[NB]) const {
    for (int j = 0; j < NB; ++j) rows[j] = w + (n0 + j) * K, post[j] = 1.0f;
  }
  float at(int64_t n, int64_t k) const { return w[n * K + k]; }
  const char* raw(int64_t n0) const { return reinterpret_cast<const char*>(w + n0 * K); }
  int64_t raw_bytes() const { return NB * K * 4; }
};

struct Int8W {
  const int8_t* w;
  const float* scale;
  int64_t K;
  static constexpr bool quantised = true;
  void widen(int64_t n0, float* buf, const float* rows[NB], float post[NB]) const {
    for (int j = 0; j < NB; ++j) {
      float* out = buf + j * K;
      const int8_t* q = w + (n0 + j) * K;
      int64_t k = 0;
      for (; k + 8 <= K; k += 8) _mm256_storeu_ps(out + k, widen8(q + k));
      for (; k < K; ++k) out[k] = float(q[k]);
      rows[j] = out, post[j] = scale[n0 + j];
    }
  }
  template <int MR>
  void stream(const float* x, float* y, int64_t N, int64_t m, int64_t n0, const Ahead& next) const {
    const int8_t* rows = w + n0 * K;
    const int64_t K16 = K & ~int64_t(15);
    __m256 acc[MR][NB];
    stream16<MR>(x, K, m, K16 / 16, next, [&](int j, int64_t g, __m256 wv[2]) {
      wv[0] = widen8(rows + j * K + g * 16);
      wv[1] = widen8(rows + j * K + g * 16 + 8);
    }, acc);
    for (int r = 0; r < MR; ++r)
      for (int j = 0; j < NB; ++j) {
        float s = hsum(acc[r][j]);
        for (int64_t k = K16; k < K; ++k) s += x[(m + r) * K + k] * float(rows[j * K + k]);
        y[(m + r) * N + n0 + j] = s * scale[n0 + j];
      }
  }
  Ahead ahead(int64_t n0) const {  // per 16 weights of each row: a line of the next block's codes
    return {{raw(n0), raw(n0)}, {NB * 16, NB * 16}};
  }
  float at(int64_t n, int64_t k) const { return float(w[n * K + k]) * scale[n]; }
  const char* raw(int64_t n0) const { return reinterpret_cast<const char*>(w + n0 * K); }
  int64_t raw_bytes() const { return NB * K; }
};

struct Int4W {
  const uint8_t* w;  // [N, K/2]
  const float* sz;   // [N, K/32, 2]: (scale, min) per group
  int64_t K;
  static constexpr bool quantised = true;
  void widen(int64_t n0, float* buf, const float* rows[NB], float post[NB]) const {
    const int64_t G = K / 32;
    for (int j = 0; j < NB; ++j) {
      float* out = buf + j * K;
      for (int64_t g = 0; g < G; ++g) {
        const float* p = sz + ((n0 + j) * G + g) * 2;
        __m256 wv[4];
        widen_group4(w + (n0 + j) * (K / 2) + g * 16, _mm256_set1_ps(p[0]), _mm256_set1_ps(p[1]), wv);
        for (int c = 0; c < 4; ++c) _mm256_storeu_ps(out + g * 32 + c * 8, wv[c]);
      }
      rows[j] = out, post[j] = 1.0f;
    }
  }
  template <int MR>
  void stream(const float* x, float* y, int64_t N, int64_t m, int64_t n0, const Ahead& next) const {
    if constexpr (MR == 1) {
      stream_one(x, y, N, m, n0, next);
      return;
    }
    const int64_t G = K / 32;
    __m256 acc[MR][NB];
    for (int r = 0; r < MR; ++r)
      for (int j = 0; j < NB; ++j) acc[r][j] = _mm256_setzero_ps();
    for (int64_t g = 0; g < G; ++g) {
      next.step(g);
      __m256 xv[MR][4];
      for (int r = 0; r < MR; ++r)
        for (int c = 0; c < 4; ++c) xv[r][c] = _mm256_loadu_ps(x + (m + r) * K + g * 32 + c * 8);
      for (int j = 0; j < NB; ++j) {
        const float* p = sz + ((n0 + j) * G + g) * 2;
        __m256 wv[4];
        widen_group4(w + (n0 + j) * (K / 2) + g * 16, _mm256_set1_ps(p[0]), _mm256_set1_ps(p[1]), wv);
        for (int r = 0; r < MR; ++r)
          for (int c = 0; c < 4; ++c) acc[r][j] = _mm256_fmadd_ps(wv[c], xv[r][c], acc[r][j]);
      }
    }
    for (int r = 0; r < MR; ++r)
      for (int j = 0; j < NB; ++j) y[(m + r) * N + n0 + j] = hsum(acc[r][j]);
  }
  // One row of x: per group, s * sum(q * x) + z * sum(x), the codes' products summed in a fresh register
  // and x's sum shared by the block's rows (a chain of FMAs over the whole row per output bound decoding)
  void stream_one(const float* x, float* y, int64_t N, int64_t m, int64_t n0, const Ahead& next) const {
    const int64_t G = K / 32;
    const float* xr = x + m * K;
    __m256 acc[NB];
    for (int j = 0; j < NB; ++j) acc[j] = _mm256_setzero_ps();
    for (int64_t g = 0; g < G; ++g) {
      next.step(g);
      __m256 xv[4];
      for (int c = 0; c < 4; ++c) xv[c] = _mm256_loadu_ps(xr + g * 32 + c * 8);
      const __m256 xsum = _mm256_add_ps(_mm256_add_ps(xv[0], xv[1]), _mm256_add_ps(xv[2], xv[3]));
      for (int j = 0; j < NB; ++j) {
        const float* p = sz + ((n0 + j) * G + g) * 2;
        __m256 q[4];
        codes4(w + (n0 + j) * (K / 2) + g * 16, q);
        __m256 part = _mm256_mul_ps(q[0], xv[0]);
        for (int c = 1; c < 4; ++c) part = _mm256_fmadd_ps(q[c], xv[c], part);
        acc[j] = _mm256_fmadd_ps(part, _mm256_set1_ps(p[0]), acc[j]);
        acc[j] = _mm256_fmadd_ps(xsum, _mm256_set1_ps(p[1]), acc[j]);
      }
    }
    for (int j = 0; j < NB; ++j) y[m * N + n0 + j] = hsum(acc[j]);
  }
  float at(int64_t n, int64_t k) const {
    const int64_t g = k / 32, j = k % 32, G = K / 32;
    const uint8_t byte = w[n * (K / 2) + g * 16 + (j % 16)];
    const int q = j < 16 ? (byte & 0x0F) : (byte >> 4);
    return q * sz[(n * G + g) * 2] + sz[(n * G + g) * 2 + 1];
  }
  const char* raw(int64_t n0) const { return reinterpret_cast<const char*>(w + n0 * (K / 2)); }
  int64_t raw_bytes() const { return NB * K / 2; }
  Ahead ahead(int64_t n0) const {  // per group of 32: 16 bytes and a scale/min pair of each row
    return {{raw(n0), reinterpret_cast<const char*>(sz + n0 * (K / 32) * 2)}, {NB * 16, NB * 8}};
  }
};

// int8 codes in groups of G = 16 << shift weights, w = q * s (+ z with MIN): int8g (scale and min per 16,
// sz [N, K/16, 2] float32) and int8s (scale only per 16 or 32, sz [N, K/G] float32 or float16: S = uint16_t),
// which hold the ggml types exactly
template <bool MIN, class S = float>
struct Int8GroupW {
  const int8_t* w;  // [N, K]
  const S* sz;      // [N, K/G, 1 + MIN]: the scale (and min) of each group
  int64_t K;
  int shift;        // G = 16 << shift
  static constexpr bool quantised = true;
  static constexpr int64_t PER = MIN ? 2 : 1;  // values per group
  int64_t groups() const { return K >> (4 + shift); }
  // the 16 weights of row n from k = 16 * g as 2 x 8 float32
  void group(int64_t n, int64_t g, __m256 out[2]) const {
    const S* p = sz + (n * groups() + (g >> shift)) * PER;
    const __m256 s = _mm256_set1_ps(scale_f32(p[0]));
    const int8_t* q = w + n * K + g * 16;
    if constexpr (MIN) {
      const __m256 z = _mm256_set1_ps(scale_f32(p[1]));
      out[0] = _mm256_fmadd_ps(widen8(q), s, z);
      out[1] = _mm256_fmadd_ps(widen8(q + 8), s, z);
    } else {
      out[0] = _mm256_mul_ps(widen8(q), s);
      out[1] = _mm256_mul_ps(widen8(q + 8), s);
    }
  }
  // each row's scales (and mins) 8 values at a time as float32 (float16 ones 8 per instruction)
  void widen(int64_t n0, float* buf, const float* rows[NB], float post[NB]) const {
    const int64_t V = groups() * PER, G16 = int64_t(16) << shift;  // values per row, weights per group
    for (int j = 0; j < NB; ++j) {
      float* out = buf + j * K;
      const int8_t* q = w + (n0 + j) * K;
      for (int64_t v0 = 0; v0 < V; v0 += 8) {
        const int64_t nv = std::min<int64_t>(8, V - v0);
        float wide[8];  // values v0 .. v0 + nv of the row: nv / PER groups' scale (and min)
        const float* sc = scales8(sz + (n0 + j) * V + v0, nv, wide);
        for (int64_t v = 0; v < nv; v += PER) {
          const __m256 s = _mm256_set1_ps(sc[v]);
          for (int64_t k = (v0 + v) / PER * G16, end = k + G16; k < end; k += 8)
            _mm256_storeu_ps(out + k, MIN ? _mm256_fmadd_ps(widen8(q + k), s, _mm256_set1_ps(sc[v + MIN]))
                                          : _mm256_mul_ps(widen8(q + k), s));
        }
      }
      rows[j] = out, post[j] = 1.0f;
    }
  }
  template <int MR>
  void stream(const float* x, float* y, int64_t N, int64_t m, int64_t n0, const Ahead& next) const {
    if constexpr (!MIN) {
      stream_scaled<MR>(x, y, N, m, n0, next);
      return;
    }
    __m256 acc[MR][NB];
    stream16<MR>(x, K, m, K / 16, next, [&](int j, int64_t g, __m256 wv[2]) { group(n0 + j, g, wv); }, acc);
    for (int r = 0; r < MR; ++r)
      for (int j = 0; j < NB; ++j) y[(m + r) * N + n0 + j] = hsum(acc[r][j]);
  }
  // Without a min: each group's codes times x summed first, then times the group's scale once (a multiply
  // per 8 weights fewer). Batch-1 decoding of a 7B's Q8_0 file was bound by instructions, not by memory:
  // int8s ran at 20 GB/s where int8g, 1.3x the bytes, read 25. The scales of 8 groups at a time are
  // widened to float32 first (float16 ones 8 per instruction, not one per group and row). Not inlined:
  // inlined into run(), one row of SmolLM2's output projection took 1.4x as long (1 thread).
  template <int MR>
  __attribute__((noinline)) void stream_scaled(const float* x, float* y, int64_t N, int64_t m, int64_t n0,
                                               const Ahead& next) const {
    const int64_t steps = 1 << shift, G = groups();  // steps of 16 weights per group
    const int8_t* rows = w + n0 * K;
    const S* scales = sz + n0 * G;
    __m256 acc[MR][NB];
    for (int r = 0; r < MR; ++r)
      for (int j = 0; j < NB; ++j) acc[r][j] = _mm256_setzero_ps();
    for (int64_t g0 = 0; g0 < G; g0 += 8) {
      const int64_t n8 = std::min<int64_t>(8, G - g0);
      float wide[NB][8];  // [row, group]: the scales of groups g0 .. g0 + n8 of the block's rows
      const float* sc[NB];
      for (int j = 0; j < NB; ++j) sc[j] = scales8(scales + j * G + g0, n8, wide[j]);
      for (int64_t g = g0; g < g0 + n8; ++g) {
        __m256 part[MR][NB];
        for (int r = 0; r < MR; ++r)
          for (int j = 0; j < NB; ++j) part[r][j] = _mm256_setzero_ps();
        for (int64_t t = 0; t < steps; ++t) {
          const int64_t k = (g * steps + t) * 16;
          next.step(g * steps + t);
          __m256 xv[MR][2];
          for (int r = 0; r < MR; ++r)
            for (int c = 0; c < 2; ++c) xv[r][c] = _mm256_loadu_ps(x + (m + r) * K + k + c * 8);
          for (int j = 0; j < NB; ++j)
            for (int c = 0; c < 2; ++c) {
              const __m256 q = widen8(rows + j * K + k + c * 8);
              for (int r = 0; r < MR; ++r) part[r][j] = _mm256_fmadd_ps(q, xv[r][c], part[r][j]);
            }
        }
        for (int j = 0; j < NB; ++j) {
          const __m256 s = _mm256_set1_ps(sc[j][g - g0]);
          for (int r = 0; r < MR; ++r) acc[r][j] = _mm256_fmadd_ps(part[r][j], s, acc[r][j]);
        }
      }
    }
    for (int r = 0; r < MR; ++r)
      for (int j = 0; j < NB; ++j) y[(m + r) * N + n0 + j] = hsum(acc[r][j]);
  }
  float at(int64_t n, int64_t k) const {
    const S* p = sz + (n * groups() + (k >> (4 + shift))) * PER;
    return float(w[n * K + k]) * scale_f32(p[0]) + (MIN ? scale_f32(p[1]) : 0.0f);
  }
  const char* raw(int64_t n0) const { return reinterpret_cast<const char*>(w + n0 * K); }
  int64_t raw_bytes() const { return NB * K; }
  Ahead ahead(int64_t n0) const {  // per 16 weights: 16 bytes of codes and 16 / G groups' scales of each row
    return {{raw(n0), reinterpret_cast<const char*>(sz + n0 * groups() * PER)},
            {NB * 16, int64_t(NB * sizeof(S) * PER) >> shift}};
  }
};

template <class W>
at::Tensor run(const W& w, const at::Tensor& x, int64_t N) {
  const int64_t M = x.size(0), K = x.size(1), blocks = N / NB;
  auto y = at::empty({M, N}, x.options());
  if (M == 0) return y;
  const float* xp = x.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const bool stream = W::quantised && M <= STREAM_M;
  parallel_for(blocks, 8, [&](int64_t b0, int64_t b1) {
    std::vector<float> buf(W::quantised && !stream ? NB * K : 0);  // this thread's widened block
    const float* rows[NB];
    float post[NB];
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t n0 = b * NB;
      if constexpr (W::quantised) {  // float32 weights have no stream()
        if (stream) {
          const Ahead next = b + 1 < b1 ? w.ahead(n0 + NB) : Ahead();
          if (M == 2) w.template stream<2>(xp, yp, N, 0, n0, next);
          else w.template stream<1>(xp, yp, N, 0, n0, next);
          continue;
        }
      }
      w.widen(n0, buf.data(), rows, post);
      // the next block's weights come in from memory while this one is multiplied out of cache
      const bool next = b + 1 < b1;
      const bool wide = wide_tiles.load(std::memory_order_relaxed) && M >= WIDE_MIN_M;
      (wide ? float_block512 : float_block)(xp, M, K, rows, post, yp, N, n0, next ? w.raw(n0 + NB) : nullptr,
                                            next ? w.raw_bytes() : 0);
    }
  });
  for (int64_t n = blocks * NB; n < N; ++n)  // the last N % 4 rows
    for (int64_t m = 0; m < M; ++m) {
      float s = 0;
      for (int64_t k = 0; k < K; ++k) s += xp[m * K + k] * w.at(n, k);
      yp[m * N + n] = s;
    }
  return y;
}

// y = x @ w.T for a quantised w and many rows of x: chunks of w's rows widened to float32 (about 4 MB each,
// so a 7B's output projection never needs its 0.5 GB float copy), each multiplied by oneDNN's GEMM.
template <class W>
at::Tensor run_widened(const W& w, const at::Tensor& x, int64_t N) {
  const int64_t M = x.size(0), K = x.size(1);
  const int64_t chunk = std::max<int64_t>(NB, (int64_t(1) << 20) / K / NB * NB);
  // kept for the thread's next call: a fresh 4 MB buffer per call came from mmap, and faulting its pages in
  // cost as much as widening into them (prefill of 200 tokens ran at 600-1000 tok/s, by the process)
  thread_local std::vector<float> buffer;
  buffer.resize(std::max<size_t>(buffer.size(), std::min(chunk, N) * K));
  auto wide = at::from_blob(buffer.data(), {std::min(chunk, N), K}, x.options());
  float* out = buffer.data();
  at::Tensor y = N > chunk ? at::empty({M, N}, x.options()) : at::Tensor();
  for (int64_t c0 = 0; c0 < N; c0 += chunk) {
    const int64_t c = std::min(chunk, N - c0), blocks = c / NB;
    // torch's threads, not our pool: its OpenMP workers spin on the cores after each GEMM, where our
    // pool's would then wait for them
    at::parallel_for(0, blocks, 8, [&](int64_t b0, int64_t b1) {
      const float* rows[NB];
      float post[NB];
      for (int64_t b = b0; b < b1; ++b) {
        float* dst = out + b * NB * K;
        w.widen(c0 + b * NB, dst, rows, post);  // quantised formats widen into dst, row after row
        for (int j = 0; j < NB; ++j)
          if (post[j] != 1.0f)
            for (int64_t k = 0; k < K; ++k) dst[j * K + k] *= post[j];
      }
    });
    for (int64_t n = blocks * NB; n < c; ++n)  // the last N % 4 rows
      for (int64_t k = 0; k < K; ++k) out[n * K + k] = w.at(c0 + n, k);
    if (N <= chunk) return gemm(x, wide.narrow(0, 0, c));  // the whole matrix at once: no copy
    y.narrow(1, c0, c).copy_(gemm(x, wide.narrow(0, 0, c)));
  }
  return y;
}

// half_scales: float16 scales are taken too (int8s)
void check(const at::Tensor& x, const at::Tensor& w, const at::Tensor& s, bool half_scales = false) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous(), "x: contiguous float32 [M, K]");
  const bool typed = s.scalar_type() == at::kFloat || (half_scales && s.scalar_type() == at::kHalf);
  TORCH_CHECK(w.dim() == 2 && w.is_contiguous() && s.is_contiguous() && typed, "weights: contiguous [N, *], float32 ",
              half_scales ? "or float16 " : "", "scales");
}

template <class W>
at::Tensor run_any(const W& w, const at::Tensor& x, int64_t N, int64_t tiles_max_m) {  // our tiles, or a GEMM
  return x.size(0) > tiles_max_m ? run_widened(w, x, N) : run(w, x, N);
}

}  // namespace

bool use_wide_tiles(bool on) {
  wide_tiles = on && __builtin_cpu_supports("avx512f");
  return wide_tiles.load();
}

bool wide_tiles_on() { return wide_tiles.load(std::memory_order_relaxed); }

// packed weights (packed_linear) in their stored layout: [N/16, K/32, D, 16, 4] codes -> [N, K/32 * D * 4], scales
// [N/16, G, 2, 16] -> [N, G, 2] (float32), [N/16, G, 16] -> [N, G] ([N] as they are); copies, for float32
// activations
static std::pair<at::Tensor, at::Tensor> unpacked(const at::Tensor& w, const at::Tensor& s) {
  const int64_t N = w.size(0) * w.size(3);
  auto codes = w.permute({0, 3, 1, 2, 4}).reshape({N, -1});
  if (s.dim() == 4) return {codes, s.permute({0, 3, 1, 2}).reshape({N, s.size(1), 2}).to(at::kFloat)};
  return {codes, s.dim() == 3 ? s.permute({0, 2, 1}).reshape({N, s.size(1)}) : s};
}

at::Tensor linear(at::Tensor x, at::Tensor w, at::Tensor s, int64_t tiles_max_m, SidePull* side) {
  if (w.dim() == 5) {  // packed for int8 activations; with them switched off (tests), unpacked at each call
    if (int8_activations_on()) return packed_linear(x, w, s, tiles_max_m, side);
    auto [codes, scales] = unpacked(w, s);
    return linear(x, codes, scales, tiles_max_m);
  }
  if (w.scalar_type() == at::kChar || w.scalar_type() == at::kByte) {
    check(x, w, s, true);
    if (auto y = q8_linear(x, w, s, tiles_max_m)) return *y;  // where the CPU and the layout allow
  }
  if (w.scalar_type() == at::kChar) {
    if (s.dim() == 1) return int8_linear(x, w, s, tiles_max_m);
    return s.dim() == 3 ? int8_group_linear(x, w, s, tiles_max_m) : int8_scaled_linear(x, w, s, tiles_max_m);
  }
  if (w.scalar_type() == at::kByte) return int4_linear(x, w, s, tiles_max_m);
  return x.size(0) <= tiles_max_m ? float_linear(x, w) : gemm(x, w);
}

at::Tensor gemm(const at::Tensor& x, const at::Tensor& w) {
  // torch's float32 GEMM is MKL's, which on AMD CPUs takes a path about half as fast as oneDNN's (the same
  // float32 arithmetic, no lower-precision math mode): oneDNN's linear, registered by torch as the op
  // inductor uses for CPU linears, where this build of torch has it
  static const auto op = c10::Dispatcher::singleton().findOp({"mkldnn::_linear_pointwise", ""});
  if (!op.has_value() || !w.is_contiguous()) return at::linear(x, w);
  torch::jit::Stack stack{x, w, c10::IValue(), std::string("none"), c10::List<std::optional<at::Scalar>>(),
                          c10::IValue()};
  op->callBoxed(&stack);
  return stack[0].toTensor();
}

at::Tensor float_linear(at::Tensor x, at::Tensor w) {
  check(x, w, x);
  TORCH_CHECK(w.scalar_type() == at::kFloat && w.size(1) == x.size(1), "float32 weight [N, K]");
  return run(Float32W{w.data_ptr<float>(), w.size(1)}, x, w.size(0));
}

at::Tensor int8_linear(at::Tensor x, at::Tensor w, at::Tensor scale, int64_t tiles_max_m) {
  check(x, w, scale);
  TORCH_CHECK(w.scalar_type() == at::kChar && w.size(1) == x.size(1), "int8 weight [N, K]");
  TORCH_CHECK(scale.numel() == w.size(0), "scale [N]");
  return run_any(Int8W{w.data_ptr<int8_t>(), scale.data_ptr<float>(), w.size(1)}, x, w.size(0), tiles_max_m);
}

at::Tensor int4_linear(at::Tensor x, at::Tensor w, at::Tensor sz, int64_t tiles_max_m) {
  check(x, w, sz);
  const int64_t K = x.size(1), N = w.size(0);
  TORCH_CHECK(w.scalar_type() == at::kByte && K % 32 == 0 && w.size(1) == K / 2, "uint8 weight [N, K/2], K % 32 == 0");
  TORCH_CHECK(sz.numel() == N * (K / 32) * 2, "scales [N, K/32, 2]");
  return run_any(Int4W{w.data_ptr<uint8_t>(), sz.data_ptr<float>(), K}, x, N, tiles_max_m);
}

// the shift of a group size G = 16 << shift that divides K into groups_per_row
static int group_shift(int64_t K, int64_t groups_per_row) {
  TORCH_CHECK(groups_per_row > 0 && K % groups_per_row == 0, "scales: a whole number of groups per row");
  const int64_t G = K / groups_per_row;
  TORCH_CHECK(G == 16 || G == 32, "groups of 16 or 32 weights, got ", G);
  return G == 32 ? 1 : 0;
}

at::Tensor int8_group_linear(at::Tensor x, at::Tensor w, at::Tensor sz, int64_t tiles_max_m) {
  check(x, w, sz);
  const int64_t K = x.size(1), N = w.size(0);
  TORCH_CHECK(w.scalar_type() == at::kChar && K % 16 == 0 && w.size(1) == K, "int8 weight [N, K], K % 16 == 0");
  TORCH_CHECK(sz.numel() == N * (K / 16) * 2, "scales [N, K/16, 2]");
  return run_any(Int8GroupW<true>{w.data_ptr<int8_t>(), sz.data_ptr<float>(), K, 0}, x, N, tiles_max_m);
}

at::Tensor int8_scaled_linear(at::Tensor x, at::Tensor w, at::Tensor s, int64_t tiles_max_m) {
  check(x, w, s, true);
  const int64_t K = x.size(1), N = w.size(0);
  TORCH_CHECK(w.scalar_type() == at::kChar && w.size(1) == K && s.dim() == 2 && s.size(0) == N,
              "int8 weight [N, K], scales [N, K/G]");
  const int shift = group_shift(K, s.size(1));
  const int8_t* q = w.data_ptr<int8_t>();
  if (s.scalar_type() == at::kHalf)  // float16's bits, widened by F16C
    return run_any(Int8GroupW<false, uint16_t>{q, reinterpret_cast<const uint16_t*>(s.data_ptr<at::Half>()), K, shift},
                   x, N, tiles_max_m);
  return run_any(Int8GroupW<false>{q, s.data_ptr<float>(), K, shift}, x, N, tiles_max_m);
}
