// One Llama decoder layer for rows of new tokens, in a single call from Python.
//
// Decoding a small model on the CPU costs more in per-operator overhead than in arithmetic: eager PyTorch
// spends ~45 operator calls per layer on a token (norms, RoPE, cache writes, attention, SwiGLU), ~14 ms per
// token for SmolLM2-135M's 30 layers. Here the whole layer is one call: the four matmuls go to linear()
// (qlinear.cpp: float32 or quantised weights), and everything between them is a plain loop over a few
// thousand floats. The arithmetic is model.py's, in float32:
//
//   h = x + wo(attention(rope(q), rope(k) -> cache, v -> cache))     q, k, v = wqkv(rmsnorm(x))
//   y = h + w2(silu(gate) * up)                                       gate, up = w13(rmsnorm(h))
//
// Row r is one token of the sequence in cache slot slots[r] at position pos[r]: a decode step has one row
// per active slot, a prefill chunk several consecutive positions of a slot (or of several slots). Every
// row's key and value are written before any row attends, so row r sees positions 0..pos[r] of its slot,
// those of this call included: causal attention within a chunk. RoPE uses model.py's half-split layout.
// The cache holds keys and values in float32, or in float16 for quantised models (cpu_decode.py kv_dtype):
// written rounded as model.KVCache.update rounds them, read widened to float32.
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <type_traits>
#include <vector>

#include <unistd.h>

#include "kernels.h"
#include "parallel.h"
#include "simd.h"

namespace {

// The cache holds float32, or float16 (E = uint16_t, its bits) for quantised models: read as float32
inline float to_float(float v) { return v; }
inline float to_float(uint16_t v) { return _cvtsh_ss(v); }
inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const uint16_t* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}

// An int8 cache (E = int8_t) holds each key and value in groups of KV_GROUP values: codes q = round(x / d)
// and a float32 scale d = max|x| / 127 per group, as model.quantize_kv computes them (the same bits): about
// half the memory of float16 to stream, which is what attention over long contexts waits on. The loops
// below read keys and values through E: const float*, const uint16_t*, or for int8 a Q8View, which widens
// q * d into float32 registers as the eager model dequantises it.
constexpr int64_t KV_GROUP = 32;

// int8 codes from `c` on and the scales of their groups (s[0]: the group of c[-off]); + moves along, as a
// pointer would. Loads of 8 or 16 values start at multiples of 8 or 16 from a group's start: one scale each.
struct Q8View {
  const int8_t* c;
  const float* s;
  int64_t off = 0;
  Q8View operator+(int64_t n) const { return {c + n, s, off + n}; }
  float operator[](int64_t i) const { return float(c[i]) * s[(off + i) / KV_GROUP]; }
  float scale() const { return s[off / KV_GROUP]; }
};
inline __m256 load8(Q8View v) {
  const __m256i q = _mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(v.c)));
  return _mm256_mul_ps(_mm256_cvtepi32_ps(q), _mm256_set1_ps(v.scale()));
}

// dst[0:n] = src[0:n] as the cache holds them: float16 rounded to nearest even, as torch's .to(float16)
inline void store_row(const float* src, int64_t n, float* dst) { std::copy_n(src, n, dst); }
inline void store_row(const float* src, int64_t n, uint16_t* dst) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m128i h = _mm256_cvtps_ph(_mm256_loadu_ps(src + i), _MM_FROUND_TO_NEAREST_INT);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + i), h);
  }
  for (; i < n; ++i) dst[i] = _cvtss_sh(src[i], _MM_FROUND_TO_NEAREST_INT);
}

// int8 (n % KV_GROUP == 0): codes into dst, a scale per group into scale
inline void store_row(const float* src, int64_t n, int8_t* dst, float* scale) {
  const __m256 sign = _mm256_set1_ps(-0.0f);
  for (int64_t g = 0; g < n / KV_GROUP; ++g) {
    const float* x = src + g * KV_GROUP;
    __m256 m = _mm256_setzero_ps();
    for (int i = 0; i < KV_GROUP; i += 8) m = _mm256_max_ps(m, _mm256_andnot_ps(sign, _mm256_loadu_ps(x + i)));
    const float d = hmax(m) / 127.0f;
    scale[g] = d;
    const __m256 dv = _mm256_set1_ps(d);
    for (int i = 0; i < KV_GROUP; i += 8) {  // x / d rounded to nearest even (the default mode), as torch.round
      const __m256i q = d > 0 ? _mm256_cvtps_epi32(_mm256_div_ps(_mm256_loadu_ps(x + i), dv)) : _mm256_setzero_si256();
      const __m128i w = _mm_packs_epi32(_mm256_castsi256_si128(q), _mm256_extracti128_si256(q, 1));  // |q| <= 127
      _mm_storel_epi64(reinterpret_cast<__m128i*>(dst + g * KV_GROUP + i), _mm_packs_epi16(w, w));
    }
  }
}

