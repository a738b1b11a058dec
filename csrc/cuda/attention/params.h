// Arguments of the CUDA partitioned-attention kernels, in the manner of flash-attention's flash.h: the
// forward's FwdParams, and BwdParams built on it (the backward adds dO, the gradients and its
// workspace). Filled by the ops (fwd_op.cu, bwd_op.cu), read by the kernels and, for the backward's
// staging code, by csrc/tests/test_attention_bwd_schedule.cpp. Plain C++: no torch or CUDA headers.
#pragma once

#include <cstdint>

#include "bwd_schedule.h"

namespace ugd_ops::cuda::attn {

// Query rows per work item of the forward kernel (and so the tile of its schedule).
constexpr int32_t kFwdBlockM = 64;

struct FwdParams {
  // q [T, Hq, D], k and v [T, Hkv, D]: 16-bit values held as raw bits, with token / head strides in
  // elements and the last dimension contiguous: element (t, h, x) of q is q[t * q_st + h * q_sh + x].
  const uint16_t *q, *k, *v;
  int64_t q_st, q_sh, k_st, k_sh, v_st, v_sh;
  // out [T, Hq, D] in q's dtype: the forward writes it, the backward reads it (for delta) only.
  uint16_t* out;
  int64_t o_st, o_sh;
  // lse [Hq, T] contiguous fp32, natural log: the forward writes it, the backward reads it.
  float* lse;
  const int32_t* cu_seqlens;         // [B + 1]
  const int32_t *kv_start, *kv_end;  // [T], relative to each row's sequence
  int64_t T;
  int32_t B, Hq, Hkv, group, D;  // group = Hq / Hkv
  float scale;                   // softmax_scale
  float scale_log2;              // softmax_scale * log2(e): the kernels work in the log2 domain
  // The forward's schedule: tile_offsets[b] = tiles of kFwdBlockM rows before sequence b, [B + 1]
  // (launch_tile_offsets).
  const int32_t* tile_offsets;
};

struct BwdParams : FwdParams {
  const uint16_t* dout;  // [T, Hq, D], strides as q's
  int64_t do_st, do_sh;
  uint16_t *dq, *dk, *dv;  // contiguous [T, H, D]
  const float* dlse;       // [Hq, T] contiguous fp32, or nullptr (no gradient reaches the lse)
  // Workspace, written by the preprocessing launch and read by the two compute launches:
  float* delta;         // [Hq, T]: rowsum(dout * out) - dlse
  BwdTile* tiles;       // the tile schedule (bwd_schedule.h), at most max_tiles entries ...
  int32_t* num_tiles;   // ... and its length, both on the device
  int64_t max_tiles;    // max_tiles(T, B): the size of `tiles` and of the compute grids
  bool vec16;           // every row start of q, k, v, dout is 16-byte aligned: vector loads
};

}  // namespace ugd_ops::cuda::attn
