// The CPU kernels of the decode engine, shared by qlinear.cpp (quantised matmuls), decode_layer.cpp (one
// fused decoder layer per call) and module.cpp (the Python bindings).
#pragma once
#include <ATen/ATen.h>

#include <cstdint>
#include <optional>
#include <vector>

#include "parallel.h"

// Up to this many rows of x, linear() multiplies by our tiles on our pool, beyond by a GEMM (the weights widened)
// on torch's threads (with int8 activations, q8_linear: by the tiles on torch's threads). Beside torch's OpenMP
// threads, which spin between ops on the cores our pool wants, past a few dozen rows the tiles lost 3x to the
// GEMM: engine/quant.py passes EAGER_TILES_MAX_M. The fused step (decode_layer), whose other loops run on our
// pool, takes the tiles at any M (FUSED_TILES_MAX_M).
constexpr int64_t TILES_MAX_M = 256;
// With torch's threads taking its matmuls past TILES_MAX_M rows, between its loops on our pool, both pools spun
// on the same cores: a 300-row float32 prefill ran at 501 against 716 tok/s, a 384-token int8 one at 695
// against 1207 (BENCHMARKS.md, time to the first token).
constexpr int64_t FUSED_TILES_MAX_M = INT64_MAX;
// Rows of x from which the int8-activation tiles take two blocks of weights at once (qlinear_q8.cpp)
constexpr int64_t PAIR_MIN_M = 4;

// x [M, K] float32 @ w.T, the kernel picked by w's dtype and s's shape: float32 [N, K] (s unused), int8
// [N, K] with scale s [N], with scale/min s [N, K/16, 2] or with a scale per group of 16 or 32 s [N, K/G]
// (float32 or float16), or packed int4 uint8 [N, K/2] with scale/min s [N, K/32, 2]; scales float32 but where said.
// `side`: memory each thread pulls into L2 on the way, where the weights are packed (packed_linear)
at::Tensor linear(at::Tensor x, at::Tensor w, at::Tensor s, int64_t tiles_max_m = TILES_MAX_M,
                  SidePull* side = nullptr);
// x [M, K] float32 @ w.T with x quantised to int8 in groups of 32 (qlinear_q8.cpp), for every quantised layout
// (K % 32 == 0), where the CPU has AVX-512 VNNI and use_int8_activations is on (the default there); none otherwise
std::optional<at::Tensor> q8_linear(const at::Tensor& x, const at::Tensor& w, const at::Tensor& s,
                                    int64_t tiles_max_m);
// x [M, K] float32 @ w.T for weights packed for q8_linear at load time (engine/quant.py, pack_for_int8_activations):
// codes uint8 [N/16, K/32, 4, 16, 4] (int4) or int8 [N/16, K/32, 8, 16, 4], their scales float32 or float16
// [N/16, K/32, 2, 16] (int4), float32 [N] (int8), float32 [N/16, K/16, 2, 16] (int8g) or float32 or float16
// [N/16, K/G, 16] (int8s); int8 activations only. From 4 rows of x on (pairs of blocks), thread i pulls (*side)[i]
// into L2 on the way (pool_part; none where side is null or has no [i])
at::Tensor packed_linear(const at::Tensor& x, const at::Tensor& w, const at::Tensor& s, int64_t tiles_max_m,
                         SidePull* side = nullptr);
// whether q8_linear runs (it may only where the CPU has AVX-512 VNNI); returns the setting
bool use_int8_activations(bool on);
// the setting use_int8_activations last made (or the default)
bool int8_activations_on();
// x [M, K] float32 @ w [N, K] float32 .T -> [M, N] by oneDNN's float32 GEMM (MKL's without it), for large M
at::Tensor gemm(const at::Tensor& x, const at::Tensor& w);
// whether blocks of rows use 512-bit tiles, and the fused step's attention 512-bit registers (on by default
// where the CPU has AVX-512F); returns the setting
bool use_wide_tiles(bool on);
// the setting use_wide_tiles last made (or the default)
bool wide_tiles_on();
// x [M, K] float32 @ w [N, K] float32 .T -> [M, N], for small M
at::Tensor float_linear(at::Tensor x, at::Tensor w);
// x [M, K] float32 @ (int8 [N, K] * scale [N]).T -> [M, N]
at::Tensor int8_linear(at::Tensor x, at::Tensor w, at::Tensor scale, int64_t tiles_max_m);
// x [M, K] float32 @ (int8 [N, K] * scale + min, per group of 16 [N, K/16, 2]).T -> [M, N]
at::Tensor int8_group_linear(at::Tensor x, at::Tensor w, at::Tensor sz, int64_t tiles_max_m);
// x [M, K] float32 @ (int8 [N, K] * scale, per group of G = 16 or 32 [N, K/G] float32 or float16).T -> [M, N]
at::Tensor int8_scaled_linear(at::Tensor x, at::Tensor w, at::Tensor s, int64_t tiles_max_m);
// x [M, K] float32 @ dequant(uint8 [N, K/2], scale/min [N, K/32, 2]).T -> [M, N]
at::Tensor int4_linear(at::Tensor x, at::Tensor w, at::Tensor sz, int64_t tiles_max_m);

// One Llama decoder layer for rows of new tokens, each at its own (slot, position) (see decode_layer.cpp).
at::Tensor decode_layer(at::Tensor x, at::Tensor slots, at::Tensor pos, at::Tensor cos, at::Tensor sin,
                           at::Tensor attn_norm, at::Tensor wqkv, at::Tensor wqkv_s, at::Tensor wo,
                           at::Tensor wo_s, at::Tensor ffn_norm, at::Tensor w13, at::Tensor w13_s,
                           at::Tensor w2, at::Tensor w2_s, at::Tensor cache_kv, at::Tensor cache_scales,
                           int64_t n_kv_heads, int64_t max_seq_len, int64_t n_heads, double eps);
// The decoder layers of one model for decode_layer, captured once (engine/cpu_decode.py): a step passes only
// its rows, and the loop over the layers runs here
class LayerStack {
 public:
  // per layer: attn_norm, wqkv, wqkv_s, wo, wo_s, ffn_norm, w13, w13_s, w2, w2_s, as decode_layer takes them
  LayerStack(std::vector<std::vector<at::Tensor>> layers, int64_t n_kv_heads, int64_t n_heads, double eps);
  // each layer's cache (cache_kv, cache_scales as decode_layer takes them) of max_seq_len positions; none: let
  // go of the last ones (before the model allocates new ones)
  void bind_caches(std::vector<at::Tensor> kv, std::vector<at::Tensor> scales, int64_t max_seq_len);
  // x [B, D] through every layer (decode_layer's arguments)
  at::Tensor forward(at::Tensor x, const at::Tensor& slots, const at::Tensor& pos, const at::Tensor& cos,
                     const at::Tensor& sin) const;

 private:
  std::vector<std::vector<at::Tensor>> layers_;
  std::vector<at::Tensor> kv_, scales_;
  int64_t n_kv_heads_, n_heads_, max_seq_len_ = 0;
  double eps_;
};

// [B, V] float32 -> int64 [B]: the first index of each row's largest value (a NaN counts as the largest), as
// torch.argmax(-1), the rows on the kernels' threads
at::Tensor argmax_rows(const at::Tensor& x);
