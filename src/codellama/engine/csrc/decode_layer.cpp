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
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "kernels.h"
#include "parallel.h"
#include "simd.h"

namespace {

inline float dot(const float* a, const float* b, int64_t n) {
  __m256 acc = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc);
  float r = hsum(acc);
  for (; i < n; ++i) r += a[i] * b[i];
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
inline void axpy(float* o, float w, const float* v, int64_t n) {
  const __m256 wv = _mm256_set1_ps(w);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) _mm256_storeu_ps(o + i, _mm256_fmadd_ps(wv, _mm256_loadu_ps(v + i), _mm256_loadu_ps(o + i)));
  for (; i < n; ++i) o[i] += w * v[i];
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

// out[0..3] = q . k[i] for the 4 rows k[i] = K + i * hd (hd % 8 == 0): 4 independent FMA chains
inline __m128 dot4(const float* q, const float* K, int64_t hd) {
  __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
  for (int64_t i = 0; i < hd; i += 8) {
    const __m256 qv = _mm256_loadu_ps(q + i);
    a0 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(K + i), a0);
    a1 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(K + hd + i), a1);
    a2 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(K + 2 * hd + i), a2);
    a3 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(K + 3 * hd + i), a3);
  }
  return sums4(a0, a1, a2, a3);
}

// out[0 : NV*8] = scale * sum_t p[t] * V[t, 0 : NV*8] (row stride hd), the sums held in registers
template <int NV>
inline void weighted_rows(const float* p, const float* V, int64_t L, int64_t hd, float scale, float* out) {
  __m256 acc[NV];
  for (int j = 0; j < NV; ++j) acc[j] = _mm256_setzero_ps();
  for (int64_t t = 0; t < L; ++t) {
    const __m256 w = _mm256_set1_ps(p[t]);
    for (int j = 0; j < NV; ++j) acc[j] = _mm256_fmadd_ps(w, _mm256_loadu_ps(V + t * hd + j * 8), acc[j]);
  }
  for (int j = 0; j < NV; ++j) _mm256_storeu_ps(out + j * 8, _mm256_mul_ps(acc[j], _mm256_set1_ps(scale)));
}

// Attention of `group` query heads q [group, hd] (consecutive) to positions 0..L-1 of one kv head
// K, V [S, hd]: out [group, hd]. p: scratch of group * L floats.
void attend(const float* q, int64_t group, const float* K, const float* V, int64_t L, int64_t hd, float scale,
            float* p, float* out) {
  const bool simd = hd % 8 == 0;
  for (int64_t r = 0; r < group; ++r) {
    const float* qr = q + r * hd;
    float* pr = p + r * L;
    int64_t t = 0;
    if (simd)
      for (; t + 4 <= L; t += 4) _mm_storeu_ps(pr + t, _mm_mul_ps(dot4(qr, K + t * hd, hd), _mm_set1_ps(scale)));
    for (; t < L; ++t) pr[t] = dot(qr, K + t * hd, hd) * scale;
    const float inv = 1.0f / exp_shifted(pr, L, *std::max_element(pr, pr + L));
    float* o = out + r * hd;
    if (!simd) {
      std::fill_n(o, hd, 0.0f);
      for (int64_t u = 0; u < L; ++u) axpy(o, pr[u] * inv, V + u * hd, hd);
      continue;
    }
    for (int64_t c = 0; c < hd; c += 64) {  // 64 dims (8 registers) at a time
      switch (std::min<int64_t>(8, (hd - c) / 8)) {
        case 8: weighted_rows<8>(pr, V + c, L, hd, inv, o + c); break;
        case 4: weighted_rows<4>(pr, V + c, L, hd, inv, o + c); break;
        case 2: weighted_rows<2>(pr, V + c, L, hd, inv, o + c); break;
        case 1: weighted_rows<1>(pr, V + c, L, hd, inv, o + c); break;
        default:
          for (int64_t j = c; j < hd; j += 8) weighted_rows<1>(pr, V + j, L, hd, inv, o + j);
      }
    }
  }
}

// The same attention in 512-bit registers (head_dim % 16 == 0), where the CPU has AVX-512F and
// use_wide_tiles is on: half the multiply-adds of the 256-bit loops (SmolLM2, 16 rows at position 400: a
// step 19.0 -> 15.7 ms).
#define WIDE_TARGET __attribute__((target("avx512f,fma")))

