// Matmuls of quantised weights with int8 activations, on CPUs with AVX-512 VNNI.
//
// The weight-only kernels (qlinear.cpp) widen every quantised weight to float32 and multiply in float32:
// the widening and the float FMAs (16 multiply-adds each) bound them, decoding one row as much as sixteen.
// Here each row of x is quantised to int8 in groups of 32 as ggml does for the same weights (its Q8_1:
// d = max|x| / 127, q = round(x / d)) and VPDPBUSD multiplies 64 pairs of weight code and activation byte
// per instruction, summed exactly in int32:
//
//   y[m, n] = sum_g  s[n, g] d[m, g] sum_{k in g} u[n, k] q[m, k]  +  z[n, g] d[m, g] sum_{k in g} q[m, k]
//
// with the weights as unsigned codes u and a scale s and min z per group of 32 (VPDPBUSD multiplies unsigned
// by signed bytes): int4 (Q4_1) as it is; int8s in groups of 32 (Q8_0 ...) and int8 (one scale per row) with
// u = q + 128 and z = -128 s. The only error beyond float rounding is x's rounding to int8, at most d / 2
// per value, the error llama.cpp's CPU kernels make with these weights.
//
// Weights go in blocks of 16 rows, repacked per call into lanes (4 codes of each row per 32-bit lane, one
// register per 4 k): one VPDPBUSD then advances 16 outputs of a row of x with no horizontal sums, every row
// of x in the call reuses the block, and every row gets the same arithmetic whatever M is (a request's
// tokens do not depend on what it is batched with).
#include <immintrin.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cstring>
#include <optional>
#include <type_traits>
#include <vector>

#include "kernels.h"
#include "parallel.h"

#define Q8_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni,fma,f16c")))

namespace {

constexpr int64_t NL = 16;  // weight rows per block: the int32 lanes of a 512-bit register
constexpr int64_t QK = 32;  // activations per scale, weights per group
constexpr int64_t TM = 4;   // rows of x per tile

// x [M, K] quantised in groups of 32: codes q, scale d = max|x| / 127, and d * sum(q) (for the mins)
struct Q8Rows {
  std::vector<int8_t> q;       // [M, K]
  std::vector<float> d, dsum;  // [M, K/32]
};

Q8_TARGET void quantize_rows(const float* x, int64_t M, int64_t K, Q8Rows& out) {
  const int64_t groups = M * (K / QK);  // K % 32 == 0: the groups of all rows follow one another
  out.q.resize(M * K), out.d.resize(groups), out.dsum.resize(groups);
  for (int64_t i = 0; i < groups; ++i) {
    const __m512 a = _mm512_loadu_ps(x + i * QK), b = _mm512_loadu_ps(x + i * QK + 16);
    const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(a), _mm512_abs_ps(b)));
    const __m512 inv = _mm512_set1_ps(amax > 0 ? 127.0f / amax : 0.0f);
    // rounded to nearest (even), the default mode
    const __m512i qa = _mm512_cvtps_epi32(_mm512_mul_ps(a, inv)), qb = _mm512_cvtps_epi32(_mm512_mul_ps(b, inv));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out.q.data() + i * QK), _mm512_cvtepi32_epi8(qa));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out.q.data() + i * QK + 16), _mm512_cvtepi32_epi8(qb));
    out.d[i] = amax / 127.0f;
    out.dsum[i] = out.d[i] * float(_mm512_reduce_add_epi32(_mm512_add_epi32(qa, qb)));
  }
}

// The 16 bytes at each of 16 rows as 4 registers: dword d of row j in lane j of t[d] (only the dwords in
// `dwords` read, the others zero).
Q8_TARGET inline void transpose16x4(const void* const rows[NL], __m512i t[4], __mmask8 dwords = 0xF) {
  // per 4 rows: 128-bit lane c holds row c's dwords; permuted, lane d holds dword d of the 4 rows
  const __m512i idx = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
  __m512i z[4];
  for (int i = 0; i < 4; ++i) {
    __m512i v = _mm512_castsi128_si512(_mm_maskz_loadu_epi32(dwords, rows[4 * i]));
    for (int c = 1; c < 4; ++c) v = _mm512_inserti32x4(v, _mm_maskz_loadu_epi32(dwords, rows[4 * i + c]), c);
    z[i] = _mm512_permutexvar_epi32(idx, v);
  }
  // t[d] = lane d of z[0..3]
  const __m512i a = _mm512_shuffle_i32x4(z[0], z[1], 0x44), b = _mm512_shuffle_i32x4(z[0], z[1], 0xEE);
  const __m512i c = _mm512_shuffle_i32x4(z[2], z[3], 0x44), e = _mm512_shuffle_i32x4(z[2], z[3], 0xEE);
  t[0] = _mm512_shuffle_i32x4(a, c, 0x88), t[1] = _mm512_shuffle_i32x4(a, c, 0xDD);
  t[2] = _mm512_shuffle_i32x4(b, e, 0x88), t[3] = _mm512_shuffle_i32x4(b, e, 0xDD);
}

