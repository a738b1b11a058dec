// The online-softmax steps of the CUDA attention forward, per lane; the row max / sum reductions
// over the 4 lanes of a quad happen between them (shuffles on the device, an emulation on the host).
// Online softmax (log2 domain: x = s * scale * log2(e), p = 2^(x - m), lse = (m + log2 l) * ln 2):
//   softmax_base(m)           the subtrahend for exponentials: m, or 0 when m = -inf (a row that has
//                             read nothing yet: 2^(-inf - 0) = 0 instead of NaN)
//   finish_row(m, l, ...)     inverse normaliser and lse; l == 0 (empty interval) gives out 0, lse -inf
// Plain C++ marked UGD_HD (host_device.h): csrc/tests/test_cuda_attention_plan.cpp runs them.
#pragma once

#include <cmath>
#include <cstdint>

#include "host_device.h"
#include "mma_fragments.h"
#include "tile_bounds.h"

namespace ugd_ops::cuda::attn {

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

UGD_HD float neg_inf_f() { return -INFINITY; }

UGD_HD float softmax_base(float m) { return m == neg_inf_f() ? 0.0f : m; }

UGD_HD float fmax_f(float a, float b) { return a < b ? b : a; }

// Masks, scales (to the log2 domain) and row-maxes the C fragments of one key tile for the lane's two
// rows (e / 2 = 0: row g, 1: row g + 8). s[nt][e] is column c0 + 8 nt + frag_c_col(lane, e). Masked
// elements become -inf. Returns the lane's partial row maxima in mx[2] (-inf when nothing allowed).
template <int kNTiles>
UGD_HD void mask_scale_rowmax(float (*s)[4], int lane, int32_t c0, bool unmasked, const int32_t lo[2],
                                     const int32_t hi[2], float scale_log2, float mx[2]) {
  mx[0] = mx[1] = neg_inf_f();
  for (int nt = 0; nt < kNTiles; ++nt) {
    for (int e = 0; e < 4; ++e) {
      const int h = e / 2;
      const int32_t j = c0 + 8 * nt + frag_c_col(lane, e);
      const float x = (unmasked || col_allowed(lo[h], hi[h], j)) ? s[nt][e] * scale_log2 : neg_inf_f();
      s[nt][e] = x;
      mx[h] = fmax_f(mx[h], x);
    }
  }
}

// With the quad-reduced tile maxima, updates the running max m[2], rescales the running sum l[2]
// and the output accumulators o[kDTiles][4], and turns s into p = 2^(x - m_new) (0 where masked),
// adding the lane's part of each row sum to l.
template <int kNTiles, int kDTiles>
UGD_HD void online_softmax_step(float (*s)[4], const float tile_max[2], float m[2], float l[2],
                                       float (*o)[4]) {
  float base[2], alpha[2];
  for (int h = 0; h < 2; ++h) {
    const float m_new = fmax_f(m[h], tile_max[h]);
    base[h] = softmax_base(m_new);
    // m[h] = -inf before the row's first non-empty tile: 2^(-inf) = 0 clears nothing (o and l are 0).
    alpha[h] = exp2f(m[h] - base[h]);
    m[h] = m_new;
    l[h] *= alpha[h];
  }
  for (int dt = 0; dt < kDTiles; ++dt)
    for (int e = 0; e < 4; ++e) o[dt][e] *= alpha[e / 2];
  for (int nt = 0; nt < kNTiles; ++nt) {
    for (int e = 0; e < 4; ++e) {
      const float p = exp2f(s[nt][e] - base[e / 2]);  // exp2(-inf) = 0 for masked elements
      s[nt][e] = p;
      l[e / 2] += p;
    }
  }
}

// From a row's final max m (log2 domain) and quad-reduced sum l: the factor for the output and the
// natural-log lse. An empty interval (l == 0) gives factor 0 and lse -inf.
UGD_HD void finish_row(float m, float l, float& inv_l, float& lse) {
  const bool empty = !(l > 0.0f);
  inv_l = empty ? 0.0f : 1.0f / l;
  lse = empty ? neg_inf_f() : (m + log2f(l)) * kLn2;
}

}  // namespace ugd_ops::cuda::attn
