// bf16 tile products of the CPU attention kernels (see bf16_gemm.h).
//
// The AVX512-BF16 code is compiled with a target attribute, not for the whole file, and runs only
// where the CPU reports avx512bf16 (cpu_isa.h), so one binary serves every x86-64 CPU.
#include "bf16_gemm.h"

#include <ATen/native/CPUBlas.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "cpu_isa.h"

#if UGD_HAVE_AVX512BF16_CODE
#include <immintrin.h>
#define UGD_TARGET_BF16 UGD_TARGET_AVX512BF16
#endif

namespace ugd_ops::cpu {
namespace {

bool brgemm_packs() {
  static const bool packs = at::native::cpublas::could_pack(at::kBFloat16);
  return packs;
}

using bf16 = c10::BFloat16;

#if UGD_HAVE_AVX512BF16_CODE
// B packed for vdpbf16ps: pair row p holds (B[2p][j], B[2p+1][j]) for each column j, 16-column
// aligned (zeros past N), so a 32-bit lane carries the two products of one column.
constexpr int kMR = 6;  // rows per micro-tile: 6 x 2 vectors = 12 accumulators of 32 zmm registers

template <int MR, int NV>
UGD_TARGET_BF16 __attribute__((always_inline)) inline void micro_tile(int64_t K2, const bf16* A, int64_t lda,
                                                                      const bf16* B, int64_t ldb2, float* C,
                                                                      int64_t ldc, __mmask16 last, bool add_c) {
  __m512 acc[MR][NV];
  for (int i = 0; i < MR; ++i)
    for (int v = 0; v < NV; ++v) acc[i][v] = _mm512_setzero_ps();
  for (int64_t p = 0; p < K2; ++p) {
    __m512bh b[NV];
    for (int v = 0; v < NV; ++v) b[v] = (__m512bh)_mm512_loadu_si512(B + p * ldb2 + v * 32);
    for (int i = 0; i < MR; ++i) {
      int32_t pair;
      std::memcpy(&pair, A + i * lda + 2 * p, sizeof(pair));
      const __m512bh a = (__m512bh)_mm512_set1_epi32(pair);
      for (int v = 0; v < NV; ++v) acc[i][v] = _mm512_dpbf16_ps(acc[i][v], a, b[v]);
    }
  }
  for (int i = 0; i < MR; ++i)
    for (int v = 0; v < NV; ++v) {
      float* c = C + i * ldc + v * 16;
      const __mmask16 m = v == NV - 1 ? last : __mmask16(0xFFFF);
      __m512 r = acc[i][v];
      if (add_c) r = _mm512_add_ps(r, _mm512_maskz_loadu_ps(m, c));
      _mm512_mask_storeu_ps(c, m, r);
    }
}

template <int NV>
UGD_TARGET_BF16 __attribute__((always_inline)) inline void column_panel(int64_t M, int64_t K2, const bf16* A,
                                                                        int64_t lda, const bf16* B, int64_t ldb2,
                                                                        float* C, int64_t ldc, __mmask16 last,
                                                                        bool add_c) {
  int64_t i = 0;
  for (; i + kMR <= M; i += kMR) micro_tile<kMR, NV>(K2, A + i * lda, lda, B, ldb2, C + i * ldc, ldc, last, add_c);
  const bf16* a = A + i * lda;
  float* c = C + i * ldc;
  switch (M - i) {
    case 5: micro_tile<5, NV>(K2, a, lda, B, ldb2, c, ldc, last, add_c); break;
    case 4: micro_tile<4, NV>(K2, a, lda, B, ldb2, c, ldc, last, add_c); break;
    case 3: micro_tile<3, NV>(K2, a, lda, B, ldb2, c, ldc, last, add_c); break;
    case 2: micro_tile<2, NV>(K2, a, lda, B, ldb2, c, ldc, last, add_c); break;
    case 1: micro_tile<1, NV>(K2, a, lda, B, ldb2, c, ldc, last, add_c); break;
    default: break;
  }
  static_assert(kMR == 6, "the row remainder above handles kMR - 1 rows at most");
}

UGD_TARGET_BF16 void gemm_avx512bf16(int64_t M, int64_t N, int64_t K, const bf16* A, int64_t lda, const bf16* B,
                                     int64_t ldb, float* C, int64_t ldc, bool add_c) {
  const int64_t K2 = K / 2, ldb2 = 2 * ldb;  // ldb: columns of a pair row; a pair row is 2 ldb values
  int64_t j = 0;
  for (; j + 32 <= N; j += 32)
    column_panel<2>(M, K2, A, lda, B + 2 * j, ldb2, C + j, ldc, __mmask16(0xFFFF), add_c);
  if (j < N) {
    const int64_t rest = N - j;  // 1..31 columns
    if (rest > 16) {
      const __mmask16 last = __mmask16((1u << (rest - 16)) - 1);
      column_panel<2>(M, K2, A, lda, B + 2 * j, ldb2, C + j, ldc, last, add_c);
    } else {
      const __mmask16 last = rest == 16 ? __mmask16(0xFFFF) : __mmask16((1u << rest) - 1);
      column_panel<1>(M, K2, A, lda, B + 2 * j, ldb2, C + j, ldc, last, add_c);
    }
  }
}

// pack_rows for vdpbf16ps: rows 2p and 2p + 1 interleaved element by element, 16 columns per step
// (one permute of the two 16-value halves), zeros past D and past n.
UGD_TARGET_BF16 void pack_rows_avx512(const bf16* src, int64_t stride, int64_t n, int64_t D, bf16* dst, int64_t ld) {
  alignas(64) static constexpr int16_t kInterleave[32] = {0, 16, 1, 17, 2,  18, 3,  19, 4,  20, 5,  21, 6,  22, 7,  23,
                                                          8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31};
  const __m512i idx = _mm512_load_si512(kInterleave);
  for (int64_t k = 0; k < n; k += 2) {
    const bf16* r0 = src + k * stride;
    const bf16* r1 = k + 1 < n ? r0 + stride : nullptr;
    bf16* d = dst + k * ld;  // pair row k / 2 starts at (k / 2) * 2 * ld
    for (int64_t x = 0; x < ld; x += 16) {
      const __mmask16 m = D - x >= 16 ? __mmask16(0xFFFF) : D > x ? __mmask16((1u << (D - x)) - 1) : __mmask16(0);
      const __m256i a = _mm256_maskz_loadu_epi16(m, r0 + x);
      const __m256i b = r1 != nullptr ? _mm256_maskz_loadu_epi16(m, r1 + x) : _mm256_setzero_si256();
      const __m512i v = _mm512_inserti64x4(_mm512_castsi256_si512(a), b, 1);
      _mm512_storeu_si512(d + 2 * x, _mm512_permutexvar_epi16(idx, v));
    }
  }
}

UGD_TARGET_BF16 void to_bf16_avx512(const float* src, int64_t n, bf16* dst) {
  int64_t x = 0;
  for (; x + 16 <= n; x += 16) {
    const __m256bh h = _mm512_cvtneps_pbh(_mm512_loadu_ps(src + x));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + x), (__m256i)h);
  }
  if (x < n) {
    const __mmask16 m = __mmask16((1u << (n - x)) - 1);
    const __m256bh h = _mm512_cvtneps_pbh(_mm512_maskz_loadu_ps(m, src + x));
    _mm256_mask_storeu_epi16(dst + x, m, (__m256i)h);
  }
}
#endif  // UGD_HAVE_AVX512BF16_CODE

