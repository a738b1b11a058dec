// Register-blocked tile products for the CPU attention kernels (see tile_gemm.h).
//
// The build compiles for the baseline ISA (x86-64: SSE2). On x86-64 Linux with GCC the entry
// points are cloned for x86-64-v3 (AVX2 + FMA) and x86-64-v4 (AVX-512), and the loader picks the
// clone the CPU runs (an ifunc), so one binary uses the wide registers where they exist.
#include "tile_gemm.h"

namespace ugd_ops::cpu {
namespace {

#if defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 12 && defined(__x86_64__) && defined(__linux__)
#define UGD_ISA_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define UGD_ISA_CLONES
#endif

constexpr int kMR = 4;  // rows per micro-tile: kMR x kGemmNR accumulators stay in registers

// One MR x kGemmNR block of C. always_inline: it is compiled into each ISA clone of the caller.
template <typename T, int MR, bool TransA>
__attribute__((always_inline)) inline void micro_tile(int64_t K, const T* A, int64_t lda, const T* B, int64_t ldb,
                                                      T alpha, T beta, T* C, int64_t ldc) {
  T c[MR][kGemmNR] = {};
  for (int64_t k = 0; k < K; ++k) {
    const T* b = B + k * ldb;
    for (int i = 0; i < MR; ++i) {
      const T a = TransA ? A[k * lda + i] : A[i * lda + k];
#pragma omp simd
      for (int j = 0; j < kGemmNR; ++j) c[i][j] += a * b[j];
    }
  }
  for (int i = 0; i < MR; ++i) {
    T* cr = C + i * ldc;
    if (beta == T(0)) {
#pragma omp simd
      for (int j = 0; j < kGemmNR; ++j) cr[j] = alpha * c[i][j];
    } else {
#pragma omp simd
      for (int j = 0; j < kGemmNR; ++j) cr[j] = alpha * c[i][j] + beta * cr[j];
    }
  }
}

template <typename T, bool TransA>
__attribute__((always_inline)) inline void gemm_impl(int64_t M, int64_t N, int64_t K, T alpha, const T* A, int64_t lda,
                                                     const T* B, int64_t ldb, T beta, T* C, int64_t ldc) {
  // Row block i0 of op(A) starts at A + i0 (transposed) or A + i0 * lda.
  auto a_at = [&](int64_t i0) { return TransA ? A + i0 : A + i0 * lda; };
  for (int64_t j0 = 0; j0 < N; j0 += kGemmNR) {  // a K x kGemmNR panel of B stays in L1 across the rows
    int64_t i0 = 0;
    for (; i0 + kMR <= M; i0 += kMR)
      micro_tile<T, kMR, TransA>(K, a_at(i0), lda, B + j0, ldb, alpha, beta, C + i0 * ldc + j0, ldc);
    T* c = C + i0 * ldc + j0;
    switch (M - i0) {
      case 3: micro_tile<T, 3, TransA>(K, a_at(i0), lda, B + j0, ldb, alpha, beta, c, ldc); break;
      case 2: micro_tile<T, 2, TransA>(K, a_at(i0), lda, B + j0, ldb, alpha, beta, c, ldc); break;
      case 1: micro_tile<T, 1, TransA>(K, a_at(i0), lda, B + j0, ldb, alpha, beta, c, ldc); break;
      default: break;
    }
  }
  static_assert(kMR == 4, "the row remainder above handles kMR - 1 rows at most");
}

UGD_ISA_CLONES void gemm_f32(bool trans_a, int64_t M, int64_t N, int64_t K, float alpha, const float* A, int64_t lda,
                             const float* B, int64_t ldb, float beta, float* C, int64_t ldc) {
  if (trans_a)
    gemm_impl<float, true>(M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
  else
    gemm_impl<float, false>(M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
}

UGD_ISA_CLONES void gemm_f64(bool trans_a, int64_t M, int64_t N, int64_t K, double alpha, const double* A,
                             int64_t lda, const double* B, int64_t ldb, double beta, double* C, int64_t ldc) {
  if (trans_a)
    gemm_impl<double, true>(M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
  else
    gemm_impl<double, false>(M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
}

}  // namespace

void tile_gemm(bool trans_a, int64_t M, int64_t N, int64_t K, float alpha, const float* A, int64_t lda,
               const float* B, int64_t ldb, float beta, float* C, int64_t ldc) {
  gemm_f32(trans_a, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
}

void tile_gemm(bool trans_a, int64_t M, int64_t N, int64_t K, double alpha, const double* A, int64_t lda,
               const double* B, int64_t ldb, double beta, double* C, int64_t ldc) {
  gemm_f64(trans_a, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
}

}  // namespace ugd_ops::cpu