// A float16 cache's keys and values stream from memory, a few hundred KB of them per part of the attention
// at long contexts, and the hardware's prefetchers alone left the loops below waiting on them: each loop
// pulls the row AHEAD positions on into L1 as it goes. The 512-bit loops, the default model with 16 slots,
// separate processes alternating (6 rounds): 16 rows at position 2000 45.7-49.6 -> 42.3-44.4 ms a step, at
// 600 22.7-26.5 -> 21.0-24.1; one row at 2000 unchanged within the noise (7.4-7.8 -> 7.2-8.3); 8 to 32
// positions ahead did about as well. Not for the other caches, whose loops were no faster with it: int8's,
// bound by widening its codes (16 rows at 2000: 37.4-39.2 -> 39.1-40.5 ms), and float32's, beside a float32
// model's matmuls (95.9-97.5 -> 98.1-99.3). prefetcht0 written out, as GCC 12 deleted loops of _mm_prefetch
// as doing nothing.
constexpr int64_t AHEAD = 32;
// row t of a float16 cache's `rows` [L, hd] into L1, where t < L
inline void pull_row(const uint16_t* rows, int64_t t, int64_t L, int64_t hd) {
  if (t >= L) return;
  const char* c = reinterpret_cast<const char*>(rows + t * hd);
  for (int64_t o = 0; o < hd * 2; o += 64) asm volatile("prefetcht0 %0" : : "m"(c[o]));
}
template <class E>
inline void pull_row(E, int64_t, int64_t, int64_t) {}

// The loops above pull from AHEAD positions on; a part's first positions were left to the hardware, which
// at short contexts is most of it (16 rows at position 45: each part 46 positions of 3 heads). Before each
// part, its thread pulls the first PART_PULL positions of its next part's keys and values into L2. The
// default model, 16 rows, the pull switched at run time in one process (12 rounds, medians): position 16
// 8.69 -> 8.38 ms a step for the layers, 45 9.25 -> 9.03, 200 15.39 -> 14.95, 1000 22.77 -> 22.47; 2000
// and one row unchanged. The whole part instead (up to 1024 positions) was slower from 1000 on (22.77 ->
// 24.28, at 2000 36.73 -> 41.05).
constexpr int64_t PART_PULL = 64;
// keys k and values v [L, hd] of a float16 cache: their first PART_PULL rows into L2
inline void pull_part(const uint16_t* k, const uint16_t* v, int64_t L, int64_t hd) {
  const char* kc = reinterpret_cast<const char*>(k);
  const char* vc = reinterpret_cast<const char*>(v);
  for (int64_t o = 0, n = std::min(L, PART_PULL) * hd * 2; o < n; o += 64) {
    asm volatile("prefetcht1 %0" : : "m"(kc[o]));
    asm volatile("prefetcht1 %0" : : "m"(vc[o]));
  }
}
template <class E>
inline void pull_part(E, E, int64_t, int64_t) {}

template <class E>
inline float dot(const float* a, E b, int64_t n) {
  __m256 acc = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), load8(b + i), acc);
  float r = hsum(acc);
  for (; i < n; ++i) r += a[i] * to_float(b[i]);
  return r;
}

// e^x for 8 floats: x = n ln2 + r with |r| <= ln2 / 2, e^r by its degree-6 Taylor polynomial (truncation
// error about 2e-7 relative, near float32 rounding), 2^n put into the exponent bits. x is clamped to
// [-87, 88], where 2^n stays a normal float.
inline __m256 exp8(__m256 x) {
  x = _mm256_max_ps(_mm256_min_ps(x, _mm256_set1_ps(88.0f)), _mm256_set1_ps(-87.0f));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504f)), _MM_FROUND_TO_NEAREST_INT);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693145752f), x);  // ln 2 in two parts, for precision
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(1.42860677e-6f), r);
  __m256 p = _mm256_set1_ps(1.0f / 720);
  for (float c : {1.0f / 120, 1.0f / 24, 1.0f / 6, 0.5f, 1.0f, 1.0f}) p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(c));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

inline float exp1(float x) {  // exp8 for one value, so tails give the same numbers
  float v[8] = {x};
  _mm256_storeu_ps(v, exp8(_mm256_loadu_ps(v)));
  return v[0];
}

// o[0:n] += w * v[0:n]
template <class E>
inline void axpy(float* o, float w, E v, int64_t n) {
  const __m256 wv = _mm256_set1_ps(w);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) _mm256_storeu_ps(o + i, _mm256_fmadd_ps(wv, load8(v + i), _mm256_loadu_ps(o + i)));
  for (; i < n; ++i) o[i] += w * to_float(v[i]);
}

// the largest of p[0:n] (n > 0), 32 at a time: std::max_element's one chain of compares was half the time
// of a 1024-token prefill's softmax
inline float max_of(const float* p, int64_t n) {
  __m256 m[4];
  for (__m256& v : m) v = _mm256_set1_ps(p[0]);
  int64_t t = 0;
  for (; t + 32 <= n; t += 32)
    for (int j = 0; j < 4; ++j) m[j] = _mm256_max_ps(m[j], _mm256_loadu_ps(p + t + 8 * j));
  float mx = hmax(_mm256_max_ps(_mm256_max_ps(m[0], m[1]), _mm256_max_ps(m[2], m[3])));
  for (; t < n; ++t) mx = std::max(mx, p[t]);
  return mx;
}

// p[0:n] = exp(p - mx); returns their sum
inline float exp_shifted(float* p, int64_t n, float mx) {
  const __m256 m = _mm256_set1_ps(mx);
  __m256 acc = _mm256_setzero_ps();
  int64_t t = 0;
  for (; t + 8 <= n; t += 8) {
    const __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(p + t), m));
    _mm256_storeu_ps(p + t, e);
    acc = _mm256_add_ps(acc, e);
  }
  float sum = hsum(acc);
  for (; t < n; ++t) sum += (p[t] = exp1(p[t] - mx));
  return sum;
}

// the sums of each of a0 .. a3's 8 lanes, in that order
inline __m128 sums4(__m256 a0, __m256 a1, __m256 a2, __m256 a3) {
  const __m256 s = _mm256_hadd_ps(_mm256_hadd_ps(a0, a1), _mm256_hadd_ps(a2, a3));
  return _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));
}

