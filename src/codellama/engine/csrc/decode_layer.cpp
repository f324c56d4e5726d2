// One Llama decoder layer for rows of new tokens, in a single call from Python.
//
// Decoding a small model on the CPU costs more in per-operator overhead than in arithmetic: eager PyTorch
// spends ~45 operator calls per layer on a token (norms, RoPE, cache writes, attention, SwiGLU), ~14 ms per
// token for SmolLM2-135M's 30 layers. Here the whole layer is one call: the four matmuls go to the int8 /
// int4 kernels (or torch's float32 matmul), and everything between them is a plain loop over a few
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

#include <cmath>
#include <vector>

#include "kernels.h"
#include "parallel.h"

namespace {

inline float dot(const float* a, const float* b, int64_t n) {
  __m256 acc = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc);
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  float r = _mm_cvtss_f32(s);
  for (; i < n; ++i) r += a[i] * b[i];
  return r;
}

// [B, D] -> [B, D]: x * rsqrt(mean(x^2) + eps) * weight
torch::Tensor rmsnorm(const torch::Tensor& x, const torch::Tensor& weight, double eps) {
  const int64_t B = x.size(0), D = x.size(1);
  auto y = torch::empty_like(x);
  const float* xp = x.data_ptr<float>();
  const float* wp = weight.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  for (int64_t b = 0; b < B; ++b) {
    const float* xr = xp + b * D;
    const float r = 1.0f / std::sqrt(dot(xr, xr, D) / float(D) + float(eps));
    for (int64_t i = 0; i < D; ++i) yp[b * D + i] = xr[i] * r * wp[i];
  }
  return y;
}

// y += x, both contiguous float32 of the same size (a plain loop: no parallel region for a few floats)
inline void add_into(torch::Tensor& y, const torch::Tensor& x) {
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

torch::Tensor decode_layer(torch::Tensor x, torch::Tensor slots, torch::Tensor pos, torch::Tensor cos, torch::Tensor sin,
                           torch::Tensor attn_norm, torch::Tensor wqkv, torch::Tensor wqkv_s, torch::Tensor wo,
                           torch::Tensor wo_s, torch::Tensor ffn_norm, torch::Tensor w13, torch::Tensor w13_s,
                           torch::Tensor w2, torch::Tensor w2_s, torch::Tensor cache_k, torch::Tensor cache_v,
                           int64_t n_heads, double eps) {
  // x [B, D] float32; slots, pos [B] int64; cos/sin [B, hd/2] float32; cache_k/v [slots, Hkv, S, hd] float32
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kFloat32 && x.is_contiguous(), "x: float32 [B, D]");
  TORCH_CHECK(cache_k.scalar_type() == torch::kFloat32 && cache_k.is_contiguous() && cache_v.is_contiguous(),
              "cache: contiguous float32 [slots, Hkv, S, hd]");
  TORCH_CHECK(pos.scalar_type() == torch::kInt64 && pos.is_contiguous() && pos.numel() == x.size(0), "pos: int64 [B]");
  TORCH_CHECK(slots.scalar_type() == torch::kInt64 && slots.is_contiguous() && slots.numel() == x.size(0),
              "slots: int64 [B]");
  const int64_t B = x.size(0), Hkv = cache_k.size(1), S = cache_k.size(2), hd = cache_k.size(3);
  const int64_t H = n_heads, group = H / Hkv, qdim = H * hd, kvdim = Hkv * hd;
  TORCH_CHECK(cos.size(0) == B && cos.size(1) == hd / 2, "rope tables: [B, hd/2]");
  const int64_t* pp = pos.data_ptr<int64_t>();
  const int64_t* sp = slots.data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b) {
    TORCH_CHECK(pp[b] >= 0 && pp[b] < S, "position outside the cache");
    TORCH_CHECK(sp[b] >= 0 && sp[b] < cache_k.size(0), "slot outside the cache");
  }

  auto qkv = linear(rmsnorm(x, attn_norm, eps), wqkv, wqkv_s).contiguous();  // [B, qdim + 2 kvdim]
  float* qkvp = qkv.data_ptr<float>();
  float* kc = cache_k.data_ptr<float>();
  float* vc = cache_v.data_ptr<float>();
  const int64_t row = qdim + 2 * kvdim;
  for (int64_t b = 0; b < B; ++b) {
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

  auto att = torch::empty({B, qdim}, x.options());  // [B, H * hd]
  float* ap = att.data_ptr<float>();
  const float scale = 1.0f / std::sqrt(float(hd));
  parallel_for(B * Hkv, 1, [&](int64_t i0, int64_t i1) {
    std::vector<float> p;
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t b = i / Hkv, g = i % Hkv, L = pp[b] + 1;
      const float* K = kc + (sp[b] * Hkv + g) * S * hd;  // [S, hd] of this row's kv head
      const float* V = vc + (sp[b] * Hkv + g) * S * hd;
      p.resize(L);
      for (int64_t r = 0; r < group; ++r) {  // the query heads sharing kv head g
        const int64_t h = g * group + r;
        const float* q = qkvp + b * row + h * hd;
        float mx = -INFINITY;
        for (int64_t t = 0; t < L; ++t) mx = std::max(mx, p[t] = dot(q, K + t * hd, hd) * scale);
        float sum = 0;
        for (int64_t t = 0; t < L; ++t) sum += (p[t] = std::exp(p[t] - mx));
        float* o = ap + b * qdim + h * hd;
        std::fill_n(o, hd, 0.0f);
        for (int64_t t = 0; t < L; ++t) {
          const float w = p[t] / sum;
          const float* v = V + t * hd;
          for (int64_t d = 0; d < hd; ++d) o[d] += w * v[d];
        }
      }
    }
  });

  auto h = linear(att, wo, wo_s);  // [B, D], then the residual
  add_into(h, x);
  auto gu = linear(rmsnorm(h, ffn_norm, eps), w13, w13_s).contiguous();  // [B, 2F]: gate | up
  const int64_t F = gu.size(1) / 2;
  auto act = torch::empty({B, F}, x.options());
  const float* gp = gu.data_ptr<float>();
  float* actp = act.data_ptr<float>();
  for (int64_t b = 0; b < B; ++b)
    for (int64_t j = 0; j < F; ++j) {
      const float gate = gp[b * 2 * F + j];
      actp[b * F + j] = gate / (1.0f + std::exp(-gate)) * gp[b * 2 * F + F + j];
    }
  add_into(h, linear(act, w2, w2_s));
  return h;
}
