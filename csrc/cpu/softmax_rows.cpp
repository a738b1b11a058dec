// Per-row softmax work of the attention tiles (see softmax_rows.h): AVX-512 where the CPU has it
// (cpu_isa.h), else the scalar loop of the fp32 kernels.
#include "softmax_rows.h"

#include <algorithm>
#include <cmath>
#include <limits>

#include "cpu_isa.h"

#if UGD_HAVE_AVX512BF16_CODE
#include <immintrin.h>
#endif

namespace ugd_ops::cpu {
namespace {

float softmax_row_scalar(float* s, int64_t cols, int64_t lo, int64_t hi, float scale, float m_old, float* sum) {
  float m_new = m_old;
  for (int64_t j = lo; j < hi; ++j) m_new = std::max(m_new, scale * s[j]);
  float row_sum = 0;
  for (int64_t j = 0; j < cols; ++j) {
    const float p = (j >= lo && j < hi) ? std::exp(scale * s[j] - m_new) : 0.f;
    s[j] = p;
    row_sum += p;
  }
  *sum = row_sum;
  return m_new;
}

void p_ds_row_scalar(float* p, float* ds, int64_t cols, int64_t lo, int64_t hi, float scale, float lse, float delta) {
  for (int64_t j = 0; j < cols; ++j) {
    const float pj = (j >= lo && j < hi) ? std::exp(scale * p[j] - lse) : 0.f;
    p[j] = pj;
    ds[j] = scale * pj * (ds[j] - delta);
  }
}

#if UGD_HAVE_AVX512BF16_CODE
// exp(x) for x <= 0 (and moderately positive x) in fp32: x = n ln2 + r, |r| <= ln2 / 2, exp(r) by its
// degree-6 Taylor polynomial (truncation below 2e-7 relative, about an fp32 ulp), times 2^n by
// vscalefps (which gives 0 for large negative n, so exp(-inf) and exp of very negative x are 0).
UGD_TARGET_AVX512BF16 inline __m512 exp_ps(__m512 x) {
  const __m512 log2e = _mm512_set1_ps(1.44269504088896341f);
  const __m512 ln2_hi = _mm512_set1_ps(0.693359375f), ln2_lo = _mm512_set1_ps(-2.12194440e-4f);
  x = _mm512_max_ps(x, _mm512_set1_ps(-104.f));  // exp underflows to 0 below about -103.3
  x = _mm512_min_ps(x, _mm512_set1_ps(88.7f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, log2e), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, ln2_hi, x);
  r = _mm512_fnmadd_ps(n, ln2_lo, r);
  __m512 p = _mm512_set1_ps(1.f / 720);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 120));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 24));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 6));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
  return _mm512_scalef_ps(p, n);
}

// Lanes [j, j + 16) of the row that lie in [lo, hi).
UGD_TARGET_AVX512BF16 inline __mmask16 allowed(int64_t j, int64_t lo, int64_t hi) {
  const int64_t a = std::max<int64_t>(lo - j, 0), b = std::min<int64_t>(hi - j, 16);
  if (a >= b) return 0;
  const uint32_t upto_b = b >= 16 ? 0xFFFFu : ((1u << b) - 1);
  return __mmask16(upto_b & ~((1u << a) - 1));
}

UGD_TARGET_AVX512BF16 float softmax_row_avx512(float* s, int64_t cols, int64_t lo, int64_t hi, float scale,
                                              float m_old, float* sum) {
  const __m512 vs = _mm512_set1_ps(scale);
  __m512 vmax = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  for (int64_t j = lo & ~int64_t(15); j < hi; j += 16) {
    const __mmask16 m = allowed(j, lo, hi);
    vmax = _mm512_mask_max_ps(vmax, m, vmax, _mm512_mul_ps(vs, _mm512_maskz_loadu_ps(m, s + j)));
  }
  const float m_new = std::max(m_old, _mm512_reduce_max_ps(vmax));
  const __m512 vm = _mm512_set1_ps(m_new);
  __m512 vsum = _mm512_setzero_ps();
  for (int64_t j = 0; j < cols; j += 16) {
    const __mmask16 in_row = cols - j >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (cols - j)) - 1);
    const __mmask16 m = allowed(j, lo, hi);
    const __m512 x = _mm512_fmsub_ps(vs, _mm512_maskz_loadu_ps(m, s + j), vm);
    const __m512 p = _mm512_maskz_mov_ps(m, exp_ps(x));
    vsum = _mm512_add_ps(vsum, p);
    _mm512_mask_storeu_ps(s + j, in_row, p);
  }
  *sum = _mm512_reduce_add_ps(vsum);
  return m_new;
}

