// The CPU kernels of the decode engine, shared by qlinear.cpp (quantised matmuls), decode_layer.cpp (one
// fused decoder layer per call) and module.cpp (the Python bindings).
#pragma once
#include <torch/extension.h>

// x [M, K] float32 @ w.T, the kernel picked by w's dtype: float32 [N, K] (s unused), int8 [N, K] with
// scale s [N], or packed int4 uint8 [N, K/2] with scale/min s [N, K/32, 2]
torch::Tensor linear(torch::Tensor x, torch::Tensor w, torch::Tensor s);
// x [M, K] float32 @ w [N, K] float32 .T -> [M, N], for small M
torch::Tensor float_linear(torch::Tensor x, torch::Tensor w);
// x [M, K] float32 @ (int8 [N, K] * scale [N]).T -> [M, N]
torch::Tensor int8_linear(torch::Tensor x, torch::Tensor w, torch::Tensor scale);
// x [M, K] float32 @ dequant(uint8 [N, K/2], scale/min [N, K/32, 2]).T -> [M, N]
torch::Tensor int4_linear(torch::Tensor x, torch::Tensor w, torch::Tensor sz);

// One Llama decoder layer for rows of new tokens, each at its own (slot, position) (see decode_layer.cpp).
torch::Tensor decode_layer(torch::Tensor x, torch::Tensor slots, torch::Tensor pos, torch::Tensor cos, torch::Tensor sin,
                           torch::Tensor attn_norm, torch::Tensor wqkv, torch::Tensor wqkv_s, torch::Tensor wo,
                           torch::Tensor wo_s, torch::Tensor ffn_norm, torch::Tensor w13, torch::Tensor w13_s,
                           torch::Tensor w2, torch::Tensor w2_s, torch::Tensor cache_k, torch::Tensor cache_v,
                           int64_t n_heads, double eps);
