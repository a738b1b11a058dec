// The sm_80 forward kernel of partitioned attention (FlashAttention-2 style), included once per
// instantiation file (fwd_{bf16,fp16}_d{64,128}.cu).
//
// One CTA = one work item (a tile of kBlockM = 64 query rows of one sequence) x one query head;
// blockIdx.x = slot * Hq + h, so the heads of one query tile are neighbours (their K/V tiles are
// shared through L2 under GQA). 4 warps, 16 query rows each. Per CTA:
//   1. find its (sequence, row tile) in tile_offsets (built by the scheduling kernel), read the
//      rows' intervals and reduce them to TileBounds (tile_bounds.h);
//   2. stream the key tiles c0 = first_key_tile, ..., < k_hi (kBlockN = 64 keys each) through shared
//      memory with cp.async: K of the next tile loads during this tile's softmax and P V, V of the
//      next during the next S = Q K^T; rows past the end of the sequence are zero-filled;
//   3. S = Q K^T and O += P V with mma.sync m16n8k16 (fp32 accumulation), operands read from
//      shared memory with ldmatrix.x4 (V with .trans); Q's fragments stay in registers; P goes from
//      the S accumulators to A fragments in registers (acc_to_a);
//   4. online softmax in the log2 domain; tiles with key_tile_unmasked skip the element mask;
//   5. out = O / l in q's dtype, lse = (m + log2 l) ln 2; an empty row writes 0 and -inf.
// Shared tiles are row-major with a row pitch of D + 8 elements (144 or 272 bytes): the 8 rows of
// 16 bytes one ldmatrix phase reads then fall into distinct banks.
#pragma once

#include <c10/cuda/CUDAException.h>
#include <cuda_runtime.h>

#include <atomic>
#include <cstdint>

#include "launch.h"
#include "mma_fragments.h"
#include "online_softmax.h"
#include "params.h"
#include "schedule.h"
#include "sm80_ptx.cuh"
#include "tile_bounds.h"