UGD_TARGET_AVX512BF16 void p_ds_row_avx512(float* p, float* ds, int64_t cols, int64_t lo, int64_t hi, float scale,
                                          float lse, float delta) {
  const __m512 vs = _mm512_set1_ps(scale), vl = _mm512_set1_ps(lse), vd = _mm512_set1_ps(delta);
  for (int64_t j = 0; j < cols; j += 16) {
    const __mmask16 in_row = cols - j >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (cols - j)) - 1);
    const __mmask16 m = allowed(j, lo, hi);
    const __m512 x = _mm512_fmsub_ps(vs, _mm512_maskz_loadu_ps(m, p + j), vl);
    const __m512 pj = _mm512_maskz_mov_ps(m, exp_ps(x));
    const __m512 d = _mm512_sub_ps(_mm512_maskz_loadu_ps(in_row, ds + j), vd);
    _mm512_mask_storeu_ps(p + j, in_row, pj);
    _mm512_mask_storeu_ps(ds + j, in_row, _mm512_mul_ps(_mm512_mul_ps(vs, pj), d));
  }
}

// bf16 to fp32 is a 16-bit shift; 16 values a step, 0 past D.
UGD_TARGET_AVX512BF16 float dot_bf16_avx512(const c10::BFloat16* a, const c10::BFloat16* b, int64_t D) {
  __m512 acc = _mm512_setzero_ps();
  for (int64_t x = 0; x < D; x += 16) {
    const __mmask16 m = D - x >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (D - x)) - 1);
    const __m512i ia = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, a + x));
    const __m512i ib = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, b + x));
    const __m512 va = _mm512_castsi512_ps(_mm512_slli_epi32(ia, 16));
    const __m512 vb = _mm512_castsi512_ps(_mm512_slli_epi32(ib, 16));
    acc = _mm512_fmadd_ps(va, vb, acc);
  }
  return _mm512_reduce_add_ps(acc);
}
#endif  // UGD_HAVE_AVX512BF16_CODE

}  // namespace

float dot_bf16_row(const c10::BFloat16* a, const c10::BFloat16* b, int64_t D) {
#if UGD_HAVE_AVX512BF16_CODE
  if (cpu_has_avx512bf16()) return dot_bf16_avx512(a, b, D);
#endif
  float s = 0;
  for (int64_t x = 0; x < D; ++x) s += static_cast<float>(a[x]) * static_cast<float>(b[x]);
  return s;
}

float softmax_row(float* s, int64_t cols, int64_t lo, int64_t hi, float scale, float m_old, float* sum) {
#if UGD_HAVE_AVX512BF16_CODE
  if (cpu_has_avx512bf16()) return softmax_row_avx512(s, cols, lo, hi, scale, m_old, sum);
#endif
  return softmax_row_scalar(s, cols, lo, hi, scale, m_old, sum);
}

void p_ds_row(float* p, float* ds, int64_t cols, int64_t lo, int64_t hi, float scale, float lse, float delta) {
#if UGD_HAVE_AVX512BF16_CODE
  if (cpu_has_avx512bf16()) {
    p_ds_row_avx512(p, ds, cols, lo, hi, scale, lse, delta);
    return;
  }
#endif
  p_ds_row_scalar(p, ds, cols, lo, hi, scale, lse, delta);
}

}  // namespace ugd_ops::cpu