// The query heads sharing a kv head attend together: each key and value is loaded (and widened from
// float16) once for all of them, not once per head; at 16 rows of SmolLM2 (3 heads per kv head) the
// widening was as many instructions as the multiply-adds. Per head and position the arithmetic is the same
// whatever the number of heads in a pass. A pass takes up to HEADS_256 heads in the 256-bit loops (16
// registers), HEADS_512 in the 512-bit ones (32).
constexpr int HEADS_256 = 2, HEADS_512 = 4;

// p[h * L + t] = scale * q_h . K[t] for the NH heads q_h = q + h * hd and t < L (K [L, hd]); 4 positions
// at a time in independent FMA chains where hd % 8 == 0
template <int NH, class E>
inline void scores_heads(const float* q, E K, int64_t L, int64_t hd, float scale, float* p) {
  int64_t t = 0;
  if (hd % 8 == 0) {
    for (; t + 4 <= L; t += 4) {
      for (int j = 0; j < 4; ++j) pull_row(K, t + AHEAD + j, L, hd);
      __m256 a[NH][4];
      for (int h = 0; h < NH; ++h)
        for (int j = 0; j < 4; ++j) a[h][j] = _mm256_setzero_ps();
      for (int64_t i = 0; i < hd; i += 8) {
        __m256 k[4];
        for (int j = 0; j < 4; ++j) k[j] = load8(K + (t + j) * hd + i);
        for (int h = 0; h < NH; ++h) {
          const __m256 qv = _mm256_loadu_ps(q + h * hd + i);
          for (int j = 0; j < 4; ++j) a[h][j] = _mm256_fmadd_ps(qv, k[j], a[h][j]);
        }
      }
      for (int h = 0; h < NH; ++h)
        _mm_storeu_ps(p + h * L + t, _mm_mul_ps(sums4(a[h][0], a[h][1], a[h][2], a[h][3]), _mm_set1_ps(scale)));
    }
  }
  for (; t < L; ++t)
    for (int h = 0; h < NH; ++h) p[h * L + t] = dot(q + h * hd, K + t * hd, hd) * scale;
}

// out[h * hd + 0 : NV*8] = scale[h] * sum_t p[h * L + t] * V[t, 0 : NV*8] (row stride hd) for the NH heads,
// the sums held in registers
template <int NH, int NV, class E>
inline void weighted_heads_rows(const float* p, E V, int64_t L, int64_t hd, const float* scale, float* out,
                                bool pull) {
  __m256 acc[NH][NV];
  for (int h = 0; h < NH; ++h)
    for (int j = 0; j < NV; ++j) acc[h][j] = _mm256_setzero_ps();
  for (int64_t t = 0; t < L; ++t) {
    if (pull) pull_row(V, t + AHEAD, L, hd);
    __m256 v[NV];
    for (int j = 0; j < NV; ++j) v[j] = load8(V + t * hd + j * 8);
    for (int h = 0; h < NH; ++h) {
      const __m256 w = _mm256_set1_ps(p[h * L + t]);
      for (int j = 0; j < NV; ++j) acc[h][j] = _mm256_fmadd_ps(w, v[j], acc[h][j]);
    }
  }
  for (int h = 0; h < NH; ++h)
    for (int j = 0; j < NV; ++j)
      _mm256_storeu_ps(out + h * hd + j * 8, _mm256_mul_ps(acc[h][j], _mm256_set1_ps(scale[h])));
}

// out[h * hd + 0 : hd] = scale[h] * sum_t p[h * L + t] V[t] for the NH heads and t < L (V [L, hd])
template <int NH, class E>
inline void weighted_heads(const float* p, E V, int64_t L, int64_t hd, const float* scale, float* out) {
  if (hd % 8 != 0) {
    for (int h = 0; h < NH; ++h) {
      std::fill_n(out + h * hd, hd, 0.0f);
      for (int64_t t = 0; t < L; ++t) axpy(out + h * hd, p[h * L + t] * scale[h], V + t * hd, hd);
    }
    return;
  }
  int64_t c = 0;
  // the first columns' pass pulls the rows ahead (whole: the later passes find them in cache)
  for (; c + 32 <= hd; c += 32) weighted_heads_rows<NH, 4>(p, V + c, L, hd, scale, out + c, c == 0);
  for (; c < hd; c += 8) weighted_heads_rows<NH, 1>(p, V + c, L, hd, scale, out + c, c == 0);
}

// The same loops in 512-bit registers (head_dim % 16 == 0), where the CPU has AVX-512F and use_wide_tiles
// is on: half the multiply-adds of the 256-bit loops (SmolLM2, 16 rows at position 400: a step 19.0 -> 15.7 ms).
#define WIDE_TARGET __attribute__((target("avx512f,fma")))

WIDE_TARGET inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
WIDE_TARGET inline __m512 load16(Q8View v) {
  const __m512i q = _mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(v.c)));
  return _mm512_mul_ps(_mm512_cvtepi32_ps(q), _mm512_set1_ps(v.scale()));
}
WIDE_TARGET inline __m512 load16(const uint16_t* p) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}

WIDE_TARGET inline __m256 fold(__m512 a) {  // the sums of a's lanes i and i + 8
  return _mm256_add_ps(_mm512_castps512_ps256(a), _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(a), 1)));
}

