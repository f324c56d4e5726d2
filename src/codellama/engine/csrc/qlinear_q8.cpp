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
// with the weights as unsigned codes u and a scale s and min z per group of 32 or 16 (VPDPBUSD multiplies
// unsigned by signed bytes): int4 (Q4_1) as it is; the int8 layouts (int8: a scale per row; int8s: per 32 or
// 16, Q8_0, Q6_K ...; int8g: a scale and a min per 16) with u = q + 128, the offset taken back in int32
// (sum u q - 128 sum q is exactly sum q_w q), so that only int8g has a min term. The only error beyond float
// rounding is x's rounding to int8, at most d / 2 per value, the error llama.cpp's CPU kernels make with
// these weights.
//
// Weights go in blocks of 16 rows laid out in lanes (4 codes of each row per 32-bit lane, one register per
// 4 k): one VPDPBUSD then advances 16 outputs of a row of x with no horizontal sums, every row of x in the
// call reuses the block (from 4 rows on, two blocks at a time share each broadcast of x), and every row gets
// the same arithmetic whatever M is (a request's tokens do not depend on what it is batched with). A layer
// packed at load (PackedBlock) is read as it is; one in its stored layout is repacked block by block at
// each call (Block, repack).
#include <immintrin.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cstring>
#include <memory>
#include <optional>
#include <type_traits>
#include <vector>

#include "kernels.h"
#include "parallel.h"

// The kernels are built for AVX2 (kernels.py): these functions for AVX-512 with VNNI, called only where the
// CPU has it (vnni_cpu)
#define Q8_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni,fma,f16c")))

namespace {

constexpr int64_t NL = 16;  // weight rows per block: the int32 lanes of a 512-bit register
constexpr int64_t QK = 32;  // activations per scale, weights per group
constexpr int64_t TM = 4;   // rows of x per tile

// x [M, K] quantised in groups of 32: codes q, scale d = max|x| / 127, d * sum(q) over the group and over
// each half of it (for the mins of weights in groups of 32 and of 16), and for int8 codes (`offsets`)
// -128 sum(q) likewise
struct Q8Rows {
  // left uninitialised (quantize_groups writes every value): zeroing them was 2% of a 16-row step, on one thread
  Q8Rows(int64_t M, int64_t K, bool offsets)
      : q(new int8_t[M * K]), d(new float[M * K / QK]), dsum(new float[M * K / QK]), dsum16(new float[M * K / 16]),
        offset(offsets ? new int32_t[M * K / QK] : nullptr), offset16(offsets ? new int32_t[M * K / 16] : nullptr) {}
  std::unique_ptr<int8_t[]> q;       // [M, K]
  std::unique_ptr<float[]> d, dsum;  // [M, K/32]
  std::unique_ptr<float[]> dsum16;   // [M, K/16]
  std::unique_ptr<int32_t[]> offset, offset16;  // [M, K/32], [M, K/16], or none
};

// groups i0 .. i1 - 1 of x (the groups of all rows follow one another: K % 32 == 0) into out, sized for them
Q8_TARGET void quantize_groups(const float* x, int64_t i0, int64_t i1, Q8Rows& out) {
  for (int64_t i = i0; i < i1; ++i) {
    const __m512 a = _mm512_loadu_ps(x + i * QK), b = _mm512_loadu_ps(x + i * QK + 16);
    const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(a), _mm512_abs_ps(b)));
    const __m512 inv = _mm512_set1_ps(amax > 0 ? 127.0f / amax : 0.0f);
    // rounded to nearest (even), the default mode
    const __m512i qa = _mm512_cvtps_epi32(_mm512_mul_ps(a, inv)), qb = _mm512_cvtps_epi32(_mm512_mul_ps(b, inv));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out.q.get() + i * QK), _mm512_cvtepi32_epi8(qa));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out.q.get() + i * QK + 16), _mm512_cvtepi32_epi8(qb));
    const int32_t sa = _mm512_reduce_add_epi32(qa), sb = _mm512_reduce_add_epi32(qb);  // exact
    out.d[i] = amax / 127.0f;
    out.dsum[i] = out.d[i] * float(sa + sb);
    out.dsum16[2 * i] = out.d[i] * float(sa);
    out.dsum16[2 * i + 1] = out.d[i] * float(sb);
    if (out.offset) {
      out.offset[i] = -128 * (sa + sb);
      out.offset16[2 * i] = -128 * sa, out.offset16[2 * i + 1] = -128 * sb;
    }
  }
}