// 16 weight rows repacked: register 8 g + i of codes holds, in lane j, the codes k = 32 g + 4 i .. + 3 of row n0 + j
// (zeros past the last row); s, z [G, 16] their groups' scales and mins
struct Block {
  std::vector<uint32_t> codes;  // [G * 8, 16]
  std::vector<float> s, z;
  std::vector<float> wide;  // float16 scales of the block's rows as float32 [16, G] (int8s)
};


// Columns c .. c + 3 (fewer at the end of a row) of 16 rows of float32 values, row j at p + j * stride (rows
// past `valid` read as zeros), into out[i][16] for column c + i: a block's scales, one register per group.
Q8_TARGET inline void columns4(const float* p, int64_t stride, int64_t valid, int64_t c, int64_t cols,
                               float* const out[4]) {
  static const float zeros[4] = {};
  const void* rows[NL];
  for (int64_t j = 0; j < NL; ++j) rows[j] = j < valid ? p + j * stride + c : zeros;
  const int64_t n = std::min<int64_t>(4, cols - c);
  __m512i t[4];
  transpose16x4(rows, t, __mmask8((1u << n) - 1));
  for (int64_t i = 0; i < n; ++i) _mm512_storeu_ps(out[i], _mm512_castsi512_ps(t[i]));
}

// The layouts, each: rows(n0, g, ptrs) points at 16 rows' bytes of group g; repack_group turns them into
// codes; block_scales(n0, valid, b) puts the block's scales and mins into b.s and b.z.
struct Int4Q8 {  // 16 bytes per group of 32: byte i holds k = i (low nibble) and k = i + 16 (high)
  const uint8_t* w;  // [N, K/2]
  const float* sz;   // [N, K/32, 2]
  int64_t K;
  Q8_TARGET void repack_group(const void* const rows[NL], int64_t, uint32_t* out) const {
    __m512i t[4];
    transpose16x4(rows, t);
    const __m512i low = _mm512_set1_epi8(0x0F);
    for (int d = 0; d < 4; ++d) {
      _mm512_storeu_si512(out + d * NL, _mm512_and_si512(t[d], low));
      _mm512_storeu_si512(out + (4 + d) * NL, _mm512_and_si512(_mm512_srli_epi16(t[d], 4), low));
    }
  }
  const uint8_t* row(int64_t n, int64_t g) const { return w + n * (K / 2) + g * 16; }
  static constexpr int halves = 1;  // 16-byte pieces per group
  Q8_TARGET void block_scales(int64_t n0, int64_t valid, Block& b) const {
    const int64_t G = K / QK;
    for (int64_t g = 0; g < G; g += 2) {  // (scale, min) of 2 groups per 4 columns
      float* const out[4] = {&b.s[g * NL], &b.z[g * NL], &b.s[(g + 1) * NL], &b.z[(g + 1) * NL]};
      columns4(sz + n0 * G * 2, G * 2, valid, g * 2, G * 2, out);
    }
  }
  int64_t row_bytes() const { return K / 2; }
  const void* scales_at(int64_t n) const { return sz + n * (K / QK) * 2; }
  int64_t scale_bytes() const { return K / QK * 8; }  // per row
};

