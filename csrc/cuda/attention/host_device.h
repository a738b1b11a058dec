// UGD_HD marks the helpers of the CUDA attention kernels that are plain C++ as well: under nvcc they
// are __host__ __device__ __forceinline__, under a host compiler plain inline functions. Headers made
// of such helpers (schedule.h, tile_bounds.h, mma_fragments.h, online_softmax.h, params.h,
// bwd_schedule.h, bwd_tile_io.h) include no torch or CUDA header, so csrc/tests/ builds them with g++
// and checks the same code the GPU runs.
#pragma once

#if defined(__CUDACC__)
#define UGD_HD __host__ __device__ __forceinline__
#else
#define UGD_HD inline
#endif