// t[L] = 128-bit lane L of z0, z1, z2, z3, in that order: a 4 x 4 transpose of 128-bit lanes
Q8_TARGET inline void lanes4x4(__m512i z0, __m512i z1, __m512i z2, __m512i z3, __m512i& t0, __m512i& t1, __m512i& t2,
                               __m512i& t3) {
  const __m512i a = _mm512_shuffle_i32x4(z0, z1, 0x44), b = _mm512_shuffle_i32x4(z0, z1, 0xEE);  // lanes 0 1 | 2 3
  const __m512i c = _mm512_shuffle_i32x4(z2, z3, 0x44), e = _mm512_shuffle_i32x4(z2, z3, 0xEE);
  t0 = _mm512_shuffle_i32x4(a, c, 0x88), t1 = _mm512_shuffle_i32x4(a, c, 0xDD);
  t2 = _mm512_shuffle_i32x4(b, e, 0x88), t3 = _mm512_shuffle_i32x4(b, e, 0xDD);
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
  lanes4x4(z[0], z[1], z[2], z[3], t[0], t[1], t[2], t[3]);
}

// The 64 bytes at each of 16 rows as 16 registers: dword d of row j in lane j of t[d]. A third fewer
// shuffles per dword than transpose16x4, and a quarter of the loads.
Q8_TARGET inline void transpose16x16(const void* const rows[NL], __m512i t[16]) {
  __m512i a[16], b[16];
  for (int i = 0; i < 8; ++i) {  // a[2 i], a[2 i + 1], per 128-bit lane: dwords 0 1 and 2 3 of rows 2 i, 2 i + 1
    const __m512i x = _mm512_loadu_si512(rows[2 * i]), y = _mm512_loadu_si512(rows[2 * i + 1]);
    a[2 * i] = _mm512_unpacklo_epi32(x, y), a[2 * i + 1] = _mm512_unpackhi_epi32(x, y);
  }
  for (int i = 0; i < 16; i += 4) {  // b[i + c], 128-bit lane L: dword 4 L + c of rows i .. i + 3
    b[i] = _mm512_unpacklo_epi64(a[i], a[i + 2]), b[i + 1] = _mm512_unpackhi_epi64(a[i], a[i + 2]);
    b[i + 2] = _mm512_unpacklo_epi64(a[i + 1], a[i + 3]), b[i + 3] = _mm512_unpackhi_epi64(a[i + 1], a[i + 3]);
  }
  for (int c = 0; c < 4; ++c) lanes4x4(b[c], b[4 + c], b[8 + c], b[12 + c], t[c], t[4 + c], t[8 + c], t[12 + c]);
}

// Columns 0 .. cols - 1 of 16 rows of float32 values (row j at p + j * stride, rows past `valid` read as
// zeros) into dest(c)[0 .. 15], one register per column: a block's scales, 16 columns per transpose.
template <class Dest>
Q8_TARGET inline void columns(const float* p, int64_t stride, int64_t valid, int64_t cols, Dest dest) {
  static const float zeros[16] = {};
  const void* rows[NL];
  int64_t c = 0;
  for (; c + 16 <= cols; c += 16) {
    for (int64_t j = 0; j < NL; ++j) rows[j] = j < valid ? p + j * stride + c : zeros;
    __m512i t[16];
    transpose16x16(rows, t);
    for (int i = 0; i < 16; ++i) _mm512_storeu_ps(dest(c + i), _mm512_castsi512_ps(t[i]));
  }
  for (; c < cols; c += 4) {
    for (int64_t j = 0; j < NL; ++j) rows[j] = j < valid ? p + j * stride + c : zeros;
    const int64_t n = std::min<int64_t>(4, cols - c);
    __m512i t[4];
    transpose16x4(rows, t, __mmask8((1u << n) - 1));
    for (int64_t i = 0; i < n; ++i) _mm512_storeu_ps(dest(c + i), _mm512_castsi512_ps(t[i]));
  }
}

// the scales of a layer's int8 codes: one per row, one per group, or a scale and a min per group
enum class Scales { PerRow, PerGroup, PerGroupWithMin };

// 16 weight rows repacked: register 8 g + i of codes holds, in lane j, the codes k = 32 g + 4 i .. + 3 of row n0 + j
// (zeros past the last row); s, z [K/GW, 16] the scales and mins of their groups of GW weights. OFFSET: the codes
// are int8 ones plus 128; MIN: the weights have mins.
template <bool OFFSET_, bool MIN_>
struct Block {
  static constexpr bool OFFSET = OFFSET_, MIN = MIN_;
  std::vector<uint32_t> codes;  // [G * 8, 16]
  std::vector<float> s, z;
  std::vector<float> wide;  // float16 scales of the block's rows as float32 [16, values per row] (int8s)
  // what tile reads: codes k = 32 g + 4 i .. + 3 of the 16 rows, the scales and mins of weight group gw
  Q8_TARGET __m512i codes_at(int64_t g, int64_t i) const { return _mm512_loadu_si512(codes.data() + (g * 8 + i) * NL); }
  Q8_TARGET __m512 scale(int64_t gw) const { return _mm512_loadu_ps(s.data() + gw * NL); }
  Q8_TARGET __m512 min(int64_t gw) const { return _mm512_loadu_ps(z.data() + gw * NL); }
  template <int64_t GW>
  void pull(int64_t) const {}  // repacked at each call: nothing of the next block to pull ahead
};