// scores_heads over 16 floats at a time
template <int NH, class E>
WIDE_TARGET void scores_heads_wide(const float* q, E K, int64_t L, int64_t hd, float scale, float* p) {
  int64_t t = 0;
  for (; t + 4 <= L; t += 4) {
    for (int j = 0; j < 4; ++j) pull_row(K, t + AHEAD + j, L, hd);
    __m512 a[NH][4];
    for (int h = 0; h < NH; ++h)
      for (int j = 0; j < 4; ++j) a[h][j] = _mm512_setzero_ps();
    for (int64_t i = 0; i < hd; i += 16) {
      __m512 k[4];
      for (int j = 0; j < 4; ++j) k[j] = load16(K + (t + j) * hd + i);
      for (int h = 0; h < NH; ++h) {
        const __m512 qv = _mm512_loadu_ps(q + h * hd + i);
        for (int j = 0; j < 4; ++j) a[h][j] = _mm512_fmadd_ps(qv, k[j], a[h][j]);
      }
    }
    for (int h = 0; h < NH; ++h) {
      const __m128 s = sums4(fold(a[h][0]), fold(a[h][1]), fold(a[h][2]), fold(a[h][3]));
      _mm_storeu_ps(p + h * L + t, _mm_mul_ps(s, _mm_set1_ps(scale)));
    }
  }
  for (; t < L; ++t)
    for (int h = 0; h < NH; ++h) p[h * L + t] = dot(q + h * hd, K + t * hd, hd) * scale;
}

// weighted_heads_rows over NV registers of 16 floats, positions in pairs (two chains of FMAs per register)
template <int NH, int NV, class E>
WIDE_TARGET inline void weighted_heads_rows_wide(const float* p, E V, int64_t L, int64_t hd,
                                                 const float* scale, float* out, bool pull) {
  __m512 even[NH][NV], odd[NH][NV];
  for (int h = 0; h < NH; ++h)
    for (int j = 0; j < NV; ++j) even[h][j] = odd[h][j] = _mm512_setzero_ps();
  int64_t t = 0;
  for (; t + 2 <= L; t += 2) {
    if (pull) pull_row(V, t + AHEAD, L, hd), pull_row(V, t + AHEAD + 1, L, hd);
    __m512 v0[NV], v1[NV];
    for (int j = 0; j < NV; ++j) v0[j] = load16(V + t * hd + j * 16), v1[j] = load16(V + (t + 1) * hd + j * 16);
    for (int h = 0; h < NH; ++h) {
      const __m512 w0 = _mm512_set1_ps(p[h * L + t]), w1 = _mm512_set1_ps(p[h * L + t + 1]);
      for (int j = 0; j < NV; ++j) {
        even[h][j] = _mm512_fmadd_ps(w0, v0[j], even[h][j]);
        odd[h][j] = _mm512_fmadd_ps(w1, v1[j], odd[h][j]);
      }
    }
  }
  if (t < L) {
    __m512 v[NV];
    for (int j = 0; j < NV; ++j) v[j] = load16(V + t * hd + j * 16);
    for (int h = 0; h < NH; ++h)
      for (int j = 0; j < NV; ++j) even[h][j] = _mm512_fmadd_ps(_mm512_set1_ps(p[h * L + t]), v[j], even[h][j]);
  }
  for (int h = 0; h < NH; ++h)
    for (int j = 0; j < NV; ++j)
      _mm512_storeu_ps(out + h * hd + j * 16,
                       _mm512_mul_ps(_mm512_add_ps(even[h][j], odd[h][j]), _mm512_set1_ps(scale[h])));
}

template <int NH, class E>
WIDE_TARGET void weighted_heads_wide(const float* p, E V, int64_t L, int64_t hd, const float* scale,
                                     float* out) {
  int64_t c = 0;
  for (; c + 32 <= hd; c += 32) weighted_heads_rows_wide<NH, 2>(p, V + c, L, hd, scale, out + c, c == 0);
  if (c < hd) weighted_heads_rows_wide<NH, 1>(p, V + c, L, hd, scale, out + c, c == 0);
}

// Attention is split in spans of a row's positions, each attended by its own thread: one row of a long
// context otherwise had its few kv heads as the only parts (SmolLM2's 3 on 2 threads: one thread did two;
// one row at 2000 positions took 7.0 ms a step, 6.5 in spans of 512 or 1024). Each span costs a little
// (16 rows at 2000: 50.6 ms unsplit, 51.9 in spans of 1024, 53.3 of 512). The spans depend on the row's
// position only, so a row's arithmetic does not depend on its batch.
constexpr int64_t SPAN = 1024;

inline int64_t spans(int64_t L) { return (L + SPAN - 1) / SPAN; }

// attend_span for NH heads in one pass (p: scratch of NH * L floats)
template <int NH, bool WIDE, class E>
void attend_heads(const float* q, E K, E V, int64_t L, int64_t hd, float scale, float* p, float* out,
                  float* m, float* l) {
  if constexpr (WIDE) scores_heads_wide<NH, E>(q, K, L, hd, scale, p);
  else scores_heads<NH, E>(q, K, L, hd, scale, p);
  float weight[NH];  // of each head's sum
  for (int h = 0; h < NH; ++h) {
    float* ph = p + h * L;
    const float mx = max_of(ph, L), sum = exp_shifted(ph, L, mx);
    if (m != nullptr) m[h] = mx, l[h] = sum;
    weight[h] = m == nullptr ? 1.0f / sum : 1.0f;
  }
  if constexpr (WIDE) weighted_heads_wide<NH, E>(p, V, L, hd, weight, out);
  else weighted_heads<NH, E>(p, V, L, hd, weight, out);
}

