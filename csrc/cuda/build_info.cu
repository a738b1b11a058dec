// What the CUDA part of the build holds, as JSON for ugd_ops.build_info().
#include <cuda_runtime_api.h>

#include <string>

#ifndef UGD_CUDA_ARCHS_STR
#define UGD_CUDA_ARCHS_STR "unknown"
#endif

namespace ugd_ops::cuda {

std::string build_info_json() {
  const int v = CUDART_VERSION;  // e.g. 13000 for 13.0
  std::string s = "{\"cuda_version\": \"" + std::to_string(v / 1000) + "." + std::to_string((v % 1000) / 10) + "\", ";
  s += "\"archs\": \"" UGD_CUDA_ARCHS_STR "\", ";
  // The attention kernels are internal operators that partitioned_attention_fwd/_bwd route to when
  // ugd_ops.cuda_attention allows (opt-in with UGD_CUDA_ATTENTION=1 until a GPU run has verified them).
  s += "\"ops\": [\"detached_kl_fwd\", \"row_intervals\", \"dense_mask\", \"_cuda_attention_fwd\", "
       "\"_cuda_attention_bwd\"], ";
  s += "\"attention\": {\"dtypes\": [\"bfloat16\", \"float16\"], \"head_dims\": [64, 128]}}";
  return s;
}

}  // namespace ugd_ops::cuda
