// bf16 tile products of the CPU attention kernels: C (fp32) = A (bf16) * B (bf16) [+ C], products
// exact in fp32 and summed in fp32, on the CPU's bf16 units.
//
// Three backends, chosen per call (bf16_backend()):
//   brgemm      PyTorch's exported batch-reduce GEMM micro-kernel (oneDNN ukernel), with B packed to
//               the VNNI layout, where at::native::cpublas::could_pack(bf16) says it runs on the bf16
//               units (AMX today). Without packing it falls back to a generic loop, far slower than
//               our own kernel (0.5 GFLOP/s measured on an AVX512-BF16 CPU), so it is never chosen
//               there by default.
//   avx512bf16  our register-blocked micro-kernel on vdpbf16ps (AVX512-BF16: 2 bf16 products per
//               fp32 lane per instruction), B packed as [K/2][N][2].
//   loop        neither: the callers keep their fp32-converted loop (tile_gemm.h).
// UGD_CPU_BF16_GEMM=brgemm|avx512bf16|loop overrides the choice (tests, benchmarks); brgemm forced
// on a CPU that cannot pack runs it unpacked (correct, slow), so its code path is tested anywhere.
//
// Operands: A row-major bf16 [M, K] with lda, K even (callers zero the pad column of an odd K, so a
// pad never meets a NaN); B is first packed from tensor rows by pack_rows / pack_rows_t into a
// buffer of packed_elems(K, N) values. C row-major fp32, only columns [0, N) are written.
#pragma once

#include <c10/util/BFloat16.h>

#include <cstdint>

namespace ugd_ops::cpu {

enum class Bf16Backend { kLoop, kAvx512Bf16, kBrgemm };

// The backend for this call: UGD_CPU_BF16_GEMM if set (an unknown value or avx512bf16 on a CPU
// without it is an error that says what to set), else brgemm where it packs, else avx512bf16 where
// the CPU has it, else loop.
Bf16Backend bf16_backend();
const char* bf16_backend_name(Bf16Backend b);
// What the CPU offers, for build_info: "amx+brgemm", "avx512bf16" or "none".
const char* cpu_bf16_units();

constexpr int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

struct PackedB {
  const c10::BFloat16* data;
  int64_t ld;  // backend-specific leading dimension
};

class Bf16Gemm {
 public:
  explicit Bf16Gemm(Bf16Backend backend);
  Bf16Backend backend() const { return backend_; }

  // Elements a packed B of K x N needs (K rounded up to even).
  static int64_t packed_elems(int64_t K, int64_t N) { return round_up(K, 2) * round_up(N, 16); }

  // B[k][x] = src[k * stride + x], k < n (K = n, rows past n are zero up to the even K), x < D (N = D).
  PackedB pack_rows(const c10::BFloat16* src, int64_t stride, int64_t n, int64_t D, c10::BFloat16* dst) const;
  // B[x][j] = src[j * stride + x]: the transpose, K = D (zero row past an odd D), N = n.
  PackedB pack_rows_t(const c10::BFloat16* src, int64_t stride, int64_t n, int64_t D, c10::BFloat16* dst) const;

  // C[M x N] (ldc) = A[M x K] (lda) * B[K x N] (+ C if add_c). K even; B packed with this K and N.
  void gemm(int64_t M, int64_t N, int64_t K, const c10::BFloat16* A, int64_t lda, PackedB B, float* C, int64_t ldc,
            bool add_c) const;

  // dst[x] = bf16(src[x]) rounded to nearest even, x < n.
  void to_bf16(const float* src, int64_t n, c10::BFloat16* dst) const;

  // Call once a thread is done with its products (brgemm holds the AMX tile state).
  void release() const;

 private:
  Bf16Backend backend_;
  bool vnni_ = false;   // brgemm: B packed (could_pack) or plain
  bool cvt_avx512_ = false;
};

}  // namespace ugd_ops::cpu