// A block of a layer packed at load time (engine/quant.py, pack_for_int8_activations) in the order repack
// puts it in at each call, less the last steps: codes [G, D, 16, 4], the 4-byte pieces d of each group of the
// 16 rows (piece d of row j in lane j), int4 still two codes a byte (D = 4) and int8 as stored (D = 8, their
// sign flipped here); scales [K/GW, 16], or [K/GW, 2, 16] with their mins, float16 widened here (int8: one a
// row, [16]). Unpacking the nibbles or flipping the sign costs a few operations per
// tile, the repacking a transpose per block per call: a step of one row ran 2x as fast, of 16 rows 1.15x
// (BENCHMARKS.md, Decoding on the CPU).
template <bool INT4, class S, Scales KIND>
struct PackedBlock {
  static constexpr bool OFFSET = !INT4, MIN = INT4 || KIND == Scales::PerGroupWithMin;
  const uint8_t* codes;
  const S* sc;
  static constexpr int64_t D = INT4 ? 4 : 8;
  Q8_TARGET __m512i codes_at(int64_t g, int64_t i) const {
    const __m512i v = _mm512_loadu_si512(codes + (g * D + (INT4 ? i % 4 : i)) * 64);
    if constexpr (INT4) {  // byte b of a group's piece d: k = 4 d + b in its low nibble, k = 16 + 4 d + b in its high
      const __m512i low4 = _mm512_set1_epi8(0x0F);
      return i < 4 ? _mm512_and_si512(v, low4) : _mm512_and_si512(_mm512_srli_epi16(v, 4), low4);
    } else {
      return _mm512_xor_si512(v, _mm512_set1_epi8(char(0x80)));  // u = q + 128
    }
  }
  // scale values per group and lane: with mins 2, else 1; per row 0 (one [16] for the block)
  static constexpr int64_t C = INT4 || KIND == Scales::PerGroupWithMin ? 2 : KIND == Scales::PerRow ? 0 : 1;
  Q8_TARGET __m512 scale(int64_t gw) const { return KIND == Scales::PerRow ? load16(sc) : load16(sc + gw * C * NL); }
  Q8_TARGET __m512 min(int64_t gw) const { return load16(sc + gw * C * NL + NL); }  // MIN only
  // group g's codes and scales (GW weights per scale) into L2: prefetcht1 written out, as GCC 12 deleted loops
  // of _mm_prefetch as doing nothing
  template <int64_t GW>
  void pull(int64_t g) const {
    for (int64_t l = 0; l < D; ++l) asm volatile("prefetcht1 %0" : : "m"(codes[(g * D + l) * 64]));
    constexpr int64_t bytes = C * NL * (QK / GW) * int64_t(sizeof(S));  // per group
    if constexpr (bytes > 0) {
      const char* p = reinterpret_cast<const char*>(sc) + g * bytes;
      for (int64_t o = 0; o < bytes; o += 64) asm volatile("prefetcht1 %0" : : "m"(p[o]));
      asm volatile("prefetcht1 %0" : : "m"(p[bytes - 1]));  // the line of the last byte, where p is not aligned
    } else if (g == 0) {
      asm volatile("prefetcht1 %0" : : "m"(*sc));  // one scale a row
    }
  }
  Q8_TARGET static __m512 load16(const S* p) {  // 16 values as float32 (S: float32, or float16's bits)
    if constexpr (std::is_same_v<S, uint16_t>)
      return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
    else
      return _mm512_loadu_ps(p);
  }
};

// the low and high 4 bits of each byte of t, as bytes
Q8_TARGET inline void store_nibbles(__m512i t, uint32_t* low, uint32_t* high) {
  const __m512i mask = _mm512_set1_epi8(0x0F);
  _mm512_storeu_si512(low, _mm512_and_si512(t, mask));
  _mm512_storeu_si512(high, _mm512_and_si512(_mm512_srli_epi16(t, 4), mask));
}

// The layouts, each: row(n, g) points at row n's bytes of group g; repack_wide turns the transposed 64 bytes
// of each of 16 rows (WIDE groups) into codes, repack_group one group's 16-byte pieces (the last groups);
// block_scales(n0, valid, b) puts the block's scales and mins into b.s and b.z.
struct Int4Q8 {  // 16 bytes per group of 32: byte i holds k = i (low nibble) and k = i + 16 (high)
  using Blk = Block<false, true>;
  const uint8_t* w;  // [N, K/2]
  const float* sz;   // [N, K/32, 2]
  int64_t K;
  Q8_TARGET void repack_group(const void* const rows[NL], int64_t, uint32_t* out) const {
    __m512i t[4];
    transpose16x4(rows, t);
    for (int d = 0; d < 4; ++d) store_nibbles(t[d], out + d * NL, out + (4 + d) * NL);
  }
  static constexpr int64_t GW = 32;   // weights per scale
  static constexpr int64_t WIDE = 4;  // groups per 64 bytes of a row
  // t: dwords of 4 groups (transpose16x16)
  Q8_TARGET void repack_wide(const __m512i t[16], uint32_t* out) const {
    for (int q = 0; q < 4; ++q)
      for (int d = 0; d < 4; ++d) store_nibbles(t[4 * q + d], out + (8 * q + d) * NL, out + (8 * q + 4 + d) * NL);
  }
  const uint8_t* row(int64_t n, int64_t g) const { return w + n * (K / 2) + g * 16; }
  static constexpr int halves = 1;  // 16-byte pieces per group
  Q8_TARGET void block_scales(int64_t n0, int64_t valid, Blk& b) const {
    const int64_t G = K / QK;  // columns: scale and min of each group in turn
    columns(sz + n0 * G * 2, G * 2, valid, G * 2, [&](int64_t c) { return &(c & 1 ? b.z : b.s)[(c >> 1) * NL]; });
  }
  int64_t row_bytes() const { return K / 2; }
  const void* scales_at(int64_t n) const { return sz + n * (K / QK) * 2; }
  int64_t scale_bytes() const { return K / QK * 8; }  // per row
};