// The `group` query heads q [group, hd] sharing one kv head, against its positions [t0, t0 + L) (K, V
// [L, hd] from there), in passes of up to HEADS heads. p: scratch of min(group, HEADS) * L floats. Alone
// (m == nullptr): the attention, into out [group, hd]. Else one span of several: per head r, the scores'
// max m[r], the sum of their exp shifted by it l[r], and out[r] = sum_t exp(score_t - m[r]) V[t], which
// merge_spans combines.
template <bool WIDE, class E>
void attend_span(const float* q, int64_t group, E K, E V, int64_t L, int64_t hd, float scale,
                 float* p, float* out, float* m, float* l) {
  constexpr int HEADS = WIDE ? HEADS_512 : HEADS_256;
  const bool alone = m == nullptr;
  for (int64_t h = 0; h < group; h += HEADS) {
    auto pass = attend_heads<1, WIDE, E>;
    switch (std::min<int64_t>(HEADS, group - h)) {
      case 4: if constexpr (HEADS >= 4) pass = attend_heads<4, WIDE, E>; break;
      case 3: if constexpr (HEADS >= 3) pass = attend_heads<3, WIDE, E>; break;
      case 2: pass = attend_heads<2, WIDE, E>; break;
    }
    pass(q + h * hd, K, V, L, hd, scale, p, out + h * hd, alone ? nullptr : m + h, alone ? nullptr : l + h);
  }
}

// Parts [0, n) of costs cost[i] in `runs` runs of consecutive parts of about equal cost: run r is
// [bound[r], bound[r + 1])
std::vector<int64_t> balanced_runs(const std::vector<int64_t>& cost, int64_t runs) {
  int64_t total = 0, sum = 0, r = 1;
  for (int64_t c : cost) total += c;
  std::vector<int64_t> bound(runs + 1, int64_t(cost.size()));
  bound[0] = 0;
  for (size_t i = 0; i < cost.size() && r < runs; ++i) {
    sum += cost[i];
    while (r < runs && sum * runs >= total * r) bound[r++] = int64_t(i) + 1;
  }
  return bound;
}

// out [group, hd] = the attention of `n` spans' partial results (attend_span) o [n, group, hd], m, l [n, group]
void merge_spans(int64_t n, int64_t group, int64_t hd, const float* o, const float* m, const float* l, float* out) {
  for (int64_t r = 0; r < group; ++r) {
    float mx = m[r], sum = 0.0f;
    for (int64_t c = 1; c < n; ++c) mx = std::max(mx, m[c * group + r]);
    for (int64_t c = 0; c < n; ++c) sum += exp1(m[c * group + r] - mx) * l[c * group + r];
    float* dst = out + r * hd;
    std::fill_n(dst, hd, 0.0f);
    for (int64_t c = 0; c < n; ++c) axpy(dst, exp1(m[c * group + r] - mx) / sum, o + (c * group + r) * hd, hd);
  }
}

// Rows per part of the row loops below: a part must outweigh the pool's hand-off (about a microsecond),
// and one row stays on the calling thread. Every row gets the same arithmetic however the rows are split.
constexpr int64_t SWIGLU_GRAIN = 1, NORM_GRAIN = 4, ROPE_GRAIN = 4;

// [B, 2F] (gate | up) -> [B, F]: silu(gate) * up = gate / (1 + e^-gate) * up
at::Tensor swiglu(const at::Tensor& gu) {
  const int64_t B = gu.size(0), F = gu.size(1) / 2;
  auto y = at::empty({B, F}, gu.options());
  const float* gp = gu.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  parallel_for(B, SWIGLU_GRAIN, [&](int64_t b0, int64_t b1) {
    const __m256 one = _mm256_set1_ps(1.0f);
    for (int64_t b = b0; b < b1; ++b) {
      const float *g = gp + b * 2 * F, *u = g + F;
      float* o = yp + b * F;
      int64_t j = 0;
      for (; j + 8 <= F; j += 8) {
        const __m256 gv = _mm256_loadu_ps(g + j);
        const __m256 e = exp8(_mm256_sub_ps(_mm256_setzero_ps(), gv));
        _mm256_storeu_ps(o + j, _mm256_mul_ps(_mm256_div_ps(gv, _mm256_add_ps(one, e)), _mm256_loadu_ps(u + j)));
      }
      for (; j < F; ++j) o[j] = g[j] / (1.0f + exp1(-g[j])) * u[j];
    }
  });
  return y;
}

// [B, D] -> [B, D]: x * rsqrt(mean(x^2) + eps) * weight
at::Tensor rmsnorm(const at::Tensor& x, const at::Tensor& weight, double eps) {
  const int64_t B = x.size(0), D = x.size(1);
  auto y = at::empty_like(x);
  const float* xp = x.data_ptr<float>();
  const float* wp = weight.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  parallel_for(B, NORM_GRAIN, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const float* xr = xp + b * D;
      const float r = 1.0f / std::sqrt(dot(xr, xr, D) / float(D) + float(eps));
      for (int64_t i = 0; i < D; ++i) yp[b * D + i] = xr[i] * r * wp[i];
    }
  });
  return y;
}

// y += x, both contiguous float32 of the same size (a plain loop: no parallel region for a few floats)
inline void add_into(at::Tensor& y, const at::Tensor& x) {
  float* yp = y.data_ptr<float>();
  const float* xp = x.data_ptr<float>();
  for (int64_t i = 0, n = y.numel(); i < n; ++i) yp[i] += xp[i];
}

