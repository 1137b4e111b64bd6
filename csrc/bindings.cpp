// Python bindings of the CPU kernels: the `mixq._C` module wrapped by mixq/backends/cpu.py.
#include <torch/extension.h>

#include "mixq_cpu.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "mixq CPU kernels: AVX-512 VNNI / AVX2 + OpenMP int8 x packed int4/int6/int8 GEMM and activation quantization";
  m.def("has_avx2", &mixq::cpu_has_avx2, "True when the CPU supports AVX2, FMA and F16C");
  m.def("use_avx2", &mixq::use_avx2, "True when the AVX2 (or VNNI) kernels are in use");
  m.def("has_vnni", &mixq::cpu_has_vnni, "True when the CPU supports AVX-512 VNNI (+VL, BW)");
  m.def("kernel_path", &mixq::kernel_path_name, "The kernel family in use: 'vnni', 'avx2' or 'scalar'");
  m.def(
      "set_kernel_path",
      [](const std::string& path) {
        if (path == "scalar") mixq::set_max_isa(mixq::Isa::kScalar);
        else if (path == "avx2") mixq::set_max_isa(mixq::Isa::kAvx2);
        else if (path == "vnni" || path == "auto") mixq::set_max_isa(mixq::Isa::kVnni);
        else throw std::invalid_argument("kernel path must be 'vnni', 'avx2', 'scalar' or 'auto', got '" + path + "'");
      },
      py::arg("path"), "Cap the kernel family (the best supported one at or below it runs)");
  m.def("set_force_scalar", &mixq::set_force_scalar, py::arg("force"),
        "Force the portable scalar kernels (for tests of that path)");
  m.def("prepack_k_unit", &mixq::prepack_k_unit, py::arg("bits"));
  m.def("prepacked_tile_bytes", &mixq::prepacked_tile_bytes, py::arg("k"), py::arg("bits"));
  m.def("prepack_weight", &mixq::prepack_weight, py::arg("canonical"), py::arg("bits"), py::arg("k"),
        "Canonical packed weights [N, row_bytes] -> prepacked uint8 [tiles * tile_bytes]");
  m.def("int_gemm", &mixq::int_gemm, py::arg("xq"), py::arg("w"), py::arg("bits"), py::arg("k"), py::arg("n"));
  m.def("packed_linear", &mixq::packed_linear, py::arg("xq"), py::arg("a_scale"), py::arg("w"), py::arg("w_scale"),
        py::arg("bias"), py::arg("bits"), py::arg("k"), py::arg("n"), py::arg("out_dtype"));
  m.def("linear_dynamic", &mixq::linear_dynamic, py::arg("x"), py::arg("smooth_inv"), py::arg("w"),
        py::arg("w_scale"), py::arg("bias"), py::arg("w_bits"), py::arg("a_bits"), py::arg("k"), py::arg("n"),
        py::arg("out_dtype"), py::arg("a_scale_mul") = py::none(), py::arg("headroom") = false,
        "Fused dynamic-activation Linear: quantize (+ smooth multiply), GEMM, epilogue (+ QuantLinear's "
        "overflow headroom) -> (out, a_scale)");
  m.def("quantize_dynamic", &mixq::quantize_dynamic, py::arg("x"), py::arg("bits"));
  m.def("quantize_static", &mixq::quantize_static, py::arg("x"), py::arg("inv_scale"), py::arg("bits"));
  m.def("layernorm_quantize", &mixq::layernorm_quantize, py::arg("x"), py::arg("norm_weight"), py::arg("norm_bias"),
        py::arg("eps"), py::arg("inv_scale"), py::arg("bits"));
  m.def("measure_int8_peak", &mixq::measure_int8_peak, py::arg("sequence"), py::arg("iters"), py::arg("threads"),
        py::call_guard<py::gil_scoped_release>());
  // --- attention matmuls (issue 15, phase 2; csrc/attention.cpp)
  m.def("attention_qk", &mixq::attention_qk, py::arg("q"), py::arg("q_scale"), py::arg("k"), py::arg("k_scale"),
        "int8 Q [BH, N, D] x int8 K [BH, M, D] with per-token fp32 steps -> fp32 [BH, N, M]",
        py::call_guard<py::gil_scoped_release>());
  m.def("attention_pv_uniform", &mixq::attention_pv_uniform, py::arg("p"), py::arg("v"), py::arg("v_scale"),
        py::arg("bits"), "uint8 uniform-grid P [BH, N, M] x int8 V [BH, M, D] -> fp32 [BH, N, D]",
        py::call_guard<py::gil_scoped_release>());
  m.def("attention_pv_log2", &mixq::attention_pv_log2, py::arg("p"), py::arg("v"), py::arg("v_scale"),
        py::arg("cmax"), py::arg("zero_code"), "uint8 log2-grid P [BH, N, M] x int8 V [BH, M, D] -> fp32 [BH, N, D]",
        py::call_guard<py::gil_scoped_release>());
  m.attr("attention_max_head_dim") = mixq::kMaxHeadDim;
  m.attr("attention_max_keys") = mixq::kMaxKeys;
  // --- probability codes (issue 15; csrc/probs.cpp)
  m.def("quantize_probs", &mixq::quantize_probs, py::arg("p"), py::arg("bits"), py::arg("log2"),
        "post-softmax probabilities (fp32/bf16/fp16, any shape) -> uint8 codes, log2 or uniform grid",
        py::call_guard<py::gil_scoped_release>());
  // --- rotations (issue 23; csrc/hadamard.cpp)
  m.def("hadamard_transform", &mixq::hadamard_transform, py::arg("x"), py::arg("signs"), py::arg("block"),
        py::arg("scale"), "randomized block Walsh-Hadamard transform of x [M, K] -> fp32 [M, K]",
        py::call_guard<py::gil_scoped_release>());
  // --- per-channel V codes for quantized attention (csrc/quantize.cpp)
  m.def("quantize_channels", &mixq::quantize_channels, py::arg("v"), py::arg("bits"),
        "V [B, H, M, D] float (any strides) -> (int8 codes [B, H, M, D], fp32 steps [B, H, D]), one step per channel",
        py::call_guard<py::gil_scoped_release>());
  m.def("quantize_tokens", &mixq::quantize_tokens, py::arg("x"), py::arg("bits"),
        "Q or K [B, H, N, D] float (unit stride along D) -> (int8 codes [B, H, N, D], fp32 steps [B, H, N]), per token",
        py::call_guard<py::gil_scoped_release>());
}
