// The two compute kernels of the CUDA attention backward, templated on dtype and head dim and
// instantiated once per bwd_<dtype>_d<D>.cu, as the forward (compile times: docs/cuda_attention_bwd.md).
//
// With P = exp(scale q.k - lse) on allowed pairs, delta = rowsum(dout * out) - dlse (from the
// preprocessing launch):  dV = P^T dO,  dS = P * (dO V^T - delta),  dK = scale dS^T Q,
// dQ = scale dS K.
//
//   dkdv_kernel  one block per (key tile, kv head): K, V of the tile stay in shared memory, dK and
//                dV in registers (fp32) over every (query tile, query head of the group) pair that
//                the schedule does not skip; each pair recomputes S^T, dP^T with mma.sync.
//   dq_kernel    one block per (query tile, query head): Q, dO of the tile stay in shared memory,
//                dQ in registers over the key tiles of [k_lo, k_hi).
//
// No atomics: every output element is written by exactly one thread, once, so the results are
// the same bits on every run (torch.use_deterministic_algorithms needs nothing more) -- at the
// price of computing S and dP twice. Every element of dq, dk, dv is written, zeros included
// (empty rows, keys nobody reads).
//
// Block: 4 warps, each owning 16 rows of the 64-row tile products (key rows in dkdv, query rows
// in dq). Shared tiles are [64][D + 8] 16-bit (the pad staggers rows over the banks and keeps
// 16-byte row alignment); rows past the end of a tile are zero, so that the mma never multiplies
// garbage (0 * NaN would poison a whole accumulator).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "bwd_schedule.h"
#include "bwd_tile_io.h"
#include "launch.h"
#include "mma_fragments.h"
#include "params.h"
#include "sm80_ptx.cuh"