// rotate each head of v [hd] in place: (x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin), halves of the head
inline void rope(float* v, int64_t heads, int64_t hd, const float* cos, const float* sin) {
  const int64_t half = hd / 2;
  for (int64_t h = 0; h < heads; ++h, v += hd)
    for (int64_t i = 0; i < half; ++i) {
      const float x1 = v[i], x2 = v[i + half];
      v[i] = x1 * cos[i] - x2 * sin[i];
      v[i + half] = x2 * cos[i] + x1 * sin[i];
    }
}

// The attention's parts: (row, kv head, span), a row's consecutive, each thread taking a run of consecutive parts
// of about equal work (a prefill call's later rows attend over more positions: halves by count left one thread
// with 3/4 of a 1024-token prompt's attention). A row of several spans keeps its parts' results in `partial`
// from first[b] on, per kv head: o [spans, group, hd], then m and l [spans, group] (attend_span). Planned
// before the q/k/v matmul, whose tiles pull each thread's keys and values (side_pull).
struct AttentionPlan {
  // part i: its row b, kv head g, span c of n; its keys and values [len, hd] at `at` in the cache
  struct Part {
    int64_t b, g, c, n, len, at;
  };
  const int64_t *pp, *sp;
  int64_t Hkv, S, hd, group;
  std::vector<int64_t> part_row, row_parts, first;  // each part's row; each row's first part; its results
  std::vector<int64_t> bound;  // thread r takes parts [bound[r], bound[r + 1])
  int64_t floats = 0;  // of the rows of several spans' results

  AttentionPlan(const int64_t* pos, const int64_t* slots, int64_t B, int64_t Hkv, int64_t S, int64_t hd,
                int64_t group)
      : pp(pos), sp(slots), Hkv(Hkv), S(S), hd(hd), group(group), row_parts(B), first(B, -1) {
    std::vector<int64_t> cost;  // each part's: its positions, and a few for its fixed work
    for (int64_t b = 0; b < B; ++b) {
      const int64_t L = pp[b] + 1, n = spans(L);
      if (n > 1) first[b] = floats, floats += Hkv * n * group * (hd + 2);
      row_parts[b] = int64_t(part_row.size());
      part_row.insert(part_row.end(), Hkv * n, b);
      for (int64_t i = 0; i < Hkv * n; ++i) cost.push_back(std::min(SPAN, L - i % n * SPAN) + 16);
    }
    bound = balanced_runs(cost, std::min<int64_t>(at::get_num_threads(), int64_t(part_row.size())));
  }
  int64_t runs() const { return int64_t(bound.size()) - 1; }
  Part part(int64_t i) const {
    Part x;
    x.b = part_row[i], x.n = spans(pp[x.b] + 1);
    x.g = (i - row_parts[x.b]) / x.n, x.c = (i - row_parts[x.b]) % x.n;
    const int64_t t0 = x.c * SPAN;  // its first position
    x.len = std::min(SPAN, pp[x.b] + 1 - t0), x.at = ((sp[x.b] * Hkv + x.g) * S + t0) * hd;
    return x;
  }
};

// At a few rows and short contexts, the attention waited on its keys and values while the q/k/v matmul before
// it, bound by its arithmetic, left the memory idle: that matmul's tiles pull each thread's keys and values
// into its L2 on the way, where they fit beside its weights (at most 3/4 of L2 per thread; else none, and the
// loops pull them as they go), a line of each page first (PullLines::pages_first: each part's keys and values
// are in pages of their own). The default model, the pull switched at run time in one process (10 rounds,
// medians of the layers' time): 16 rows at position 16 -4.6%, 45 -5.4%, 77 -6.3%, 120 -3.6%, 200 and 1000
// unchanged; 4 rows at 45 -5.8%, 8 at 100 -4.5%; without the pages first -1.3, -2.1, -4.7, -3.6, -5.7 and
// -4.5%. Budgets of 1.5 and 4 MB: no faster at 200, and at 400 4 MB was 5% slower. Float16 caches, as pull_part.
SidePull side_pull(const AttentionPlan& plan, const uint16_t* kc, const uint16_t* vc) {
  static const int64_t budget = [] {
    const long l2 = sysconf(_SC_LEVEL2_CACHE_SIZE);
    return (l2 > 0 ? l2 : 1 << 20) / 4 * 3;
  }();
  SidePull side(plan.runs());
  for (int64_t r = 0; r < plan.runs(); ++r) {
    PullLines& lines = side[r];
    for (int64_t i = plan.bound[r]; i < plan.bound[r + 1]; ++i) {
      const auto x = plan.part(i);
      const int64_t bytes = x.len * plan.hd * int64_t(sizeof(uint16_t));
      lines.ranges.emplace_back(reinterpret_cast<const char*>(kc + x.at), bytes);
      lines.ranges.emplace_back(reinterpret_cast<const char*>(vc + x.at), bytes);
    }
    if (lines.lines() * 64 > budget) lines.ranges.clear();
    lines.pages_first();
  }
  return side;
}

