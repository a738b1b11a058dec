// The scheduling kernel of the CUDA attention kernels: tile_offsets[b] = number of tiles of the
// sequences before b (tiles of `tile` rows), in one block, on the stream, without a host sync.
// Each thread scans a contiguous chunk of sequences, thread 0 prefix-sums the 256 chunk counts,
// then each thread writes its chunk's offsets (schedule.h; the host test replays it).
#include <c10/cuda/CUDAException.h>
#include <cuda_runtime.h>

#include "launch.h"
#include "schedule.h"

namespace ugd_ops::cuda::attn {
namespace {

__global__ void __launch_bounds__(kScheduleThreads)
    tile_offsets_kernel(const int32_t* __restrict__ cu, int32_t B, int32_t T, int32_t tile,
                        int32_t* __restrict__ tile_offsets) {
  __shared__ int32_t base[kScheduleThreads];
  const int32_t tid = threadIdx.x;
  int32_t b0, b1;
  schedule_chunk(tid, kScheduleThreads, B, b0, b1);
  base[tid] = chunk_tile_count(cu, T, b0, b1, tile);
  __syncthreads();
  if (tid == 0) {
    int32_t run = 0;
    for (int i = 0; i < kScheduleThreads; ++i) {
      const int32_t n = base[i];
      base[i] = run;
      run += n;
    }
    if (B == 0) tile_offsets[0] = 0;
  }
  __syncthreads();
  chunk_write_offsets(cu, T, B, b0, b1, tile, base[tid], tile_offsets);
}

}  // namespace

void launch_tile_offsets(const int32_t* cu_seqlens, int32_t B, int32_t T, int32_t tile, int32_t* tile_offsets,
                         cudaStream_t stream) {
  tile_offsets_kernel<<<1, kScheduleThreads, 0, stream>>>(cu_seqlens, B, T, tile, tile_offsets);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace ugd_ops::cuda::attn
