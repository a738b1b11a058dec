// The preprocessing launch of the CUDA attention backward (before the two compute launches of
// bwd_kernel.cuh), one kernel for every head dim:
//   - block 0 builds the tile schedule of the packed batch (bwd_schedule.h) on the device;
//   - the other blocks compute delta = rowsum(dout * out) - dlse per (row, head), a warp per row.
#include <c10/cuda/CUDAException.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "bwd_schedule.h"
#include "launch.h"
#include "params.h"
#include "schedule.h"

namespace ugd_ops::cuda::attn {
namespace {

constexpr int kPrepThreads = kScheduleThreads;  // the schedule block is one of these blocks
constexpr int kPrepWarps = kPrepThreads / 32;
constexpr int64_t kMaxDeltaBlocks = 4096;  // rows past blocks * 8 are reached by a grid-stride loop

template <bool kBf16>
__device__ __forceinline__ float to_float(uint16_t x) {
  if constexpr (kBf16) {
    return __uint_as_float(static_cast<uint32_t>(x) << 16);
  } else {
    return __half2float(__ushort_as_half(x));
  }
}

// The schedule, by one block: per-thread tile counts of a chunk of sequences, their prefix sum,
// the tile headers, then each tile's reach from its rows' intervals -- the functions of
// build_schedule_reference (bwd_schedule.h), which the C++ tests check.
__device__ void build_schedule(const BwdParams& p) {
  __shared__ int32_t scan[kPrepThreads];
  const int tid = threadIdx.x;
  const int32_t T = static_cast<int32_t>(p.T);
  int32_t b0, b1;
  schedule_chunk(tid, kPrepThreads, p.B, b0, b1);
  const int32_t local = chunk_tile_count(p.cu_seqlens, T, b0, b1, kBwdTile);
  scan[tid] = local;
  __syncthreads();
  for (int off = 1; off < kPrepThreads; off <<= 1) {  // inclusive Hillis-Steele scan
    const int32_t add = tid >= off ? scan[tid - off] : 0;
    __syncthreads();
    scan[tid] += add;
    __syncthreads();
  }
  const int64_t total = min(static_cast<int64_t>(scan[kPrepThreads - 1]), p.max_tiles);
  write_chunk_headers(p.cu_seqlens, T, b0, b1, scan[tid] - local, total, p.tiles);
  if (tid == 0) *p.num_tiles = static_cast<int32_t>(total);
  __syncthreads();  // the headers (global memory) are visible to the whole block
  for (int64_t t = tid; t < total; t += kPrepThreads) tile_reach(p.tiles[t], p.kv_start, p.kv_end);
}

template <bool kBf16>
__global__ void __launch_bounds__(kPrepThreads) bwd_prep_kernel(const BwdParams p) {
  // Block 0 builds the schedule: blocks start roughly in index order, so the one serial block of
  // the launch starts first and overlaps the delta blocks instead of running after them.
  if (blockIdx.x == 0) {
    build_schedule(p);
    return;
  }
  const int lane = threadIdx.x % 32;
  const int64_t rows = p.T * p.Hq;
  const int64_t stride = static_cast<int64_t>(gridDim.x - 1) * kPrepWarps;
  // A warp per (row, head), uniform over its lanes (the full-mask shuffles below need all 32).
  for (int64_t idx = static_cast<int64_t>(blockIdx.x - 1) * kPrepWarps + threadIdx.x / 32; idx < rows; idx += stride) {
    const int64_t i = idx / p.Hq;
    const int h = static_cast<int>(idx % p.Hq);
    const uint16_t* a = p.dout + i * p.do_st + h * p.do_sh;
    const uint16_t* b = p.out + i * p.o_st + h * p.o_sh;
    float dot = 0.0f;
    for (int x = lane; x < p.D; x += 32) dot += to_float<kBf16>(a[x]) * to_float<kBf16>(b[x]);
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) dot += __shfl_xor_sync(0xffffffffu, dot, off);
    if (lane == 0) {
      const int64_t o = h * p.T + i;
      p.delta[o] = delta_value(dot, p.dlse != nullptr ? p.dlse[o] : 0.0f);
    }
  }
}

}  // namespace

void launch_bwd_prep(const BwdParams& p, bool bf16, cudaStream_t stream) {
  const int64_t delta_blocks = std::min<int64_t>((p.T * p.Hq + kPrepWarps - 1) / kPrepWarps, kMaxDeltaBlocks);
  const unsigned grid = static_cast<unsigned>(delta_blocks + 1);  // + the schedule block
  if (bf16) {
    bwd_prep_kernel<true><<<grid, kPrepThreads, 0, stream>>>(p);
  } else {
    bwd_prep_kernel<false><<<grid, kPrepThreads, 0, stream>>>(p);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace ugd_ops::cuda::attn