// For the plan's rows b < B: RoPE on their queries and keys qkv [B, (H + 2 Hkv) * hd] (in place), their
// keys and values into the cache at [slots[b], kv head, pos[b]], and their attention into att [B, H * hd].
// kc: the cache's keys [slots, Hkv, S, hd], then as many values (vc), as float32, float16 (E = uint16_t) or
// int8 (E = int8_t; their scales ksc, vsc [slots, Hkv, S, hd / KV_GROUP]).
template <class E>
void rope_and_attend(const AttentionPlan& plan, float* qkv, const float* cos, const float* sin, E* kc, E* vc,
                     float* att, float* ksc = nullptr, float* vsc = nullptr) {
  constexpr bool INT8 = std::is_same_v<E, int8_t>;  // ksc, vsc: the scales of its keys and values
  const int64_t Hkv = plan.Hkv, S = plan.S, hd = plan.hd, group = plan.group;
  const int64_t B = int64_t(plan.row_parts.size()), H = group * Hkv;
  const int64_t *pp = plan.pp, *sp = plan.sp;
  const int64_t qdim = H * hd, kvdim = Hkv * hd, row = qdim + 2 * kvdim;
  parallel_for(B, ROPE_GRAIN, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      float* q = qkv + b * row;
      const float* c = cos + b * (hd / 2);
      const float* s = sin + b * (hd / 2);
      rope(q, H, hd, c, s);
      rope(q + qdim, Hkv, hd, c, s);
      for (int64_t g = 0; g < Hkv; ++g) {  // write this token's key and value at [slot, g, pos]
        const int64_t at = ((sp[b] * Hkv + g) * S + pp[b]) * hd;
        if constexpr (INT8) {
          store_row(q + qdim + g * hd, hd, kc + at, ksc + at / KV_GROUP);
          store_row(q + qdim + kvdim + g * hd, hd, vc + at, vsc + at / KV_GROUP);
        } else {
          store_row(q + qdim + g * hd, hd, kc + at);
          store_row(q + qdim + kvdim + g * hd, hd, vc + at);
        }
      }
    }
  });

  const float scale = 1.0f / std::sqrt(float(hd));
  const bool wide = hd % 16 == 0 && wide_tiles_on();
  std::vector<float> partial(plan.floats);
  auto results = [&](int64_t b, int64_t g, int64_t n) {
    return partial.data() + plan.first[b] + g * n * group * (hd + 2);
  };
  parallel_for(plan.runs(), 1, [&](int64_t r0, int64_t r1) {
    std::vector<float> p;
    for (int64_t i = plan.bound[r0]; i < plan.bound[r1]; ++i) {
      const auto [b, g, c, n, len, at] = plan.part(i);
      if (i + 1 < plan.bound[r1]) {
        const auto next = plan.part(i + 1);
        pull_part(kc + next.at, vc + next.at, next.len, hd);
      }
      const float* q = qkv + b * row + g * group * hd;       // the query heads g * group .. share kv head g
      float* out = att + b * qdim + g * group * hd;
      p.resize(std::min<int64_t>(group, wide ? HEADS_512 : HEADS_256) * len);
      using R = std::conditional_t<INT8, Q8View, const E*>;  // what the loops read the keys and values through
      R K, V;
      if constexpr (INT8)
        K = {kc + at, ksc + at / KV_GROUP}, V = {vc + at, vsc + at / KV_GROUP};
      else
        K = kc + at, V = vc + at;
      auto attend = wide ? attend_span<true, R> : attend_span<false, R>;
      if (n == 1) {
        attend(q, group, K, V, len, hd, scale, p.data(), out, nullptr, nullptr);
      } else {
        float *o = results(b, g, n), *m = o + n * group * hd, *l = m + n * group;
        attend(q, group, K, V, len, hd, scale, p.data(), o + c * group * hd, m + c * group, l + c * group);
      }
    }
  });
  if (plan.floats == 0) return;  // no row of several spans: nothing to merge (a region fewer per layer)
  parallel_for(B, 1, [&](int64_t b0, int64_t b1) {  // rows of several spans
    for (int64_t b = b0; b < b1; ++b) {
      if (plan.first[b] < 0) continue;
      const int64_t n = spans(pp[b] + 1);
      for (int64_t g = 0; g < Hkv; ++g) {
        const float* o = results(b, g, n);
        merge_spans(n, group, hd, o, o + n * group * hd, o + n * group * (hd + 1), att + b * qdim + g * group * hd);
      }
    }
  });
}

}  // namespace