// int8 codes, signed: u = q + 128 (the sign bit flipped; the tile takes the offset back). Their scales: one
// per row (int8), one per group of GW = 16 or 32 (int8s, S float32 or float16), or a scale and a min per
// group of 16 (int8g).
template <class S, Scales KIND, int64_t GROUP>
struct Int8Q8 {
  const int8_t* w;  // [N, K]
  const S* sc;      // [N], [N, K/GW] or [N, K/GW, 2]
  int64_t K;
  Q8_TARGET void repack_group(const void* const rows[NL], int64_t half, uint32_t* out) const {
    __m512i t[4];
    transpose16x4(rows, t);
    for (int d = 0; d < 4; ++d)
      _mm512_storeu_si512(out + (4 * half + d) * NL, _mm512_xor_si512(t[d], _mm512_set1_epi8(char(0x80))));
  }
  static constexpr int64_t WIDE = 2;
  Q8_TARGET void repack_wide(const __m512i t[16], uint32_t* out) const {
    for (int i = 0; i < 16; ++i)
      _mm512_storeu_si512(out + i * NL, _mm512_xor_si512(t[i], _mm512_set1_epi8(char(0x80))));
  }
  const uint8_t* row(int64_t n, int64_t g) const { return reinterpret_cast<const uint8_t*>(w + n * K + g * QK); }
  static constexpr int halves = 2;
  static constexpr int64_t GW = GROUP;
  static constexpr bool MIN = KIND == Scales::PerGroupWithMin;
  using Blk = Block<true, MIN>;
  // values per row: scales (and mins)
  int64_t values() const { return KIND == Scales::PerRow ? 1 : K / GW * (MIN ? 2 : 1); }
  Q8_TARGET void block_scales(int64_t n0, int64_t valid, Blk& b) const {
    const int64_t G = K / GW, V = values();
    if constexpr (KIND == Scales::PerRow) {
      const __m512 s = _mm512_maskz_loadu_ps(__mmask16((1u << valid) - 1), sc + n0);
      for (int64_t g = 0; g < G; ++g) _mm512_storeu_ps(&b.s[g * NL], s);
    } else {
      const float* rows = reinterpret_cast<const float*>(sc + n0 * V);
      if constexpr (std::is_same_v<S, uint16_t>) {  // float16: the block's rows widened first, 16 at a time
        b.wide.resize(NL * V);
        for (int64_t i = 0; i < valid * V; i += 16) {
          const __mmask16 keep = valid * V - i >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (valid * V - i)) - 1);
          const __m256i half = _mm256_maskz_loadu_epi16(keep, sc + n0 * V + i);
          _mm512_mask_storeu_ps(b.wide.data() + i, keep, _mm512_cvtph_ps(half));
        }
        rows = b.wide.data();
      }
      if constexpr (MIN)  // columns: scale and min of each group in turn
        columns(rows, V, valid, V, [&](int64_t c) { return &(c & 1 ? b.z : b.s)[(c >> 1) * NL]; });
      else
        columns(rows, V, valid, V, [&](int64_t g) { return &b.s[g * NL]; });
    }
  }
  int64_t row_bytes() const { return K; }
  const void* scales_at(int64_t n) const { return sc + n * values(); }
  int64_t scale_bytes() const { return values() * sizeof(S); }
};

