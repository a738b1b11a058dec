// The ugd_ops operator library: schemas and build information.
//
// Kernels register themselves per backend (csrc/cpu/*.cpp with TORCH_LIBRARY_IMPL(ugd_ops, CPU),
// csrc/cuda/*.cu with TORCH_LIBRARY_IMPL(ugd_ops, CUDA)); autograd, fake tensors and the public
// Python signatures live in ugd_ops/ops.py. The schema strings must equal SCHEMAS in
// ugd_ops/_schemas.py, which defines the same library when nothing was compiled
// (tests/ops/test_build.py compares them).
#if __has_include(<torch/headeronly/version.h>)
#include <torch/headeronly/version.h>
#else
#include <torch/version.h>
#endif
#include <torch/library.h>

#include <string>

#include "cpu/bf16_gemm.h"

#ifdef UGD_WITH_CUDA
namespace ugd_ops::cuda {
std::string build_info_json();  // csrc/cuda/build_info.cu
}
#endif

namespace ugd_ops {
namespace {

// JSON, read by `python -m ugd_ops.info`.
std::string build_info() {
  std::string s = "{\"torch\": \"" TORCH_VERSION "\", ";
  s += "\"cpu\": {\"ops\": [\"partitioned_attention_fwd\", \"partitioned_attention_bwd\", \"detached_kl_fwd\", "
       "\"row_intervals\", \"dense_mask\"], \"dtypes\": [\"float32\", \"float64\", \"bfloat16\", \"float16\"], "
       "\"head_dims\": \"1-1024\", ";
  // Which units the bf16 attention products run on here (bf16_gemm.h).
  s += std::string("\"bf16_units\": \"") + cpu::cpu_bf16_units() + "\", \"bf16_gemm\": \"" +
       cpu::bf16_backend_name(cpu::bf16_backend()) + "\"}, ";
#ifdef UGD_WITH_CUDA
  s += "\"cuda\": " + cuda::build_info_json();
#else
  s += "\"cuda\": null";
#endif
  s += "}";
  return s;
}

}  // namespace

TORCH_LIBRARY(ugd_ops, m) {
  m.def(
      "partitioned_attention_fwd(Tensor q, Tensor k, Tensor v, Tensor cu_seqlens, Tensor kv_start, "
      "Tensor kv_end, int? max_seqlen, float softmax_scale) -> (Tensor out, Tensor lse)");
  m.def(
      "partitioned_attention_bwd(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, "
      "Tensor? dlse, Tensor cu_seqlens, Tensor kv_start, Tensor kv_end, int? max_seqlen, float softmax_scale) "
      "-> (Tensor dq, Tensor dk, Tensor dv)");
  m.def(
      "detached_kl_fwd(Tensor p_logits, Tensor q_logits, float temperature, bool grad_p, bool grad_q) "
      "-> (Tensor loss, Tensor grad_p, Tensor grad_q)");
  // Its kernels are Python (ugd_ops/chunked_ce.py, registered by ugd_ops/_backend.py for
  // every device): the chunked PyTorch implementation. A fused CUDA kernel is future work.
  m.def(
      "linear_cross_entropy_fwd(Tensor hidden, Tensor weight, Tensor targets, Tensor? bias, Tensor? per_sample, "
      "int ignore_index, str reduction, int chunk_size, bool grad_hidden, bool grad_weight, bool grad_bias) "
      "-> (Tensor loss, Tensor grad_hidden, Tensor grad_weight, Tensor grad_bias)");
  m.def(
      "linear_cross_entropy_bwd(Tensor grad_rows, Tensor hidden, Tensor weight, Tensor targets, Tensor? bias, "
      "int ignore_index, int chunk_size, bool grad_hidden, bool grad_weight, bool grad_bias) "
      "-> (Tensor grad_hidden, Tensor grad_weight, Tensor grad_bias)");
  m.def("row_intervals(Tensor spans, str mask) -> (Tensor cu_seqlens, Tensor kv_start, Tensor kv_end)");
  m.def("dense_mask(Tensor cu_seqlens, Tensor kv_start, Tensor kv_end) -> Tensor");
  m.def("build_info() -> str", &build_info);
}

}  // namespace ugd_ops

#ifdef UGD_PYTHON_MODULE
// `import ugd_ops._C` loads this library (and so runs the registrations above); the module
// itself has no members. Built without Python (CMake), load it with torch.ops.load_library.
#include <Python.h>

extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", "ugd_ops compiled kernels", -1, nullptr};
  return PyModule_Create(&module_def);
}
#endif
