// The tile products of the CPU attention kernels: C = alpha * op(A) * B + beta * C on small dense
// row-major buffers (up to 64 x 64 x head dim), as a plain register-blocked loop.
//
// Why not ATen (addmm) or the CPU BLAS: these products are a few microseconds of math each, and an
// ATen call per tile cost about as much again in dispatch, view and transpose overhead.
// The typed at::native::cpublas::gemm that would reach the BLAS directly is not exported by torch.
#pragma once

#include <cstdint>

namespace ugd_ops::cpu {

// Columns per micro-tile. N is rounded up to a multiple of it: B must be readable and C writable
// in columns [N, gemm_padded(N)) (their values there are don't-care, C's are overwritten).
constexpr int64_t kGemmNR = 16;
constexpr int64_t gemm_padded(int64_t n) { return (n + kGemmNR - 1) / kGemmNR * kGemmNR; }

// C[M x N] (ldc) = alpha * op(A) * B[K x N] (ldb) + beta * C, all row-major. op(A) is A[M x K] (lda)
// or, with trans_a, the transpose of A[K x M] (lda). beta == 0 does not read C. Accumulates in T.
void tile_gemm(bool trans_a, int64_t M, int64_t N, int64_t K, float alpha, const float* A, int64_t lda,
               const float* B, int64_t ldb, float beta, float* C, int64_t ldc);
void tile_gemm(bool trans_a, int64_t M, int64_t N, int64_t K, double alpha, const double* A, int64_t lda,
               const double* B, int64_t ldb, double beta, double* C, int64_t ldc);

}  // namespace ugd_ops::cpu