// rows n0 .. n0 + 15 of w (those below N) into b, pulling the next block's codes and scales into cache as it
// goes (without, streaming a row's weights for one row of x ran at half the speed)
template <class W>
Q8_TARGET void repack(const W& w, int64_t n0, int64_t N, typename W::Blk& b, bool next) {
  static const uint8_t zeros[64] = {};
  const int64_t G = w.K / QK, valid = std::min(NL, N - n0), block_bytes = NL * w.row_bytes();
  const char* next_codes = next ? reinterpret_cast<const char*>(w.row(n0 + NL, 0)) : nullptr;
  const char* next_scales = next ? static_cast<const char*>(w.scales_at(n0 + NL)) : nullptr;
  // lines of each to pull per group: no divisions in the loop (at 4 per group they cost as much as the rest)
  const int64_t code_lines = (block_bytes / 64 + G - 1) / G, scale_lines = (NL * w.scale_bytes() / 64 + G - 1) / G;
  b.codes.resize(G * 8 * NL), b.s.resize(w.K / W::GW * NL);
  if constexpr (W::Blk::MIN) b.z.resize(w.K / W::GW * NL);
  w.block_scales(n0, valid, b);
  const void* rows[NL];
  for (int64_t g = 0; g < G;) {
    const int64_t step = g + W::WIDE <= G ? W::WIDE : 1;  // 64 bytes of each row at once, then group by group
    if (next) {  // these groups' share of the next block
      for (int64_t l = g * code_lines; l < (g + step) * code_lines; ++l) _mm_prefetch(next_codes + l * 64, _MM_HINT_T0);
      for (int64_t l = g * scale_lines; l < (g + step) * scale_lines; ++l)
        _mm_prefetch(next_scales + l * 64, _MM_HINT_T0);
    }
    if (step > 1) {
      for (int64_t j = 0; j < NL; ++j) rows[j] = j < valid ? w.row(n0 + j, g) : zeros;
      __m512i t[16];
      transpose16x16(rows, t);
      w.repack_wide(t, b.codes.data() + g * 8 * NL);
    } else {
      for (int half = 0; half < W::halves; ++half) {
        for (int64_t j = 0; j < NL; ++j) rows[j] = j < valid ? w.row(n0 + j, g) + 16 * half : zeros;
        w.repack_group(rows, half, b.codes.data() + g * 8 * NL);
      }
    }
    g += step;
  }
}

// y[m + r, n0 + j] for r < R and the rows j of NB blocks (1 or 2; `valid` rows in the last): the blocks
// against R rows of x, their weights in groups of GW = 32 or 16. Two blocks share each broadcast of x's
// codes, which then feeds two VPDPBUSD instead of one (BENCHMARKS.md, Serving). Every output
// gets the same float operations whatever R and NB are, so a row's result does not depend on the rows
// beside it.
// PULL: each group also pulls its counterpart in the NB blocks at `next` into L2 (tiles), and a step of
// `side` where there is one.
template <int R, int NB, int64_t GW, class B, bool PULL>
Q8_TARGET void tile(const Q8Rows& x, int64_t K, int64_t m, const B* b, float* y, int64_t N, int64_t n0,
                    int64_t valid, const B* next, PullLines* side = nullptr) {
  constexpr int64_t P = QK / GW, STEPS = 8 / P;  // weight groups per group of x; steps of 4 k per weight group
  // integer sums per output register: enough independent chains to hide VPDPBUSD's latency (they are exact:
  // the same y however they are split)
  constexpr int CH = R * NB >= 6 ? 1 : 2;
  const int64_t G = K / QK;
  // -128 sum(q) over each weight group of x's rows: the int32 sums start from it where the codes are offset
  const int32_t* offset = P == 1 ? x.offset.get() : x.offset16.get();
  __m512 scaled[R][NB], mins[R][NB];  // the two terms of y, in separate chains of FMAs (latency: one row)
  for (int r = 0; r < R; ++r)
    for (int k = 0; k < NB; ++k) scaled[r][k] = mins[r][k] = _mm512_setzero_ps();
  for (int64_t g = 0; g < G; ++g) {
    if constexpr (PULL) {
      for (int k = 0; k < NB; ++k) next[k].template pull<GW>(g);
      if (side != nullptr) side->step();
    }
    const int8_t* xg = x.q.get() + m * K + g * QK;
    for (int64_t p = 0; p < P; ++p) {
      __m512i dot[R][NB][CH];  // sum_{k in the weight group} u[n, k] q[m + r, k] (less the offset), exactly
      for (int r = 0; r < R; ++r) {
        const __m512i start =
            B::OFFSET ? _mm512_set1_epi32(offset[((m + r) * G + g) * P + p]) : _mm512_setzero_si512();
        for (int k = 0; k < NB; ++k)
          for (int c = 0; c < CH; ++c) dot[r][k][c] = c == 0 ? start : _mm512_setzero_si512();
      }
      for (int64_t i = p * STEPS; i < (p + 1) * STEPS; ++i) {
        __m512i wv[NB];
        for (int k = 0; k < NB; ++k) wv[k] = b[k].codes_at(g, i);
        for (int r = 0; r < R; ++r) {
          int32_t four;  // x's codes k = 32 g + 4 i .. + 3 of row m + r, in every lane
          std::memcpy(&four, xg + r * K + 4 * i, 4);
          const __m512i xv = _mm512_set1_epi32(four);
          for (int k = 0; k < NB; ++k) dot[r][k][i % CH] = _mm512_dpbusd_epi32(dot[r][k][i % CH], wv[k], xv);
        }
      }
      const int64_t gw = g * P + p;
      for (int k = 0; k < NB; ++k) {
        const __m512 s = b[k].scale(gw), z = B::MIN ? b[k].min(gw) : _mm512_setzero_ps();
        for (int r = 0; r < R; ++r) {
          const int64_t i = (m + r) * G + g;
          const float dsum = P == 1 ? x.dsum[i] : x.dsum16[i * 2 + p];
          __m512i sum = dot[r][k][0];
          for (int c = 1; c < CH; ++c) sum = _mm512_add_epi32(sum, dot[r][k][c]);
          scaled[r][k] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sum), _mm512_mul_ps(s, _mm512_set1_ps(x.d[i])),
                                         scaled[r][k]);
          if constexpr (B::MIN) mins[r][k] = _mm512_fmadd_ps(z, _mm512_set1_ps(dsum), mins[r][k]);
        }
      }
    }
  }
  const __mmask16 keep = valid == NL ? __mmask16(0xFFFF) : __mmask16((1u << valid) - 1);
  for (int r = 0; r < R; ++r)
    for (int k = 0; k < NB; ++k)
      _mm512_mask_storeu_ps(y + (m + r) * N + n0 + k * NL, k == NB - 1 ? keep : __mmask16(0xFFFF),
                            B::MIN ? _mm512_add_ps(scaled[r][k], mins[r][k]) : scaled[r][k]);
}

