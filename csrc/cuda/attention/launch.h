// Host entries of the CUDA attention launches, one declaration per kernel and, for the templated
// ones, per instantiation: each fwd_<dtype>_d<D>.cu / bwd_<dtype>_d<D>.cu file defines exactly one
// specialisation (so the eight compile in parallel, and a change to one rebuilds one file).
// Every launch goes on `stream`, without a host synchronisation.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "params.h"

namespace ugd_ops::cuda::attn {

// The forward's schedule (schedule.cu): tile_offsets[b] = sum over b' < b of num_tiles(L_b', tile),
// tile_offsets[B] = the total, in device memory. One block of kScheduleThreads threads.
void launch_tile_offsets(const int32_t* cu_seqlens, int32_t B, int32_t T, int32_t tile, int32_t* tile_offsets,
                         cudaStream_t stream);

// The forward kernel, grid `slots` x Hq blocks; slots = max_work_slots(T, B, kFwdBlockM).
template <bool kBf16, int kD>
void launch_fwd(const FwdParams& p, int64_t slots, cudaStream_t stream);
template <> void launch_fwd<true, 64>(const FwdParams& p, int64_t slots, cudaStream_t stream);
template <> void launch_fwd<true, 128>(const FwdParams& p, int64_t slots, cudaStream_t stream);
template <> void launch_fwd<false, 64>(const FwdParams& p, int64_t slots, cudaStream_t stream);
template <> void launch_fwd<false, 128>(const FwdParams& p, int64_t slots, cudaStream_t stream);

// The backward's preprocessing (bwd_prep.cu): delta and, in its first block, the tile schedule.
void launch_bwd_prep(const BwdParams& p, bool bf16, cudaStream_t stream);

// The backward's dk/dv pass and dq pass, grids p.max_tiles x Hkv and p.max_tiles x Hq.
template <bool kBf16, int kD>
void launch_bwd(const BwdParams& p, cudaStream_t stream);
template <> void launch_bwd<true, 64>(const BwdParams& p, cudaStream_t stream);
template <> void launch_bwd<true, 128>(const BwdParams& p, cudaStream_t stream);
template <> void launch_bwd<false, 64>(const BwdParams& p, cudaStream_t stream);
template <> void launch_bwd<false, 128>(const BwdParams& p, cudaStream_t stream);

}  // namespace ugd_ops::cuda::attn
