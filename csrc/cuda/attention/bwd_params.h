// Arguments of the CUDA attention backward kernels (csrc/cuda/attention/bwd_*.cu), shared by the
// op (bwd_op.cu) and the one-instantiation-per-file kernel units (bwd_{bf16,fp16}_d{64,128}.cu).
// Plain C++: no torch or CUDA headers.
#pragma once

#include <cstdint>

#include "bwd_schedule.cuh"

namespace ugd_ops::cuda::attn_bwd {

struct BwdParams {
  // Inputs, 16-bit values as raw bits; [T, H, D] with the given token / head strides (elements),
  // the last dimension contiguous.
  const uint16_t *q, *k, *v, *dout;
  int64_t q_st, q_sh, k_st, k_sh, v_st, v_sh, do_st, do_sh;
  // Outputs, contiguous [T, H, D].
  uint16_t *dq, *dk, *dv;
  const float* lse;    // [Hq, T] contiguous, fp32
  const float* delta;  // [Hq, T] contiguous, fp32: rowsum(dout * out) - dlse (the preprocessing launch)
  const int32_t *kv_start, *kv_end;  // [T]
  const Tile* tiles;                 // the schedule (preprocessing launch) ...
  const int32_t* num_tiles;          // ... and its length, both on the device
  int64_t T;
  int32_t Hq, Hkv, group;
  float scale;       // softmax_scale
  float scale_log2;  // softmax_scale * log2(e)
  bool vec16;        // every row start of q, k, v, dout is 16-byte aligned: vector loads
};

// Launch the dk/dv pass and the dq pass (two launches) on `stream` (a cudaStream_t), grids sized
// by `max_tiles` (see max_tiles()). Defined once per (dtype, head dim) in bwd_<dtype>_d<D>.cu.
template <bool kBf16, int kHeadDim>
void launch_bwd_kernels(const BwdParams& p, int64_t max_tiles, void* stream);
template <>
void launch_bwd_kernels<true, 64>(const BwdParams& p, int64_t max_tiles, void* stream);
template <>
void launch_bwd_kernels<true, 128>(const BwdParams& p, int64_t max_tiles, void* stream);
template <>
void launch_bwd_kernels<false, 64>(const BwdParams& p, int64_t max_tiles, void* stream);
template <>
void launch_bwd_kernels<false, 128>(const BwdParams& p, int64_t max_tiles, void* stream);

}  // namespace ugd_ops::cuda::attn_bwd