namespace ugd_ops::cuda::attn {

// acc[n][.] += A B over k in [0, K): A rows [row0, row0 + 16) of the row-major shared tile `a`,
// B(k, n) = b[n][k] (the row-major shared tile `b`, transposed), n over the 64 rows of `b`.
template <bool kBf16, int D>
__device__ __forceinline__ void warp_gemm_abt(float acc[kBwdTile / 8][4], const uint16_t* a, int row0,
                                              const uint16_t* b, int lane) {
#pragma unroll
  for (int nt = 0; nt < kBwdTile / 8; ++nt)
#pragma unroll
    for (int e = 0; e < 4; ++e) acc[nt][e] = 0.0f;
#pragma unroll
  for (int kk = 0; kk < D / 16; ++kk) {
    uint32_t af[4];
    load_a_rowmajor(a, BwdSmem<D>::kLd, row0, 16 * kk, lane, af);
#pragma unroll
    for (int nt = 0; nt < kBwdTile / 8; ++nt) {
      uint32_t bf[2];
      load_b_from_rows(b, BwdSmem<D>::kLd, 16 * kk, 8 * nt, lane, bf);
      mma_m16n8k16<kBf16>(acc[nt], af, bf);
    }
  }
}

// acc[n][.] += X B with X (16 x 64) given as accumulator fragments x[8][4] (rounded to 16 bits
// here), B(k, n) = b[k][n] (the row-major shared tile `b`, 64 x D).
template <bool kBf16, int D>
__device__ __forceinline__ void warp_gemm_xb(float acc[D / 8][4], const float x[kBwdTile / 8][4], const uint16_t* b,
                                             int lane) {
#pragma unroll
  for (int kb = 0; kb < kBwdTile / 16; ++kb) {
    uint32_t af[4];
    acc_to_a(x[2 * kb], x[2 * kb + 1], To16<kBf16>(), af);
#pragma unroll
    for (int nd = 0; nd < D / 8; ++nd) {
      uint32_t bf[2];
      load_b_from_cols(b, BwdSmem<D>::kLd, 16 * kb, 8 * nd, lane, bf);
      mma_m16n8k16<kBf16>(acc[nd], af, bf);
    }
  }
}

template <bool kBf16, int D>
__global__ void __launch_bounds__(kBwdThreads) dkdv_kernel(const BwdParams p) {
  const int j = blockIdx.x, g = blockIdx.y;
  if (j >= *p.num_tiles) return;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const BwdSmemViews sm = bwd_smem_views<D>(smem_raw);
  uint16_t *k_s = sm.t0, *v_s = sm.t1, *q_s = sm.t2, *do_s = sm.t3;
  float *lse2_s = sm.lse2, *delta_s = sm.delta;
  int32_t *ks_s = sm.ks, *ke_s = sm.ke;

  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, wrow = warp * kBwdWarpRows;
  const BwdTile kt = p.tiles[j];
  const int32_t c0 = kt.row0, cols = kt.row1 - kt.row0;
  const int64_t key0 = static_cast<int64_t>(kt.seq_start) + c0;
  load_tile<D>(threadIdx.x, k_s, p.k, key0, cols, p.k_st, p.k_sh, g, p.vec16);
  load_tile<D>(threadIdx.x, v_s, p.v, key0, cols, p.v_st, p.v_sh, g, p.vec16);

  float dk[D / 8][4], dv[D / 8][4];
#pragma unroll
  for (int nd = 0; nd < D / 8; ++nd)
#pragma unroll
    for (int e = 0; e < 4; ++e) dk[nd][e] = dv[nd][e] = 0.0f;

  const int32_t q_end = min(kt.first_tile + kt.num_tiles, *p.num_tiles);  // (a cut-off schedule: bad cu_seqlens)
  for (int32_t qi = kt.first_tile; qi < q_end; ++qi) {
    const BwdTile qt = p.tiles[qi];
    if (!tile_meets(qt, c0, kt.row1)) continue;  // no row of this query tile reads these keys
    const int rows = qt.row1 - qt.row0;
    const int64_t tok0 = static_cast<int64_t>(qt.seq_start) + qt.row0;
    for (int h = g * p.group; h < (g + 1) * p.group; ++h) {
      __syncthreads();  // the previous pair's reads of q_s, do_s and the row vectors are done
      load_tile<D>(threadIdx.x, q_s, p.q, tok0, rows, p.q_st, p.q_sh, h, p.vec16);
      load_tile<D>(threadIdx.x, do_s, p.dout, tok0, rows, p.do_st, p.do_sh, h, p.vec16);
      load_rows(threadIdx.x, lse2_s, delta_s, ks_s, ke_s, p, h, tok0, rows);
      __syncthreads();

      // This warp's 16 key columns against the 64 query rows: S^T = K Q^T, dP^T = V dO^T.
      float s[kBwdTile / 8][4], dp[kBwdTile / 8][4];
      warp_gemm_abt<kBf16, D>(s, k_s, wrow, q_s, lane);
      warp_gemm_abt<kBf16, D>(dp, v_s, wrow, do_s, lane);
      p_ds_block<true, kBwdTile / 8>(s, dp, lane, wrow, c0, cols, lse2_s, delta_s, ks_s, ke_s, p.scale_log2);
      warp_gemm_xb<kBf16, D>(dv, s, do_s, lane);  // dV += P^T dO
      warp_gemm_xb<kBf16, D>(dk, dp, q_s, lane);  // dK += dS^T Q (scaled at the store)
    }
  }
  store_rows<D>(p.dk, key0, g, p.Hkv, wrow, cols, dk, p.scale, lane, To16<kBf16>());
  store_rows<D>(p.dv, key0, g, p.Hkv, wrow, cols, dv, 1.0f, lane, To16<kBf16>());
}

template <bool kBf16, int D>
__global__ void __launch_bounds__(kBwdThreads) dq_kernel(const BwdParams p) {
  const int i = blockIdx.x, h = blockIdx.y;
  if (i >= *p.num_tiles) return;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const BwdSmemViews sm = bwd_smem_views<D>(smem_raw);
  uint16_t *q_s = sm.t0, *do_s = sm.t1, *k_s = sm.t2, *v_s = sm.t3;
  float *lse2_s = sm.lse2, *delta_s = sm.delta;
  int32_t *ks_s = sm.ks, *ke_s = sm.ke;

  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, wrow = warp * kBwdWarpRows;
  const int g = h / p.group;
  const BwdTile qt = p.tiles[i];
  const int rows = qt.row1 - qt.row0;
  const int64_t tok0 = static_cast<int64_t>(qt.seq_start) + qt.row0;
  load_tile<D>(threadIdx.x, q_s, p.q, tok0, rows, p.q_st, p.q_sh, h, p.vec16);
  load_tile<D>(threadIdx.x, do_s, p.dout, tok0, rows, p.do_st, p.do_sh, h, p.vec16);
  load_rows(threadIdx.x, lse2_s, delta_s, ks_s, ke_s, p, h, tok0, rows);

  float dq[D / 8][4];
#pragma unroll
  for (int nd = 0; nd < D / 8; ++nd)
#pragma unroll
    for (int e = 0; e < 4; ++e) dq[nd][e] = 0.0f;

  for (int32_t c0 = first_key_col(qt); c0 < qt.k_hi; c0 += kBwdTile) {
    const int32_t c1 = c0 + kBwdTile < qt.seq_len ? c0 + kBwdTile : qt.seq_len, cols = c1 - c0;
    const int64_t key0 = static_cast<int64_t>(qt.seq_start) + c0;
    __syncthreads();  // the previous key tile's reads of k_s, v_s are done (and the row loads above)
    load_tile<D>(threadIdx.x, k_s, p.k, key0, cols, p.k_st, p.k_sh, g, p.vec16);
    load_tile<D>(threadIdx.x, v_s, p.v, key0, cols, p.v_st, p.v_sh, g, p.vec16);
    __syncthreads();

    // This warp's 16 query rows against the 64 key columns: S = Q K^T, dP = dO V^T.
    float s[kBwdTile / 8][4], dp[kBwdTile / 8][4];
    warp_gemm_abt<kBf16, D>(s, q_s, wrow, k_s, lane);
    warp_gemm_abt<kBf16, D>(dp, do_s, wrow, v_s, lane);
    p_ds_block<false, kBwdTile / 8>(s, dp, lane, wrow, c0, cols, lse2_s, delta_s, ks_s, ke_s, p.scale_log2);
    warp_gemm_xb<kBf16, D>(dq, dp, k_s, lane);  // dQ += dS K (scaled at the store)
  }
  store_rows<D>(p.dq, tok0, h, p.Hq, wrow, rows, dq, p.scale, lane, To16<kBf16>());
}

template <bool kBf16, int D>
void launch_bwd_impl(const BwdParams& p, cudaStream_t stream) {
  constexpr int kBytes = BwdSmem<D>::kBytes;
  // Above the default 48 KiB of dynamic shared memory (sm_80 allows 163 KiB per block): opt in.
  // Cheap, and set on every call since it is per device. On failure launch nothing: the error
  // stays the runtime's last error, which the caller's C10_CUDA_KERNEL_LAUNCH_CHECK raises.
  if (cudaFuncSetAttribute(dkdv_kernel<kBf16, D>, cudaFuncAttributeMaxDynamicSharedMemorySize, kBytes) !=
          cudaSuccess ||
      cudaFuncSetAttribute(dq_kernel<kBf16, D>, cudaFuncAttributeMaxDynamicSharedMemorySize, kBytes) != cudaSuccess)
    return;
  const dim3 kv_grid(static_cast<unsigned>(p.max_tiles), static_cast<unsigned>(p.Hkv));
  dkdv_kernel<kBf16, D><<<kv_grid, kBwdThreads, kBytes, stream>>>(p);
  const dim3 q_grid(static_cast<unsigned>(p.max_tiles), static_cast<unsigned>(p.Hq));
  dq_kernel<kBf16, D><<<q_grid, kBwdThreads, kBytes, stream>>>(p);
}

}  // namespace ugd_ops::cuda::attn
