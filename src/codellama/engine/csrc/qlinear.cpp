// Weight-only quantised linear layers for the CPU, for the small M of decoding (batch 1 to a few dozen).
//
//   int8: y[m, n] = scale[n] * sum_k x[m, k] * q[n, k]               q int8 [N, K], per-output-row scale
//   int4: y[m, n] = sum_g sum_{k in g} x[m, k] * (q[n, k] * s[n, g] + z[n, g])
//         q packed two per byte, group size 32: byte j of a group holds k = j (low nibble) and j + 16 (high)
//
// Decoding is bound by reading the weights, so the win is bytes: 1 (or 0.5) instead of 4 per weight. The
// kernels widen 8 weights at a time to float32 and FMA against x, 4 output rows at once so each x load is
// reused, and 2 rows of x at once so each widened weight is reused. AVX2 + FMA; at::parallel_for over
// blocks of output rows.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

namespace {

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

inline __m256 widen8(const int8_t* p) {  // 8 int8 -> 8 float32
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
}

constexpr int64_t NB = 4;  // output rows per block

// rows [n0, n0 + 4) of the int8 weight against rows m (and m + 1 when two) of x
template <int MR>
inline void int8_block(const float* x, int64_t K, const int8_t* w, const float* scale, float* y, int64_t N,
                       int64_t m, int64_t n0) {
  __m256 acc[MR][NB];
  for (int r = 0; r < MR; ++r)
    for (int j = 0; j < NB; ++j) acc[r][j] = _mm256_setzero_ps();
  const int64_t K8 = K & ~int64_t(7);
  for (int64_t k = 0; k < K8; k += 8) {
    __m256 xv[MR];
    for (int r = 0; r < MR; ++r) xv[r] = _mm256_loadu_ps(x + (m + r) * K + k);
    for (int j = 0; j < NB; ++j) {
      __m256 wv = widen8(w + (n0 + j) * K + k);
      for (int r = 0; r < MR; ++r) acc[r][j] = _mm256_fmadd_ps(wv, xv[r], acc[r][j]);
    }
  }
  for (int r = 0; r < MR; ++r)
    for (int j = 0; j < NB; ++j) {
      float s = hsum(acc[r][j]);
      for (int64_t k = K8; k < K; ++k) s += x[(m + r) * K + k] * float(w[(n0 + j) * K + k]);
      y[(m + r) * N + n0 + j] = s * scale[n0 + j];
    }
}

// 32 packed 4-bit weights (16 bytes) of one group -> 4 x 8 float32 in k order, as q * s + z
inline void widen_group4(const uint8_t* p, __m256 s, __m256 z, __m256 out[4]) {
  __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  __m128i lo = _mm_and_si128(b, _mm_set1_epi8(0x0F));                     // k = 0..15
  __m128i hi = _mm_and_si128(_mm_srli_epi16(b, 4), _mm_set1_epi8(0x0F));  // k = 16..31
  out[0] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(lo)), s, z);
  out[1] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(lo, 8))), s, z);
  out[2] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(hi)), s, z);
  out[3] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(hi, 8))), s, z);
}

template <int MR>
inline void int4_block(const float* x, int64_t K, const uint8_t* w, const float* sz, float* y, int64_t N,
                       int64_t m, int64_t n0) {
  // w: [N, K/2] bytes; sz: [N, G, 2] (scale, min) per group of 32
  const int64_t G = K / 32;
  __m256 acc[MR][NB];
  for (int r = 0; r < MR; ++r)
    for (int j = 0; j < NB; ++j) acc[r][j] = _mm256_setzero_ps();
  for (int64_t g = 0; g < G; ++g) {
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

template <typename Block1, typename Block2>
void run_blocks(int64_t M, int64_t N, Block1 one, Block2 two, std::function<void(int64_t, int64_t)> tail) {
  const int64_t full = N / NB;
  at::parallel_for(0, full, 8, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      int64_t m = 0;
      for (; m + 1 < M; m += 2) two(m, b * NB);
      if (m < M) one(m, b * NB);
    }
  });
  for (int64_t n = full * NB; n < N; ++n) tail(n, n + 1);
}

void check(const torch::Tensor& x, const torch::Tensor& w, const torch::Tensor& s) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kFloat32 && x.is_contiguous(), "x: contiguous float32 [M, K]");
  TORCH_CHECK(w.dim() == 2 && w.is_contiguous() && s.is_contiguous() && s.scalar_type() == torch::kFloat32,
              "weights: contiguous [N, *], float32 scales");
}

}  // namespace

torch::Tensor int8_linear(torch::Tensor x, torch::Tensor w, torch::Tensor scale) {
  check(x, w, scale);
  TORCH_CHECK(w.scalar_type() == torch::kInt8 && w.size(1) == x.size(1), "int8 weight [N, K]");
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  auto y = torch::empty({M, N}, x.options());
  const float* xp = x.data_ptr<float>();
  const int8_t* wp = w.data_ptr<int8_t>();
  const float* sp = scale.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  run_blocks(
      M, N, [&](int64_t m, int64_t n0) { int8_block<1>(xp, K, wp, sp, yp, N, m, n0); },
      [&](int64_t m, int64_t n0) { int8_block<2>(xp, K, wp, sp, yp, N, m, n0); },
      [&](int64_t n0, int64_t n1) {
        for (int64_t m = 0; m < M; ++m)
          for (int64_t n = n0; n < n1; ++n) {
            float s = 0;
            for (int64_t k = 0; k < K; ++k) s += xp[m * K + k] * float(wp[n * K + k]);
            yp[m * N + n] = s * sp[n];
          }
      });
  return y;
}

torch::Tensor int4_linear(torch::Tensor x, torch::Tensor w, torch::Tensor sz) {
  check(x, w, sz);
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  TORCH_CHECK(w.scalar_type() == torch::kUInt8 && K % 32 == 0 && w.size(1) == K / 2, "uint8 weight [N, K/2], K % 32 == 0");
  TORCH_CHECK(sz.numel() == N * (K / 32) * 2, "scales [N, K/32, 2]");
  auto y = torch::empty({M, N}, x.options());
  const float* xp = x.data_ptr<float>();
  const uint8_t* wp = w.data_ptr<uint8_t>();
  const float* sp = sz.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const int64_t G = K / 32;
  run_blocks(
      M, N, [&](int64_t m, int64_t n0) { int4_block<1>(xp, K, wp, sp, yp, N, m, n0); },
      [&](int64_t m, int64_t n0) { int4_block<2>(xp, K, wp, sp, yp, N, m, n0); },
      [&](int64_t n0, int64_t n1) {
        for (int64_t m = 0; m < M; ++m)
          for (int64_t n = n0; n < n1; ++n) {
            float s = 0;
            for (int64_t k = 0; k < K; ++k) {
              const int64_t g = k / 32, j = k % 32;
              const uint8_t byte = wp[n * (K / 2) + g * 16 + (j % 16)];
              const int q = j < 16 ? (byte & 0x0F) : (byte >> 4);
              s += xp[m * K + k] * (q * sp[(n * G + g) * 2] + sp[(n * G + g) * 2 + 1]);
            }
            yp[m * N + n] = s;
          }
      });
  return y;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("int8_linear", &int8_linear, "x [M, K] float32 @ (int8 [N, K] * scale [N]).T");
  m.def("int4_linear", &int4_linear, "x [M, K] float32 @ dequant(uint8 [N, K/2], scale/min [N, K/32, 2]).T");
}
