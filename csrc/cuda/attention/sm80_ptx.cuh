// Device wrappers of the sm_80 instructions the attention kernels use: mma.sync m16n8k16 (bf16 / fp16
// in, fp32 accumulate), ldmatrix.x4 (.trans), cp.async (16 bytes, zero-filling) and its group waits,
// and the fp32 -> 16-bit conversions. The fragment layouts the mma expects are in mma_fragments.h (host-tested).
// Valid on sm_80 and later (sm_90 runs them unchanged).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

namespace ugd_ops::cuda::attn {

// d = a * b + d, a 16x16 (4 registers), b 16x8 (2 registers), d 16x8 fp32.
template <bool kBf16>
__device__ __forceinline__ void mma_m16n8k16(float d[4], const uint32_t a[4], const uint32_t b[2]) {
  if constexpr (kBf16) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  }
}

// Four 8x8 matrices of 16-bit values from shared memory (see ldsm_*_offset in mma_fragments.h
// for which lane gives which row address). "memory": the reads must stay after the __syncthreads
// that publishes the tile.
__device__ __forceinline__ void ldmatrix_x4(uint32_t r[4], const uint16_t* smem_row) {
  const uint32_t addr = static_cast<uint32_t>(__cvta_generic_to_shared(smem_row));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr)
               : "memory");
}
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t r[4], const uint16_t* smem_row) {
  const uint32_t addr = static_cast<uint32_t>(__cvta_generic_to_shared(smem_row));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr)
               : "memory");
}

// 16 bytes global -> shared, asynchronously. src_bytes = 0 reads nothing and writes 16 zero bytes
// (a row past the end of a sequence); the source address must still be a valid pointer value.
__device__ __forceinline__ void cp_async_16(void* smem_dst, const void* gmem_src, bool read) {
  const uint32_t dst = static_cast<uint32_t>(__cvta_generic_to_shared(smem_dst));
  const int src_bytes = read ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(gmem_src), "r"(src_bytes)
               : "memory");
}

__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }

// Waits until at most N of this thread's committed groups are still in flight.
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

// fp32 -> 16-bit bits, round to nearest even.
template <bool kBf16>
__device__ __forceinline__ uint16_t to16_bits(float x) {
  if constexpr (kBf16) {
    return __bfloat16_as_ushort(__float2bfloat16_rn(x));
  } else {
    return __half_as_ushort(__float2half_rn(x));
  }
}

template <bool kBf16>
struct To16 {
  __device__ __forceinline__ uint16_t operator()(float x) const { return to16_bits<kBf16>(x); }
};

// Two fp32 -> one packed register of two 16-bit values (x0 in the low half).
template <bool kBf16>
__device__ __forceinline__ uint32_t pack_f32x2(float x0, float x1) {
  return static_cast<uint32_t>(to16_bits<kBf16>(x0)) | (static_cast<uint32_t>(to16_bits<kBf16>(x1)) << 16);
}

}  // namespace ugd_ops::cuda::attn