namespace ugd_ops::cuda::attn {

template <int kD>
struct FwdTraits {
  static constexpr int kBlockM = kFwdBlockM;
  static constexpr int kBlockN = 64;
  static constexpr int kWarps = kBlockM / 16;
  static constexpr int kThreads = kWarps * 32;
  static constexpr int kLd = kD + 8;  // shared row pitch (elements)
  static constexpr int kNTiles = kBlockN / 8;  // n8 tiles of S
  static constexpr int kDTiles = kD / 8;       // n8 tiles of O
  static constexpr int kKSteps = kD / 16;      // k16 steps of Q K^T
  static constexpr int kChunks = kD / 8;       // 16-byte chunks per row
  static constexpr int kSmemBytes = (kBlockM + 2 * kBlockN) * kLd * 2;
  static_assert(kD % 16 == 0, "head dim must be a multiple of 16");
};

// Rows [0, kRows) of a tile starting at sequence row `row0` -> shared; rows at or past L are zeros.
template <int kD, int kRows, int kThreads>
__device__ __forceinline__ void cp_async_tile(uint16_t* smem, const uint16_t* base, int64_t stride_t, int32_t row0,
                                          int32_t L, int tid) {
  constexpr int kChunks = kD / 8, kLd = kD + 8;
#pragma unroll
  for (int idx = tid; idx < kRows * kChunks; idx += kThreads) {
    const int r = idx / kChunks, c = (idx % kChunks) * 8;
    const bool read = row0 + r < L;
    const uint16_t* src = read ? base + static_cast<int64_t>(row0 + r) * stride_t + c : base;
    cp_async_16(smem + r * kLd + c, src, read);
  }
}

template <bool kBf16, int kD>
__global__ void __launch_bounds__(FwdTraits<kD>::kThreads) partitioned_attention_fwd_kernel(const FwdParams p) {
  using Tr = FwdTraits<kD>;
  constexpr int kBlockM = Tr::kBlockM, kBlockN = Tr::kBlockN, kLd = Tr::kLd;
  constexpr int kNTiles = Tr::kNTiles, kDTiles = Tr::kDTiles, kKSteps = Tr::kKSteps, kThreads = Tr::kThreads;
  extern __shared__ __align__(16) uint16_t smem[];
  uint16_t* sQ = smem;
  uint16_t* sK = sQ + kBlockM * kLd;
  uint16_t* sV = sK + kBlockN * kLd;

  const int64_t item = blockIdx.x;
  const int32_t h = static_cast<int32_t>(item % p.Hq);
  const WorkItem w =
      find_work_item(p.tile_offsets, p.cu_seqlens, p.B, static_cast<int32_t>(p.T), item / p.Hq, kBlockM);
  if (!w.valid) return;  // a surplus slot of the grid bound T / kBlockM + B (uniform over the block)
  const int32_t g = h / p.group, L = w.seq_len, start = w.seq_start;
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;

  // This lane's two rows (frag_c_row: g and g + 8 of the warp's 16) and their clamped intervals;
  // rows past the end of the sequence read nothing.
  int32_t lo[2], hi[2];
  TileBounds tb;
#pragma unroll
  for (int hh = 0; hh < 2; ++hh) {
    const int32_t r = w.row0 + warp * 16 + frag_c_row(lane, 2 * hh);
    lo[hh] = hi[hh] = 0;
    if (r < L) {
      clamp_interval(p.kv_start[start + r], p.kv_end[start + r], L, lo[hh], hi[hh]);
      tb.add_row(lo[hh], hi[hh]);
    }
  }
  // Block-wide min / max reduction of the bounds (order-independent, so every thread agrees).
#pragma unroll
  for (int off = 16; off >= 1; off /= 2) {
    TileBounds o;
    o.k_lo = __shfl_xor_sync(0xffffffffu, tb.k_lo, off);
    o.k_hi = __shfl_xor_sync(0xffffffffu, tb.k_hi, off);
    o.full_lo = __shfl_xor_sync(0xffffffffu, tb.full_lo, off);
    o.full_hi = __shfl_xor_sync(0xffffffffu, tb.full_hi, off);
    tb.merge(o);
  }
  __shared__ int32_t warp_tb[Tr::kWarps][4];  // plain ints: __shared__ takes no constructors
  if (lane == 0) {
    warp_tb[warp][0] = tb.k_lo;
    warp_tb[warp][1] = tb.k_hi;
    warp_tb[warp][2] = tb.full_lo;
    warp_tb[warp][3] = tb.full_hi;
  }
  __syncthreads();
#pragma unroll
  for (int i = 0; i < Tr::kWarps; ++i) {
    TileBounds o;
    o.k_lo = warp_tb[i][0];
    o.k_hi = warp_tb[i][1];
    o.full_lo = warp_tb[i][2];
    o.full_hi = warp_tb[i][3];
    tb.merge(o);
  }

  float o_acc[kDTiles][4];
#pragma unroll
  for (int dt = 0; dt < kDTiles; ++dt)
#pragma unroll
    for (int e = 0; e < 4; ++e) o_acc[dt][e] = 0.0f;
  float m[2] = {neg_inf_f(), neg_inf_f()}, l[2] = {0.0f, 0.0f};

  if (tb.any()) {
    const uint16_t* q_base = p.q + static_cast<int64_t>(start) * p.q_st + h * p.q_sh;
    const uint16_t* k_base = p.k + static_cast<int64_t>(start) * p.k_st + g * p.k_sh;
    const uint16_t* v_base = p.v + static_cast<int64_t>(start) * p.v_st + g * p.v_sh;
    const int32_t c_first = first_key_tile(tb, kBlockN);
    // cp.async groups, in commit order: {Q, K_first}, {V_first}, then per tile {K_next}, {V_next}
    // (empty groups when there is no next tile, so that the counts below always hold).
    cp_async_tile<kD, kBlockM, kThreads>(sQ, q_base, p.q_st, w.row0, L, tid);
    cp_async_tile<kD, kBlockN, kThreads>(sK, k_base, p.k_st, c_first, L, tid);
    cp_async_commit();
    cp_async_tile<kD, kBlockN, kThreads>(sV, v_base, p.v_st, c_first, L, tid);
    cp_async_commit();

    int a_row, a_col, bt_row, bt_col;  // this lane's ldmatrix row address within a 16x16 block
    ldsm_a_offset(lane, a_row, a_col);
    ldsm_bt_offset(lane, bt_row, bt_col);
    uint32_t qa[kKSteps][4];
    for (int32_t c0 = c_first; c0 < tb.k_hi; c0 += kBlockN) {
      cp_async_wait<1>();  // all but the newest group: K of this tile (and Q) has landed
      __syncthreads();
      if (c0 == c_first) {
#pragma unroll
        for (int ks = 0; ks < kKSteps; ++ks) ldmatrix_x4(qa[ks], sQ + (warp * 16 + a_row) * kLd + ks * 16 + a_col);
      }
      float s[kNTiles][4];
#pragma unroll
      for (int nt = 0; nt < kNTiles; ++nt)
#pragma unroll
        for (int e = 0; e < 4; ++e) s[nt][e] = 0.0f;
#pragma unroll
      for (int ks = 0; ks < kKSteps; ++ks) {
#pragma unroll
        for (int np = 0; np < kNTiles / 2; ++np) {  // n-tiles 2 np and 2 np + 1
          uint32_t r[4];
          ldmatrix_x4(r, sK + (np * 16 + bt_row) * kLd + ks * 16 + bt_col);
          const uint32_t b0[2] = {r[0], r[1]}, b1[2] = {r[2], r[3]};
          mma_m16n8k16<kBf16>(s[2 * np], qa[ks], b0);
          mma_m16n8k16<kBf16>(s[2 * np + 1], qa[ks], b1);
        }
      }
      __syncthreads();  // every warp is done with sK
      const int32_t c_next = c0 + kBlockN;
      const bool has_next = c_next < tb.k_hi;
      if (has_next) cp_async_tile<kD, kBlockN, kThreads>(sK, k_base, p.k_st, c_next, L, tid);
      cp_async_commit();

      float mx[2];
      mask_scale_rowmax<kNTiles>(s, lane, c0, key_tile_unmasked(tb, c0, kBlockN), lo, hi, p.scale_log2, mx);
#pragma unroll
      for (int hh = 0; hh < 2; ++hh) {  // the 4 lanes of a quad hold the row's 64 columns
        mx[hh] = fmax_f(mx[hh], __shfl_xor_sync(0xffffffffu, mx[hh], 1));
        mx[hh] = fmax_f(mx[hh], __shfl_xor_sync(0xffffffffu, mx[hh], 2));
      }
      online_softmax_step<kNTiles, kDTiles>(s, mx, m, l, o_acc);

      cp_async_wait<1>();  // V of this tile has landed (K of the next may be in flight)
      __syncthreads();
#pragma unroll
      for (int kk = 0; kk < kBlockN / 16; ++kk) {
        uint32_t pa[4];
        acc_to_a(s[2 * kk], s[2 * kk + 1], To16<kBf16>(), pa);
#pragma unroll
        for (int dp = 0; dp < kDTiles / 2; ++dp) {  // d-tiles 2 dp and 2 dp + 1
          uint32_t r[4];
          ldmatrix_x4_trans(r, sV + (kk * 16 + a_row) * kLd + dp * 16 + a_col);
          const uint32_t b0[2] = {r[0], r[1]}, b1[2] = {r[2], r[3]};
          mma_m16n8k16<kBf16>(o_acc[2 * dp], pa, b0);
          mma_m16n8k16<kBf16>(o_acc[2 * dp + 1], pa, b1);
        }
      }
      __syncthreads();  // every warp is done with sV
      if (has_next) cp_async_tile<kD, kBlockN, kThreads>(sV, v_base, p.v_st, c_next, L, tid);
      cp_async_commit();
    }
    cp_async_wait<0>();
  }

  uint16_t* o_base = p.out + static_cast<int64_t>(start) * p.o_st + h * p.o_sh;
#pragma unroll
  for (int hh = 0; hh < 2; ++hh) {
    l[hh] += __shfl_xor_sync(0xffffffffu, l[hh], 1);
    l[hh] += __shfl_xor_sync(0xffffffffu, l[hh], 2);
    const int32_t r = w.row0 + warp * 16 + frag_c_row(lane, 2 * hh);
    if (r >= L) continue;
    float inv_l, lse;
    finish_row(m[hh], l[hh], inv_l, lse);
    uint16_t* orow = o_base + static_cast<int64_t>(r) * p.o_st;
#pragma unroll
    for (int dt = 0; dt < kDTiles; ++dt) {
      const int col = dt * 8 + frag_c_col(lane, 2 * hh);  // even: a 4-byte aligned pair
      *reinterpret_cast<uint32_t*>(orow + col) =
          pack_f32x2<kBf16>(o_acc[dt][2 * hh] * inv_l, o_acc[dt][2 * hh + 1] * inv_l);
    }
    if (lane % 4 == 0) p.lse[static_cast<int64_t>(h) * p.T + start + r] = lse;
  }
}

template <bool kBf16, int kD>
void launch_fwd_impl(const FwdParams& p, int64_t slots, cudaStream_t stream) {
  using Tr = FwdTraits<kD>;
  auto kernel = partitioned_attention_fwd_kernel<kBf16, kD>;
  // Above 48 KiB (D = 128) dynamic shared memory must be opted into, once per device (a bit per
  // device ordinal; beyond 64 devices on every launch). No synchronisation either way.
  if constexpr (Tr::kSmemBytes > 48 * 1024) {
    static std::atomic<uint64_t> configured{0};
    int device = 0;
    C10_CUDA_CHECK(cudaGetDevice(&device));
    const uint64_t bit = device < 64 ? uint64_t{1} << device : 0;
    if (bit == 0 || (configured.load(std::memory_order_relaxed) & bit) == 0) {
      C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, Tr::kSmemBytes));
      configured.fetch_or(bit, std::memory_order_relaxed);
    }
  }
  const int64_t blocks = slots * p.Hq;  // <= 2^31 - 1, checked by the caller
  kernel<<<static_cast<unsigned>(blocks), Tr::kThreads, Tr::kSmemBytes, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace ugd_ops::cuda::attn
