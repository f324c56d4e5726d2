// Python bindings of the CPU kernels (built on first use by engine/kernels.py).
#include "kernels.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("linear", &linear, "x [M, K] float32 @ w.T: w float32 [N, K], int8 [N, K] + scale [N], or int4 (uint8 [N, K/2] + scale/min [N, K/32, 2])");
  m.def("decode_layer", &decode_layer, "one decoder layer for one new token per row; returns the new hidden state");
}