WIDE_TARGET inline __m256 fold(__m512 a) {  // the sums of a's lanes i and i + 8
  return _mm256_add_ps(_mm512_castps512_ps256(a), _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(a), 1)));
}

// dot4 over 16 floats at a time
WIDE_TARGET inline __m128 dot4_wide(const float* q, const float* K, int64_t hd) {
  __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
  for (int64_t i = 0; i < hd; i += 16) {
    const __m512 qv = _mm512_loadu_ps(q + i);
    a0 = _mm512_fmadd_ps(qv, _mm512_loadu_ps(K + i), a0);
    a1 = _mm512_fmadd_ps(qv, _mm512_loadu_ps(K + hd + i), a1);
    a2 = _mm512_fmadd_ps(qv, _mm512_loadu_ps(K + 2 * hd + i), a2);
    a3 = _mm512_fmadd_ps(qv, _mm512_loadu_ps(K + 3 * hd + i), a3);
  }
  return sums4(fold(a0), fold(a1), fold(a2), fold(a3));
}

// weighted_rows over NV registers of 16 floats, positions in pairs (two chains of FMAs per register)
template <int NV>
WIDE_TARGET inline void weighted_rows_wide(const float* p, const float* V, int64_t L, int64_t hd, float scale,
                                           float* out) {
  __m512 even[NV], odd[NV];
  for (int j = 0; j < NV; ++j) even[j] = odd[j] = _mm512_setzero_ps();
  int64_t t = 0;
  for (; t + 2 <= L; t += 2) {
    const __m512 w0 = _mm512_set1_ps(p[t]), w1 = _mm512_set1_ps(p[t + 1]);
    for (int j = 0; j < NV; ++j) {
      even[j] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(V + t * hd + j * 16), even[j]);
      odd[j] = _mm512_fmadd_ps(w1, _mm512_loadu_ps(V + (t + 1) * hd + j * 16), odd[j]);
    }
  }
  if (t < L) {
    const __m512 w = _mm512_set1_ps(p[t]);
    for (int j = 0; j < NV; ++j) even[j] = _mm512_fmadd_ps(w, _mm512_loadu_ps(V + t * hd + j * 16), even[j]);
  }
  for (int j = 0; j < NV; ++j)
    _mm512_storeu_ps(out + j * 16, _mm512_mul_ps(_mm512_add_ps(even[j], odd[j]), _mm512_set1_ps(scale)));
}