// Every row of x against NB blocks, TM rows at a time. From 4 rows on (pairs of packed blocks), the first
// tile pulls the next pair `next` into L2 on the way, group by group: the hardware's prefetchers left the
// tiles waiting on memory at the start of each pair (a 16-row step of SmolLM2 took 15.4 ms without, 13.8
// with the pulling shared out among all the tiles; into L1 instead of L2, 4 rows were slower). In the first
// tile only, and compiled into it alone (PULL): compiled into every tile, the pulling made even a tile
// that pulled nothing ~11% slower (a standalone harness, one thread, 16 x 3072 x 576 with the weights in
// cache: 201 against 181 us); a 16-row step went from 13.7 to 12.8 ms (BENCHMARKS.md). That tile also pulls
// its thread's share of `side`.
template <int NB, int64_t GW, class B>
Q8_TARGET void tiles(const Q8Rows& x, int64_t M, int64_t K, const B* b, float* y, int64_t N, int64_t n0,
                     int64_t valid, const B* next = nullptr, PullLines* side = nullptr) {
  static_assert(TM == 4 && PAIR_MIN_M >= TM, "a pair's first tile has TM rows");
  int64_t m = 0;
  if (next != nullptr) {
    tile<TM, NB, GW, B, true>(x, K, 0, b, y, N, n0, valid, next, side);
    m = TM;
  }
  for (; m + TM <= M; m += TM) tile<TM, NB, GW, B, false>(x, K, m, b, y, N, n0, valid, next);
  switch (M - m) {
    case 3: tile<3, NB, GW, B, false>(x, K, m, b, y, N, n0, valid, next); break;
    case 2: tile<2, NB, GW, B, false>(x, K, m, b, y, N, n0, valid, next); break;
    case 1: tile<1, NB, GW, B, false>(x, K, m, b, y, N, n0, valid, next); break;
  }
}

// y = x @ w.T for weights in blocks of 16 rows: x rounded to int8 (with the sums int8 codes need where
// `offsets`), then each thread's run of blocks b0 .. b1 - 1 through over_blocks(x's codes, y, b0, b1)
template <class F>
Q8_TARGET at::Tensor run_blocks(const at::Tensor& x, int64_t N, int64_t tiles_max_m, bool offsets, F&& over_blocks) {
  const int64_t M = x.size(0), K = x.size(1), blocks = (N + NL - 1) / NL;
  auto y = at::empty({M, N}, x.options());
  if (M == 0) return y;
  // many rows outside the fused step (the eager model's prefill): torch's threads, as for its GEMM (kernels.h)
  const bool torch_threads = M > tiles_max_m;
  auto split = [torch_threads](int64_t n, int64_t grain, const std::function<void(int64_t, int64_t)>& fn) {
    if (torch_threads) at::parallel_for(0, n, grain, fn);
    else parallel_for(n, grain, fn);
  };
  Q8Rows xq(M, K, offsets);
  const int64_t groups = M * (K / QK);
  const float* xp = x.data_ptr<float>();
  // x's rows on both threads too once there are a few (rows of a batch cost the serial part of a step per row)
  split(groups, 64, [&](int64_t i0, int64_t i1) { quantize_groups(xp, i0, i1, xq); });
  float* yp = y.data_ptr<float>();
  split(blocks, 4, [&](int64_t b0, int64_t b1) { over_blocks(xq, yp, b0, b1); });
  return y;
}

// blocks in pairs for a few rows of x or more (the last alone where the count is odd); one at a time for
// fewer, whose time is in streaming the weights
inline int64_t blocks_at_once(int64_t M) { return M >= PAIR_MIN_M ? 2 : 1; }