// A buffer for brgemm's plain B before it is packed (one per thread).
std::vector<bf16>& plain_scratch(int64_t n) {
  thread_local std::vector<bf16> buf;
  if (static_cast<int64_t>(buf.size()) < n) buf.resize(n);
  return buf;
}

}  // namespace

const char* bf16_backend_name(Bf16Backend b) {
  switch (b) {
    case Bf16Backend::kBrgemm: return "brgemm";
    case Bf16Backend::kAvx512Bf16: return "avx512bf16";
    default: return "loop";
  }
}

const char* cpu_bf16_units() { return brgemm_packs() ? "amx+brgemm" : cpu_has_avx512bf16() ? "avx512bf16" : "none"; }

Bf16Backend bf16_backend() {
  // Read per call (a getenv is nanoseconds), so a test or benchmark can switch it in one process.
  const char* env = std::getenv("UGD_CPU_BF16_GEMM");
  if (env != nullptr && *env != '\0') {
    const std::string v(env);
    if (v == "loop") return Bf16Backend::kLoop;
    if (v == "brgemm") return Bf16Backend::kBrgemm;
    if (v == "avx512bf16") {
      TORCH_CHECK_VALUE(cpu_has_avx512bf16(), "ugd_ops: UGD_CPU_BF16_GEMM=avx512bf16 but this CPU has no "
                        "avx512_bf16; unset it or set it to loop or brgemm");
      return Bf16Backend::kAvx512Bf16;
    }
    TORCH_CHECK_VALUE(false, "ugd_ops: UGD_CPU_BF16_GEMM must be brgemm, avx512bf16 or loop, got '", v, "'");
  }
  if (brgemm_packs()) return Bf16Backend::kBrgemm;
  if (cpu_has_avx512bf16()) return Bf16Backend::kAvx512Bf16;
  return Bf16Backend::kLoop;
}

