// Host entry of the scheduling kernel (schedule.cu), for the forward and the backward alike.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace ugd_ops::cuda::attn {

// Fills tile_offsets[0..B] (device memory) on `stream`: tile_offsets[b] = sum over b' < b of
// num_tiles(L_b', tile), tile_offsets[B] = the total. One block of 256 threads, no host sync.
// A kernel then takes grid max_work_slots(T, B, tile) and calls find_work_item (attention_common.h).
void launch_tile_offsets(const int32_t* cu_seqlens, int32_t B, int32_t T, int32_t tile, int32_t* tile_offsets,
                         cudaStream_t stream);

}  // namespace ugd_ops::cuda::attn
