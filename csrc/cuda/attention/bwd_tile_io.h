// Shared-memory staging of the CUDA attention backward (bwd_kernel.cuh): loading a tile of a
// [T, H, D] tensor, the per-row values of a query tile, and storing a warp's accumulators. Written
// per thread (`tid` of `kBwdThreads`, or `lane` of a warp) as __host__ __device__ functions free of
// torch and CUDA headers, so that csrc/tests/test_attention_bwd_schedule.cpp replays the kernels'
// own staging code for every thread on the CPU (strides, zero padding, both load paths).
#pragma once

#include <cstdint>
#include <cstring>

#include "bwd_schedule.h"
#include "host_device.h"
#include "mma_fragments.h"
#include "online_softmax.h"
#include "params.h"

namespace ugd_ops::cuda::attn {

constexpr int kBwdThreads = 128;  // 4 warps per block
constexpr int kBwdWarpRows = 16;  // rows of a 64-row tile product per warp

template <int D>
struct BwdSmem {
  static constexpr int kLd = D + 8;               // row pitch of a shared tile, elements (16-byte multiple)
  static constexpr int kTileElems = kBwdTile * kLd;  // one [64][D + 8] tile
  // Four 16-bit tiles, then four 64-entry row vectors (lse * log2 e, delta, kv_start, kv_end).
  static constexpr int kBytes = 4 * kTileElems * 2 + 4 * kBwdTile * 4;
};

// A block's shared memory (kBytes from `raw`, 16-byte aligned) carved as BwdSmem<D> lays it out. Which
// tile holds what is the kernel's choice (dkdv_kernel: K V Q dO; dq_kernel: Q dO K V); the test
// carves its emulated blocks with this too.
struct BwdSmemViews {
  uint16_t *t0, *t1, *t2, *t3;
  float *lse2, *delta;
  int32_t *ks, *ke;
};

template <int D>
UGD_HD BwdSmemViews bwd_smem_views(unsigned char* raw) {
  BwdSmemViews v;
  v.t0 = reinterpret_cast<uint16_t*>(raw);
  v.t1 = v.t0 + BwdSmem<D>::kTileElems;
  v.t2 = v.t1 + BwdSmem<D>::kTileElems;
  v.t3 = v.t2 + BwdSmem<D>::kTileElems;
  v.lse2 = reinterpret_cast<float*>(v.t3 + BwdSmem<D>::kTileElems);
  v.delta = v.lse2 + kBwdTile;
  v.ks = reinterpret_cast<int32_t*>(v.delta + kBwdTile);
  v.ke = v.ks + kBwdTile;
  return v;
}

// 16 bytes from src to dst, both 16-byte aligned (one vector access on the device).
UGD_HD void copy16(uint16_t* dst, const uint16_t* src) {
#if defined(__CUDA_ARCH__)
  *reinterpret_cast<uint4*>(dst) = *reinterpret_cast<const uint4*>(src);
#else
  std::memcpy(dst, src, 16);
#endif
}

UGD_HD void zero16(uint16_t* dst) {
#if defined(__CUDA_ARCH__)
  *reinterpret_cast<uint4*>(dst) = make_uint4(0, 0, 0, 0);
#else
  std::memset(dst, 0, 16);
#endif
}

// Thread tid's part of loading rows [0, rows) of one head of a [T, H, D] tensor (tokens tok0..,
// token stride st, head stride sh, elements) into a shared [64][kLd] tile; rows [rows, 64) are
// zeroed, so the mma never multiplies garbage (0 * NaN would poison a whole accumulator). vec16:
// every row start is 16-byte aligned (else element by element).
template <int D>
UGD_HD void load_tile(int tid, uint16_t* dst, const uint16_t* src, int64_t tok0, int rows, int64_t st, int64_t sh,
                          int head, bool vec16) {
  constexpr int kChunks = D / 8;  // 16-byte chunks per row
  for (int idx = tid; idx < kBwdTile * kChunks; idx += kBwdThreads) {
    const int r = idx / kChunks, ch = idx % kChunks;
    uint16_t* d = dst + r * BwdSmem<D>::kLd + ch * 8;
    if (r >= rows) {
      zero16(d);
      continue;
    }
    const uint16_t* s = src + (tok0 + r) * st + static_cast<int64_t>(head) * sh + ch * 8;
    if (vec16) {
      copy16(d, s);
    } else {
      for (int e = 0; e < 8; ++e) d[e] = s[e];
    }
  }
}

// Thread tid's part of the per-row values of a query tile (rows [0, rows), absolute tokens
// tok0..): lse * log2 e, delta, kv_start, kv_end. Rows past the end get the empty interval [0, 0),
// which no column is in.
UGD_HD void load_rows(int tid, float* lse2_s, float* delta_s, int32_t* ks_s, int32_t* ke_s, const BwdParams& p,
                          int head, int64_t tok0, int rows) {
  for (int r = tid; r < kBwdTile; r += kBwdThreads) {
    const bool in = r < rows;
    const int64_t i = tok0 + r;
    lse2_s[r] = in ? p.lse[head * p.T + i] * kLog2e : 0.0f;
    delta_s[r] = in ? p.delta[head * p.T + i] : 0.0f;
    ks_s[r] = in ? p.kv_start[i] : 0;
    ke_s[r] = in ? p.kv_end[i] : 0;
  }
}

// A warp's accumulators (16 rows from row0 of the tile, D columns) times `scale` into rows
// tok0 + r, r < rows, of head `head` of a contiguous [T, H, D] output, rounded by to16.
template <int D, typename To16>
UGD_HD void store_rows(uint16_t* out, int64_t tok0, int head, int H, int row0, int rows, const float (*acc)[4],
                           float scale, int lane, To16 to16) {
  for (int nd = 0; nd < D / 8; ++nd)
    for (int e = 0; e < 4; ++e) {
      const int r = row0 + frag_c_row(lane, e);
      if (r < rows) {
        const int x = 8 * nd + frag_c_col(lane, e);
        out[((tok0 + r) * H + head) * static_cast<int64_t>(D) + x] = to16(acc[nd][e] * scale);
      }
    }
}

}  // namespace ugd_ops::cuda::attn
