// Python bindings of the CPU kernels (built on first use by engine/kernels.py). Both release the GIL while
// they run, as torch's own operators do: the server's event loop keeps answering during a decode step.
#include <torch/extension.h>

#include "kernels.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  using release = pybind11::call_guard<pybind11::gil_scoped_release>;
  m.def("linear",
        [](at::Tensor x, at::Tensor w, at::Tensor s, int64_t tiles_max_m) { return linear(x, w, s, tiles_max_m); },
        release(), pybind11::arg("x"), pybind11::arg("w"), pybind11::arg("s"),
        pybind11::arg("tiles_max_m") = TILES_MAX_M,
        "x [M, K] float32 @ w.T: w float32 [N, K], int8 [N, K] + scale [N], scale/min [N, K/16, 2] or scale [N, K/G], or int4 (uint8 [N, K/2] + scale/min [N, K/32, 2])");
  m.def("decode_layer", &decode_layer, release(),
        "one decoder layer for rows of new tokens at (slot, position); returns the new hidden state");
  pybind11::class_<LayerStack>(m, "LayerStack", "a model's decoder layers for decode_layer, captured once")
      .def(pybind11::init<std::vector<std::vector<at::Tensor>>, int64_t, int64_t, double>(), pybind11::arg("layers"),
           pybind11::arg("n_kv_heads"), pybind11::arg("n_heads"), pybind11::arg("eps"))
      .def("bind_caches", &LayerStack::bind_caches, pybind11::arg("kv"), pybind11::arg("scales"),
           pybind11::arg("max_seq_len"), "each layer's KV cache and scales (none: let go of them)")
      .def("forward", &LayerStack::forward, release(), "x [B, D] through every layer (decode_layer's arguments)");
  m.def("argmax_rows", &argmax_rows, release(), "[B, V] float32 -> int64 [B]: torch.argmax(-1), rows in parallel");
  m.def("use_wide_tiles", &use_wide_tiles, pybind11::arg("on"),
        "512-bit tiles for blocks of rows and 512-bit attention in the fused step where the CPU has AVX-512F (the "
        "default there); False: the AVX2 ones");
  m.def("use_int8_activations", &use_int8_activations, pybind11::arg("on"),
        "int8 activations for quantised weights where the CPU has AVX-512 VNNI (the default there); False: "
        "float32 activations, the weights widened");
  m.def("int8_activations", &int8_activations_on, "whether quantised weights take int8 activations now");
  // torch's AVX2 capability does not promise F16C (float16 scales), nor FMA on every build: ask the CPU
  m.def("cpu_supported", [] {
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
  }, "whether this CPU has every instruction set the kernels were built for (AVX2, FMA, F16C)");
}