Bf16Gemm::Bf16Gemm(Bf16Backend backend)
    : backend_(backend), vnni_(backend == Bf16Backend::kBrgemm && brgemm_packs()), cvt_avx512_(cpu_has_avx512bf16()) {
  TORCH_CHECK(backend != Bf16Backend::kLoop, "ugd_ops: internal error: Bf16Gemm without a bf16 backend");
}

PackedB Bf16Gemm::pack_rows(const bf16* src, int64_t stride, int64_t n, int64_t D, bf16* dst) const {
  const int64_t K2 = round_up(n, 2);
#if UGD_HAVE_AVX512BF16_CODE
  if (backend_ == Bf16Backend::kAvx512Bf16) {
    const int64_t ld = round_up(D, 16);
    pack_rows_avx512(src, stride, n, D, dst, ld);
    return {dst, ld};
  }
#endif
  // brgemm: plain [K2, D], packed when the CPU packs.
  bf16* plain = vnni_ ? plain_scratch(K2 * D).data() : dst;
  for (int64_t k = 0; k < n; ++k) std::memcpy(plain + k * D, src + k * stride, D * sizeof(bf16));
  if (K2 > n) std::fill(plain + n * D, plain + K2 * D, bf16(0.f));
  if (vnni_) at::native::cpublas::pack(K2, D, D, D, at::kBFloat16, at::kBFloat16, plain, dst);
  return {dst, D};
}

PackedB Bf16Gemm::pack_rows_t(const bf16* src, int64_t stride, int64_t n, int64_t D, bf16* dst) const {
  const int64_t K2 = round_up(D, 2);
  if (backend_ == Bf16Backend::kAvx512Bf16) {  // plain C++: 32-bit words, no AVX-512 needed
    // Pair row p, column j: (src[j][2p], src[j][2p + 1]), one 32-bit word of row j.
    const int64_t ld = round_up(n, 16);
    for (int64_t p = 0; p < K2 / 2; ++p) {
      bf16* d = dst + p * 2 * ld;
      const int64_t x = 2 * p;
      if (x + 1 < D) {
        for (int64_t j = 0; j < n; ++j) std::memcpy(d + 2 * j, src + j * stride + x, 2 * sizeof(bf16));
      } else {  // the last pair of an odd D
        for (int64_t j = 0; j < n; ++j) {
          d[2 * j] = src[j * stride + x];
          d[2 * j + 1] = bf16(0.f);
        }
      }
      std::fill(d + 2 * n, d + 2 * ld, bf16(0.f));
    }
    return {dst, ld};
  }
  bf16* plain = vnni_ ? plain_scratch(K2 * n).data() : dst;
  for (int64_t j = 0; j < n; ++j)
    for (int64_t x = 0; x < D; ++x) plain[x * n + j] = src[j * stride + x];
  if (K2 > D) std::fill(plain + D * n, plain + K2 * n, bf16(0.f));
  if (vnni_) at::native::cpublas::pack(K2, n, n, n, at::kBFloat16, at::kBFloat16, plain, dst);
  return {dst, n};
}

void Bf16Gemm::gemm(int64_t M, int64_t N, int64_t K, const bf16* A, int64_t lda, PackedB B, float* C, int64_t ldc,
                    bool add_c) const {
  if (M == 0 || N == 0) return;
  if (K == 0) {
    if (!add_c)
      for (int64_t i = 0; i < M; ++i) std::fill(C + i * ldc, C + i * ldc + N, 0.f);
    return;
  }
#if UGD_HAVE_AVX512BF16_CODE
  if (backend_ == Bf16Backend::kAvx512Bf16) {
    gemm_avx512bf16(M, N, K, A, lda, B.data, B.ld, C, ldc, add_c);
    return;
  }
#endif
  at::native::cpublas::brgemm(M, N, K, lda, B.ld, ldc, add_c, A, B.data, C, vnni_);
}

void Bf16Gemm::to_bf16(const float* src, int64_t n, bf16* dst) const {
#if UGD_HAVE_AVX512BF16_CODE
  if (cvt_avx512_) {
    to_bf16_avx512(src, n, dst);
    return;
  }
#endif
  for (int64_t x = 0; x < n; ++x) dst[x] = bf16(src[x]);
}

void Bf16Gemm::release() const {
  if (backend_ == Bf16Backend::kBrgemm) at::native::cpublas::brgemm_release(vnni_);
}

}  // namespace ugd_ops::cpu