// attend() in 512-bit registers: hd % 16 == 0
WIDE_TARGET void attend_wide(const float* q, int64_t group, const float* K, const float* V, int64_t L, int64_t hd,
                             float scale, float* p, float* out) {
  for (int64_t r = 0; r < group; ++r) {
    const float* qr = q + r * hd;
    float* pr = p + r * L;
    int64_t t = 0;
    for (; t + 4 <= L; t += 4) _mm_storeu_ps(pr + t, _mm_mul_ps(dot4_wide(qr, K + t * hd, hd), _mm_set1_ps(scale)));
    for (; t < L; ++t) pr[t] = dot(qr, K + t * hd, hd) * scale;
    const float inv = 1.0f / exp_shifted(pr, L, *std::max_element(pr, pr + L));
    float* o = out + r * hd;
    for (int64_t c = 0; c < hd; c += 64) {  // 64 dims (4 registers) at a time
      switch (std::min<int64_t>(4, (hd - c) / 16)) {
        case 4: weighted_rows_wide<4>(pr, V + c, L, hd, inv, o + c); break;
        case 3: weighted_rows_wide<3>(pr, V + c, L, hd, inv, o + c); break;
        case 2: weighted_rows_wide<2>(pr, V + c, L, hd, inv, o + c); break;
        default: weighted_rows_wide<1>(pr, V + c, L, hd, inv, o + c);
      }
    }
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

}  // namespace

at::Tensor decode_layer(at::Tensor x, at::Tensor slots, at::Tensor pos, at::Tensor cos, at::Tensor sin,
                           at::Tensor attn_norm, at::Tensor wqkv, at::Tensor wqkv_s, at::Tensor wo,
                           at::Tensor wo_s, at::Tensor ffn_norm, at::Tensor w13, at::Tensor w13_s,
                           at::Tensor w2, at::Tensor w2_s, at::Tensor cache_kv, int64_t n_kv_heads,
                           int64_t max_seq_len, int64_t n_heads, double eps) {
  // x [B, D] float32; slots, pos [B] int64; cos/sin [B, hd/2] float32; cache_kv [2, slots * Hkv * S, hd]
  // float32: the keys, then the values, each [slots, Hkv, S, hd] (model.KVCache's buffer as it is: building
  // its k and v views in Python took 0.2 ms of a one-row step's 4.2)
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous(), "x: float32 [B, D]");
  TORCH_CHECK(cache_kv.dim() == 3 && cache_kv.size(0) == 2 && cache_kv.scalar_type() == at::kFloat &&
                  cache_kv.is_contiguous() && n_kv_heads > 0 && max_seq_len > 0 &&
                  cache_kv.size(1) % (n_kv_heads * max_seq_len) == 0,
              "cache: contiguous float32 [2, slots * n_kv_heads * max_seq_len, hd]");
  TORCH_CHECK(pos.scalar_type() == at::kLong && pos.is_contiguous() && pos.numel() == x.size(0), "pos: int64 [B]");
  TORCH_CHECK(slots.scalar_type() == at::kLong && slots.is_contiguous() && slots.numel() == x.size(0),
              "slots: int64 [B]");
  const int64_t B = x.size(0), Hkv = n_kv_heads, S = max_seq_len, hd = cache_kv.size(2);
  const int64_t cache_slots = cache_kv.size(1) / (Hkv * S);
  const int64_t H = n_heads, group = H / Hkv, qdim = H * hd, kvdim = Hkv * hd;
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

  auto qkv = linear(rmsnorm(x, attn_norm, eps), wqkv, wqkv_s, FUSED_TILES_MAX_M).contiguous();  // [B, qdim + 2 kvdim]
  float* qkvp = qkv.data_ptr<float>();
  float* kc = cache_kv.data_ptr<float>();  // [slots, Hkv, S, hd] keys, then as many values
  float* vc = kc + cache_kv.stride(0);
  const int64_t row = qdim + 2 * kvdim;
  parallel_for(B, ROPE_GRAIN, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      float* q = qkvp + b * row;
      const float* c = cos.data_ptr<float>() + b * (hd / 2);
      const float* s = sin.data_ptr<float>() + b * (hd / 2);
      rope(q, H, hd, c, s);
      rope(q + qdim, Hkv, hd, c, s);
      for (int64_t g = 0; g < Hkv; ++g) {  // write this token's key and value at [slot, g, pos]
        const int64_t at = ((sp[b] * Hkv + g) * S + pp[b]) * hd;
        std::copy_n(q + qdim + g * hd, hd, kc + at);
        std::copy_n(q + qdim + kvdim + g * hd, hd, vc + at);
      }
    }
  });

  auto att = at::empty({B, qdim}, x.options());  // [B, H * hd]
  float* ap = att.data_ptr<float>();
  const float scale = 1.0f / std::sqrt(float(hd));
  const bool wide = hd % 16 == 0 && wide_tiles_on();
  parallel_for(B * Hkv, 1, [&](int64_t i0, int64_t i1) {
    std::vector<float> p;
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t b = i / Hkv, g = i % Hkv, L = pp[b] + 1;
      const int64_t cache_row = (sp[b] * Hkv + g) * S * hd;  // [S, hd] of this row's kv head
      p.resize(group * L);
      // the query heads g * group .. (g + 1) * group - 1 share kv head g
      (wide ? attend_wide : attend)(qkvp + b * row + g * group * hd, group, kc + cache_row, vc + cache_row, L, hd,
                                    scale, p.data(), ap + b * qdim + g * group * hd);
    }
  });

  auto h = linear(att, wo, wo_s, FUSED_TILES_MAX_M);  // [B, D], then the residual
  add_into(h, x);
  auto gu = linear(rmsnorm(h, ffn_norm, eps), w13, w13_s, FUSED_TILES_MAX_M).contiguous();  // [B, 2F]: gate | up
  add_into(h, linear(swiglu(gu), w2, w2_s, FUSED_TILES_MAX_M));
  return h;
}
