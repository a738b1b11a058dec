// Arguments of the CUDA partitioned-attention forward kernel, shared by the dispatcher (fwd_api.cu)
// and the four instantiations (fwd_{bf16,fp16}_d{64,128}.cu). Host-only: no torch headers.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "schedule.h"

namespace ugd_ops::cuda::attn {

struct FwdParams {
  const void* q;  // [T, Hq, D], element (t, h, x) at q[t * q_st + h * q_sh + x]
  const void* k;  // [T, Hkv, D]
  const void* v;  // [T, Hkv, D]
  void* out;      // [T, Hq, D] in q's dtype
  float* lse;     // [Hq, T], natural log
  int64_t q_st, q_sh, k_st, k_sh, v_st, v_sh, o_st, o_sh;  // strides in elements
  const int32_t* cu_seqlens;    // [B + 1]
  const int32_t* kv_start;      // [T]
  const int32_t* kv_end;        // [T]
  const int32_t* tile_offsets;  // [B + 1], from launch_tile_offsets
  int32_t B, T, Hq, group;      // group = Hq / Hkv
  float scale_log2;             // softmax_scale * log2(e)
};

// Query rows per work item of the forward kernel (and so the tile of its schedule).
constexpr int32_t kFwdBlockM = 64;

// One instantiation per file: fwd_{bf16,fp16}_d{64,128}.cu. `slots` = max_work_slots(T, B, kFwdBlockM).
template <bool kBf16, int kD>
void launch_fwd(const FwdParams& p, int64_t slots, cudaStream_t stream);
template <> void launch_fwd<true, 64>(const FwdParams& p, int64_t slots, cudaStream_t stream);
template <> void launch_fwd<true, 128>(const FwdParams& p, int64_t slots, cudaStream_t stream);
template <> void launch_fwd<false, 64>(const FwdParams& p, int64_t slots, cudaStream_t stream);
template <> void launch_fwd<false, 128>(const FwdParams& p, int64_t slots, cudaStream_t stream);

}  // namespace ugd_ops::cuda::attn