// int8 codes, signed: u = q + 128 (the sign bit flipped), z = -128 s. PerRow: one scale per row (int8),
// else one per group of 32 (int8s), S float32 or float16.
template <class S, bool PerRow>
struct Int8Q8 {
  const int8_t* w;  // [N, K]
  const S* sc;      // [N] or [N, K/32]
  int64_t K;
  Q8_TARGET void repack_group(const void* const rows[NL], int64_t half, uint32_t* out) const {
    __m512i t[4];
    transpose16x4(rows, t);
    for (int d = 0; d < 4; ++d)
      _mm512_storeu_si512(out + (4 * half + d) * NL, _mm512_xor_si512(t[d], _mm512_set1_epi8(char(0x80))));
  }
  const uint8_t* row(int64_t n, int64_t g) const { return reinterpret_cast<const uint8_t*>(w + n * K + g * QK); }
  static constexpr int halves = 2;
  Q8_TARGET void block_scales(int64_t n0, int64_t valid, Block& b) const {
    const int64_t G = K / QK;
    if constexpr (PerRow) {
      const __m512 s = _mm512_maskz_loadu_ps(__mmask16((1u << valid) - 1), sc + n0);
      for (int64_t g = 0; g < G; ++g) _mm512_storeu_ps(&b.s[g * NL], s);
    } else {
      const float* rows = reinterpret_cast<const float*>(sc + n0 * G);
      if constexpr (std::is_same_v<S, uint16_t>) {  // float16: the block's rows widened first, 16 at a time
        b.wide.resize(NL * G);
        for (int64_t i = 0; i < valid * G; i += 16) {
          const __mmask16 keep = valid * G - i >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (valid * G - i)) - 1);
          _mm512_mask_storeu_ps(b.wide.data() + i, keep, _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(keep, sc + n0 * G + i)));
        }
        rows = b.wide.data();
      }
      for (int64_t g = 0; g < G; g += 4) {
        float* const out[4] = {&b.s[g * NL], &b.s[(g + 1) * NL], &b.s[(g + 2) * NL], &b.s[(g + 3) * NL]};
        columns4(rows, G, valid, g, G, out);
      }
    }
    for (int64_t i = 0; i < G * NL; i += 16)  // z = -128 s
      _mm512_storeu_ps(&b.z[i], _mm512_mul_ps(_mm512_loadu_ps(&b.s[i]), _mm512_set1_ps(-128.0f)));
  }
  int64_t row_bytes() const { return K; }
  const void* scales_at(int64_t n) const { return sc + (PerRow ? n : n * (K / QK)); }
  int64_t scale_bytes() const { return PerRow ? sizeof(S) : K / QK * sizeof(S); }
};

// rows n0 .. n0 + 15 of w (those below N) into b, pulling the next block's codes and scales into cache as it
// goes (without, streaming a row's weights for one row of x ran at half the speed)
template <class W>
Q8_TARGET void repack(const W& w, int64_t n0, int64_t N, Block& b, bool next) {
  static const uint8_t zeros[QK] = {};
  const int64_t G = w.K / QK, valid = std::min(NL, N - n0), block_bytes = NL * w.row_bytes();
  const char* next_codes = next ? reinterpret_cast<const char*>(w.row(n0 + NL, 0)) : nullptr;
  const char* next_scales = next ? static_cast<const char*>(w.scales_at(n0 + NL)) : nullptr;
  // lines of each to pull per group: no divisions in the loop (at 4 per group they cost as much as the rest)
  const int64_t code_lines = (block_bytes / 64 + G - 1) / G, scale_lines = (NL * w.scale_bytes() / 64 + G - 1) / G;
  b.codes.resize(G * 8 * NL), b.s.resize((G + 3) * NL), b.z.resize((G + 3) * NL);  // + 3: columns4's last 4
  w.block_scales(n0, valid, b);
  for (int64_t g = 0; g < G; ++g) {
    if (next) {  // this group's share of the next block
      for (int64_t l = g * code_lines; l < (g + 1) * code_lines; ++l) _mm_prefetch(next_codes + l * 64, _MM_HINT_T0);
      for (int64_t l = g * scale_lines; l < (g + 1) * scale_lines; ++l) _mm_prefetch(next_scales + l * 64, _MM_HINT_T0);
    }
    for (int half = 0; half < W::halves; ++half) {
      const void* rows[NL];
      for (int64_t j = 0; j < NL; ++j) rows[j] = j < valid ? w.row(n0 + j, g) + 16 * half : zeros;
      w.repack_group(rows, half, b.codes.data() + g * 8 * NL);
    }
  }
}

