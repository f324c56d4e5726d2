// Greedy choices of a decode step: the index of each row's largest logit, rows split over the kernels' pool.
// torch's argmax runs on one thread in the step (its OpenMP workers would spin on the pool's cores), and at
// 16 rows of a 49152-token vocabulary that was a few percent of the step.
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <limits>

#include "kernels.h"
#include "parallel.h"

namespace {

// the first index of the largest of x[0:V]; a NaN counts as larger than any number (torch.argmax's rule)
int64_t argmax_row(const float* x, int64_t V) {
  __m256 top = _mm256_set1_ps(-std::numeric_limits<float>::infinity());
  __m256 unordered = _mm256_setzero_ps();  // lanes that met a NaN
  int64_t i = 0;
  for (; i + 8 <= V; i += 8) {
    const __m256 v = _mm256_loadu_ps(x + i);
    top = _mm256_max_ps(top, v);
    unordered = _mm256_or_ps(unordered, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
  }
  float lanes[8];
  _mm256_storeu_ps(lanes, top);
  float best = *std::max_element(lanes, lanes + 8);
  bool nan = _mm256_movemask_ps(unordered) != 0;
  for (int64_t j = i; j < V; ++j) {
    if (std::isnan(x[j])) nan = true;
    else best = std::max(best, x[j]);
  }
  if (nan) return std::find_if(x, x + V, [](float v) { return std::isnan(v); }) - x;
  const __m256 target = _mm256_set1_ps(best);
  for (i = 0; i + 8 <= V; i += 8)
    if (const int hit = _mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(x + i), target, _CMP_EQ_OQ)))
      return i + __builtin_ctz(hit);
  return std::find(x + i, x + V, best) - x;
}

}  // namespace

at::Tensor argmax_rows(const at::Tensor& x) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous() && x.size(1) > 0,
              "argmax_rows: contiguous float32 [B, V] with V > 0");
  const int64_t B = x.size(0), V = x.size(1);
  auto out = at::empty({B}, x.options().dtype(at::kLong));
  const float* xp = x.data_ptr<float>();
  int64_t* op = out.data_ptr<int64_t>();
  parallel_for(B, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) op[b] = argmax_row(xp + b * V, V);
  });
  return out;
}