// weights in their stored layout, repacked block by block at each call
template <class W>
Q8_TARGET at::Tensor run_q8(const W& w, const at::Tensor& x, int64_t N, int64_t tiles_max_m) {
  const int64_t M = x.size(0), K = x.size(1), pair = blocks_at_once(M);
  return run_blocks(x, N, tiles_max_m, W::Blk::OFFSET, [&](const Q8Rows& xq, float* yp, int64_t b0, int64_t b1) {
    typename W::Blk b[2];
    for (int64_t blk = b0; blk < b1; blk += pair) {
      const int64_t nb = std::min<int64_t>(pair, b1 - blk), n0 = blk * NL;
      // one row's repacking pulls the next block into cache
      for (int64_t k = 0; k < nb; ++k) repack(w, n0 + k * NL, N, b[k], blk + k + 1 < b1);
      const int64_t valid = std::min(NL, N - (n0 + (nb - 1) * NL));  // rows of the last block
      if (nb == 2) tiles<2, W::GW>(xq, M, K, b, yp, N, n0, valid);
      else tiles<1, W::GW>(xq, M, K, b, yp, N, n0, valid);
    }
  });
}

// weights packed at load time (PackedBlock): codes and scales of block b at b * their values per block;
// each thread's pair tiles pull its part of `side` (pool_part), spread over the groups they go through
template <int64_t GW, class P, class S>
Q8_TARGET at::Tensor run_packed(const uint8_t* codes, const S* sc, const at::Tensor& x, int64_t N,
                                int64_t tiles_max_m, SidePull* side) {
  const int64_t M = x.size(0), K = x.size(1), pair = blocks_at_once(M);
  const int64_t code_bytes = K / QK * P::D * 64, scale_values = NL * (P::C == 0 ? 1 : K / GW * P::C);
  return run_blocks(x, N, tiles_max_m, P::OFFSET, [&](const Q8Rows& xq, float* yp, int64_t b0, int64_t b1) {
    const size_t part = size_t(pool_part());
    PullLines* mine = side != nullptr && part < side->size() && pair == 2 ? &(*side)[part] : nullptr;
    if (mine != nullptr) mine->spread(((b1 - b0 + 1) / 2 - 1) * (K / QK));  // pairs with a next, their groups
    for (int64_t blk = b0; blk < b1; blk += pair) {
      const int64_t nb = std::min<int64_t>(pair, b1 - blk);
      const P b[2] = {P{codes + blk * code_bytes, sc + blk * scale_values},
                      P{codes + (blk + nb - 1) * code_bytes, sc + (blk + nb - 1) * scale_values}};
      // the next pair of this thread's blocks (its first block twice where it is the last), where pairs are taken
      const int64_t after0 = blk + nb, after1 = std::min(after0 + 1, b1 - 1);
      const P after[2] = {P{codes + after0 * code_bytes, sc + after0 * scale_values},
                          P{codes + after1 * code_bytes, sc + after1 * scale_values}};
      const P* next = pair == 2 && after0 < b1 ? after : nullptr;
      if (nb == 2) tiles<2, GW>(xq, M, K, b, yp, N, blk * NL, NL, next, mine);
      else tiles<1, GW>(xq, M, K, b, yp, N, blk * NL, NL, next, mine);
    }
  });
}

bool vnni_cpu() {
  return __builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl");
}

// on by default where the CPU can; use_int8_activations switches it (tests, from Python), hence atomic
std::atomic<bool> int8_activations{vnni_cpu()};

}  // namespace

bool use_int8_activations(bool on) {
  int8_activations = on && vnni_cpu();
  return int8_activations.load();
}

bool int8_activations_on() { return int8_activations.load(); }

std::optional<at::Tensor> q8_linear(const at::Tensor& x, const at::Tensor& w, const at::Tensor& s,
                                    int64_t tiles_max_m) {
  const int64_t K = x.size(1), N = w.size(0);
  if (!int8_activations.load(std::memory_order_relaxed) || K % QK != 0) return std::nullopt;
  // shapes the weight-only kernels refuse (with their message) are left to them
  if (s.dim() < 1 || s.size(0) != N || (s.dim() == 3 && s.size(2) != 2)) return std::nullopt;
  if (w.scalar_type() == at::kByte) {  // int4
    if (w.size(1) * 2 != K || s.dim() != 3 || s.size(1) != K / QK || s.scalar_type() != at::kFloat) return std::nullopt;
    return run_q8(Int4Q8{w.data_ptr<uint8_t>(), s.data_ptr<float>(), K}, x, N, tiles_max_m);
  }
  if (w.scalar_type() != at::kChar || w.size(1) != K) return std::nullopt;
  const int8_t* q = w.data_ptr<int8_t>();
  if (s.dim() == 1 && s.scalar_type() == at::kFloat)  // int8: a scale per row
    return run_q8(Int8Q8<float, Scales::PerRow, QK>{q, s.data_ptr<float>(), K}, x, N, tiles_max_m);
  if (s.dim() == 3 && s.size(1) == K / 16 && s.scalar_type() == at::kFloat)  // int8g
    return run_q8(Int8Q8<float, Scales::PerGroupWithMin, 16>{q, s.data_ptr<float>(), K}, x, N, tiles_max_m);
  if (s.dim() != 2 || (s.size(1) != K / QK && s.size(1) != K / 16)) return std::nullopt;
  const bool by32 = s.size(1) == K / QK;  // int8s, in groups of 32 or 16
  if (s.scalar_type() == at::kHalf) {
    const auto* h = reinterpret_cast<const uint16_t*>(s.data_ptr<at::Half>());
    return by32 ? run_q8(Int8Q8<uint16_t, Scales::PerGroup, 32>{q, h, K}, x, N, tiles_max_m)
                : run_q8(Int8Q8<uint16_t, Scales::PerGroup, 16>{q, h, K}, x, N, tiles_max_m);
  }
  if (s.scalar_type() != at::kFloat) return std::nullopt;
  return by32 ? run_q8(Int8Q8<float, Scales::PerGroup, 32>{q, s.data_ptr<float>(), K}, x, N, tiles_max_m)
              : run_q8(Int8Q8<float, Scales::PerGroup, 16>{q, s.data_ptr<float>(), K}, x, N, tiles_max_m);
}

