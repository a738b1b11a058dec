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
  s += "\"ops\": [\"detached_kl_fwd\", \"row_intervals\", \"dense_mask\"]}";
  return s;
}

}  // namespace ugd_ops::cuda