// y[m + r, n0 + j] for r < R, j < valid: the block against R rows of x. Every tile does the same float
// operations per output whatever R is, so a row's result does not depend on the rows beside it.
template <int R>
Q8_TARGET void tile(const Q8Rows& x, int64_t K, int64_t m, const Block& b, float* y, int64_t N, int64_t n0,
                    int64_t valid) {
  const int64_t G = K / QK;
  __m512 scaled[R], mins[R];  // the two terms of y, in separate chains of FMAs (their latency bound one row)
  for (int r = 0; r < R; ++r) scaled[r] = mins[r] = _mm512_setzero_ps();
  for (int64_t g = 0; g < G; ++g) {
    __m512i dot[R][2];  // sum_{k in g} u[n, k] q[m + r, k], exactly, over even and odd steps of 4 k
    for (int r = 0; r < R; ++r) dot[r][0] = dot[r][1] = _mm512_setzero_si512();
    const int8_t* xg = x.q.data() + m * K + g * QK;
    for (int i = 0; i < 8; ++i) {
      const __m512i wv = _mm512_loadu_si512(b.codes.data() + (g * 8 + i) * NL);
      for (int r = 0; r < R; ++r) {
        int32_t four;  // x's codes k = 32 g + 4 i .. + 3 of row m + r, in every lane
        std::memcpy(&four, xg + r * K + 4 * i, 4);
        dot[r][i & 1] = _mm512_dpbusd_epi32(dot[r][i & 1], wv, _mm512_set1_epi32(four));
      }
    }
    const __m512 s = _mm512_loadu_ps(b.s.data() + g * NL), z = _mm512_loadu_ps(b.z.data() + g * NL);
    for (int r = 0; r < R; ++r) {
      const int64_t i = (m + r) * G + g;
      const __m512 sum = _mm512_cvtepi32_ps(_mm512_add_epi32(dot[r][0], dot[r][1]));
      scaled[r] = _mm512_fmadd_ps(sum, _mm512_mul_ps(s, _mm512_set1_ps(x.d[i])), scaled[r]);
      mins[r] = _mm512_fmadd_ps(z, _mm512_set1_ps(x.dsum[i]), mins[r]);
    }
  }
  const __mmask16 keep = valid == NL ? __mmask16(0xFFFF) : __mmask16((1u << valid) - 1);
  for (int r = 0; r < R; ++r) _mm512_mask_storeu_ps(y + (m + r) * N + n0, keep, _mm512_add_ps(scaled[r], mins[r]));
}

template <class W>
Q8_TARGET at::Tensor run_q8(const W& w, const at::Tensor& x, int64_t N, int64_t tiles_max_m) {
  const int64_t M = x.size(0), K = x.size(1), blocks = (N + NL - 1) / NL;
  auto y = at::empty({M, N}, x.options());
  if (M == 0) return y;
  Q8Rows xq;
  quantize_rows(x.data_ptr<float>(), M, K, xq);
  float* yp = y.data_ptr<float>();
  auto part = [&](int64_t b0, int64_t b1) {
    Block b;
    for (int64_t blk = b0; blk < b1; ++blk) {
      const int64_t n0 = blk * NL;
      repack(w, n0, N, b, blk + 1 < b1);
      const int64_t valid = std::min(NL, N - n0);
      int64_t m = 0;
      for (; m + TM <= M; m += TM) tile<TM>(xq, K, m, b, yp, N, n0, valid);
      switch (M - m) {
        case 3: tile<3>(xq, K, m, b, yp, N, n0, valid); break;
        case 2: tile<2>(xq, K, m, b, yp, N, n0, valid); break;
        case 1: tile<1>(xq, K, m, b, yp, N, n0, valid); break;
      }
    }
  };
  // many rows (prefill) outside the fused step: torch's threads, as for its GEMM (kernels.h)
  if (M > tiles_max_m) at::parallel_for(0, blocks, 4, part);
  else parallel_for(blocks, 4, part);
  return y;
}

std::atomic<bool> int8_activations{__builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("avx512bw") &&
                                   __builtin_cpu_supports("avx512vl")};

}  // namespace

bool use_int8_activations(bool on) {
  int8_activations = on && __builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("avx512bw") &&
                     __builtin_cpu_supports("avx512vl");
  return int8_activations.load();
}

std::optional<at::Tensor> q8_linear(const at::Tensor& x, const at::Tensor& w, const at::Tensor& s,
                                    int64_t tiles_max_m) {
  const int64_t K = x.size(1), N = w.size(0);
  if (!int8_activations.load(std::memory_order_relaxed) || K % QK != 0) return std::nullopt;
  if (w.scalar_type() == at::kByte && s.dim() == 3 && s.scalar_type() == at::kFloat)  // int4
    return run_q8(Int4Q8{w.data_ptr<uint8_t>(), s.data_ptr<float>(), K}, x, N, tiles_max_m);
  if (w.scalar_type() != at::kChar) return std::nullopt;
  const int8_t* q = w.data_ptr<int8_t>();
  if (s.dim() == 1 && s.scalar_type() == at::kFloat)  // int8: a scale per row
    return run_q8(Int8Q8<float, true>{q, s.data_ptr<float>(), K}, x, N, tiles_max_m);
  if (s.dim() == 2 && s.size(1) == K / QK) {  // int8s in groups of 32
    if (s.scalar_type() == at::kHalf)
      return run_q8(Int8Q8<uint16_t, false>{q, reinterpret_cast<const uint16_t*>(s.data_ptr<at::Half>()), K}, x, N,
                    tiles_max_m);
    if (s.scalar_type() == at::kFloat) return run_q8(Int8Q8<float, false>{q, s.data_ptr<float>(), K}, x, N, tiles_max_m);
  }
  return std::nullopt;  // int8g, int8s in groups of 16: the weight-only kernels
}