at::Tensor packed_linear(const at::Tensor& x, const at::Tensor& w, const at::Tensor& s, int64_t tiles_max_m,
                         SidePull* side) {
  const int64_t K = x.size(1), N = w.size(0) * NL, G = K / QK;
  const bool int4 = w.scalar_type() == at::kByte;
  TORCH_CHECK(int8_activations.load(std::memory_order_relaxed), "packed weights take int8 activations only");
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous(), "x: contiguous float32 [M, K]");
  TORCH_CHECK(w.dim() == 5 && w.is_contiguous() && s.is_contiguous() && K % QK == 0 && w.size(1) == G &&
                  w.size(2) == (int4 ? 4 : 8) && w.size(3) == NL && w.size(4) == 4 &&
                  (int4 || w.scalar_type() == at::kChar),
              "packed weights: contiguous uint8 [N/16, K/32, 4, 16, 4] (int4) or int8 [N/16, K/32, 8, 16, 4]");
  const auto* codes = reinterpret_cast<const uint8_t*>(w.data_ptr());
  const bool f32 = s.scalar_type() == at::kFloat;
  if (int4) {
    TORCH_CHECK((f32 || s.scalar_type() == at::kHalf) && s.dim() == 4 && s.size(0) * NL == N && s.size(1) == G &&
                    s.size(2) == 2 && s.size(3) == NL,
                "packed int4 scales: float32 or float16 [N/16, K/32, 2, 16]");
    if (!f32)  // a GGUF's Q4_1: its float16 scales and mins as they are, a sixth less to read per weight
      return run_packed<32, PackedBlock<true, uint16_t, Scales::PerGroupWithMin>>(
          codes, reinterpret_cast<const uint16_t*>(s.data_ptr<at::Half>()), x, N, tiles_max_m, side);
    return run_packed<32, PackedBlock<true, float, Scales::PerGroupWithMin>>(codes, s.data_ptr<float>(), x, N,
                                                                              tiles_max_m, side);
  }
  if (s.dim() == 1) {
    TORCH_CHECK(f32 && s.size(0) == N, "packed int8 scales per row: float32 [N]");
    return run_packed<32, PackedBlock<false, float, Scales::PerRow>>(codes, s.data_ptr<float>(), x, N, tiles_max_m,
                                                                      side);
  }
  if (s.dim() == 4) {
    TORCH_CHECK(f32 && s.size(0) * NL == N && s.size(1) == K / 16 && s.size(2) == 2 && s.size(3) == NL,
                "packed int8g scales: float32 [N/16, K/16, 2, 16]");
    return run_packed<16, PackedBlock<false, float, Scales::PerGroupWithMin>>(codes, s.data_ptr<float>(), x, N,
                                                                               tiles_max_m, side);
  }
  TORCH_CHECK(s.dim() == 3 && s.size(0) * NL == N && (s.size(1) == G || s.size(1) == 2 * G) && s.size(2) == NL &&
                  (f32 || s.scalar_type() == at::kHalf),
              "packed int8s scales: float32 or float16 [N/16, K/G, 16], G = 16 or 32");
  const bool by32 = s.size(1) == G;
  if (!f32) {
    const auto* h = reinterpret_cast<const uint16_t*>(s.data_ptr<at::Half>());
    return by32 ? run_packed<32, PackedBlock<false, uint16_t, Scales::PerGroup>>(codes, h, x, N, tiles_max_m, side)
                : run_packed<16, PackedBlock<false, uint16_t, Scales::PerGroup>>(codes, h, x, N, tiles_max_m, side);
  }
  const float* f = s.data_ptr<float>();
  return by32 ? run_packed<32, PackedBlock<false, float, Scales::PerGroup>>(codes, f, x, N, tiles_max_m, side)
              : run_packed<16, PackedBlock<false, float, Scales::PerGroup>>(codes, f, x, N, tiles_max_m, side);
}