at::Tensor decode_layer(at::Tensor x, at::Tensor slots, at::Tensor pos, at::Tensor cos, at::Tensor sin,
                           at::Tensor attn_norm, at::Tensor wqkv, at::Tensor wqkv_s, at::Tensor wo,
                           at::Tensor wo_s, at::Tensor ffn_norm, at::Tensor w13, at::Tensor w13_s,
                           at::Tensor w2, at::Tensor w2_s, at::Tensor cache_kv, at::Tensor cache_scales,
                           int64_t n_kv_heads, int64_t max_seq_len, int64_t n_heads, double eps) {
  // x [B, D] float32; slots, pos [B] int64; cos/sin [B, hd/2] float32; cache_kv [2, slots * Hkv * S, hd]
  // float32, float16 or int8: the keys, then the values, each [slots, Hkv, S, hd] (model.KVCache's buffer as
  // it is: building its k and v views in Python took 0.2 ms of a one-row step's 4.2); int8's scales
  // cache_scales [2, slots * Hkv * S, hd / 32] float32 (else empty)
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous(), "x: float32 [B, D]");
  const bool half = cache_kv.scalar_type() == at::kHalf, int8 = cache_kv.scalar_type() == at::kChar;
  TORCH_CHECK(cache_kv.dim() == 3 && cache_kv.size(0) == 2 &&
                  (half || int8 || cache_kv.scalar_type() == at::kFloat) && cache_kv.is_contiguous() &&
                  n_kv_heads > 0 && max_seq_len > 0 && cache_kv.size(1) % (n_kv_heads * max_seq_len) == 0,
              "cache: contiguous float32, float16 or int8 [2, slots * n_kv_heads * max_seq_len, hd]");
  TORCH_CHECK(!int8 || (cache_kv.size(2) % KV_GROUP == 0 && cache_scales.scalar_type() == at::kFloat &&
                        cache_scales.is_contiguous() && cache_scales.dim() == 3 && cache_scales.size(0) == 2 &&
                        cache_scales.size(1) == cache_kv.size(1) &&
                        cache_scales.size(2) == cache_kv.size(2) / KV_GROUP),
              "int8 cache: head_dim a multiple of 32, scales contiguous float32 [2, slots * n_kv_heads * max_seq_len, "
              "head_dim / 32]");
  TORCH_CHECK(pos.scalar_type() == at::kLong && pos.is_contiguous() && pos.numel() == x.size(0), "pos: int64 [B]");
  TORCH_CHECK(slots.scalar_type() == at::kLong && slots.is_contiguous() && slots.numel() == x.size(0),
              "slots: int64 [B]");
  const int64_t B = x.size(0), Hkv = n_kv_heads, S = max_seq_len, hd = cache_kv.size(2);
  const int64_t cache_slots = cache_kv.size(1) / (Hkv * S);
  const int64_t H = n_heads;
  TORCH_CHECK(H % Hkv == 0, "n_heads: a multiple of the cache's key/value heads");
  for (const at::Tensor* t : {&cos, &sin}) {  // read as [B, hd/2] float32 below
    TORCH_CHECK(t->dim() == 2 && t->size(0) == B && t->size(1) == hd / 2 && t->scalar_type() == at::kFloat &&
                    t->is_contiguous(),
                "rope tables cos, sin: contiguous float32 [B, hd/2]");
  }
  const int64_t* pp = pos.data_ptr<int64_t>();
  const int64_t* sp = slots.data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b) {
    TORCH_CHECK(pp[b] >= 0 && pp[b] < S, "position outside the cache");
    TORCH_CHECK(sp[b] >= 0 && sp[b] < cache_slots, "slot outside the cache");
  }

  const AttentionPlan plan(pp, sp, B, Hkv, S, hd, H / Hkv);
  uint16_t* half_kc = half ? reinterpret_cast<uint16_t*>(cache_kv.data_ptr<at::Half>()) : nullptr;
  SidePull side = half && B >= PAIR_MIN_M ? side_pull(plan, half_kc, half_kc + cache_kv.stride(0)) : SidePull();
  // [B, qdim + 2 kvdim]
  auto qkv = linear(rmsnorm(x, attn_norm, eps), wqkv, wqkv_s, FUSED_TILES_MAX_M, &side).contiguous();
  float *qkvp = qkv.data_ptr<float>(), *cosp = cos.data_ptr<float>(), *sinp = sin.data_ptr<float>();
  auto att = at::empty({B, H * hd}, x.options());  // [B, H * hd]
  float* ap = att.data_ptr<float>();
  if (half) {
    rope_and_attend(plan, qkvp, cosp, sinp, half_kc, half_kc + cache_kv.stride(0), ap);
  } else if (int8) {
    int8_t* kc = cache_kv.data_ptr<int8_t>();
    float* ks = cache_scales.data_ptr<float>();
    rope_and_attend(plan, qkvp, cosp, sinp, kc, kc + cache_kv.stride(0), ap, ks, ks + cache_scales.stride(0));
  } else {
    float* kc = cache_kv.data_ptr<float>();
    rope_and_attend(plan, qkvp, cosp, sinp, kc, kc + cache_kv.stride(0), ap);
  }

  auto h = linear(att, wo, wo_s, FUSED_TILES_MAX_M);  // [B, D], then the residual
  add_into(h, x);
  auto gu = linear(rmsnorm(h, ffn_norm, eps), w13, w13_s, FUSED_TILES_MAX_M).contiguous();  // [B, 2F]: gate | up
  add_into(h, linear(swiglu(gu), w2, w2_s, FUSED_TILES_MAX_M));
  return h;
}

LayerStack::LayerStack(std::vector<std::vector<at::Tensor>> layers, int64_t n_kv_heads, int64_t n_heads, double eps)
    : layers_(std::move(layers)), n_kv_heads_(n_kv_heads), n_heads_(n_heads), eps_(eps) {
  for (const auto& w : layers_) TORCH_CHECK(w.size() == 10, "a layer: 10 tensors, as decode_layer takes them");
}

void LayerStack::bind_caches(std::vector<at::Tensor> kv, std::vector<at::Tensor> scales, int64_t max_seq_len) {
  TORCH_CHECK(kv.empty() || (kv.size() == layers_.size() && scales.size() == layers_.size()),
              "caches: one cache_kv and one cache_scales per layer, or none");
  kv_ = std::move(kv), scales_ = std::move(scales), max_seq_len_ = max_seq_len;
}

at::Tensor LayerStack::forward(at::Tensor x, const at::Tensor& slots, const at::Tensor& pos, const at::Tensor& cos,
                               const at::Tensor& sin) const {
  TORCH_CHECK(kv_.size() == layers_.size(), "LayerStack: bind the KV caches first");
  for (size_t i = 0; i < layers_.size(); ++i) {
    const auto& w = layers_[i];
    x = decode_layer(x, slots, pos, cos, sin, w[0], w[1], w[2], w[3], w[4], w[5], w[6], w[7], w[8], w[9], kv_[i],
                     scales_[i], n_kv_heads_, max_seq_len_, n_heads_, eps_);
  }
  return x;
}
