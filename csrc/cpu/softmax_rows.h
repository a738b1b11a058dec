// The per-row element work of the attention tiles (the online softmax of the forward, P and dS and
// the row's delta of the backward) on one row of a key tile, vectorised with AVX-512 where the CPU has it.
//
// On the bf16 path this work, not the tile products, dominates the e-SNLI layout (short sequences,
// small tiles): a scalar exp per element cost more than the products on the bf16 units.
// Columns are relative to the tile: row s[0, cols), allowed columns [lo, hi) with lo < hi.
#pragma once

#include <c10/util/BFloat16.h>

#include <cstdint>

namespace ugd_ops::cpu {

// Online-softmax step of one row: m_new = max(m_old, max_{lo<=j<hi} scale s[j]);
// s[j] = exp(scale s[j] - m_new) on [lo, hi), 0 elsewhere; returns m_new, and the sum of s in *sum.
float softmax_row(float* s, int64_t cols, int64_t lo, int64_t hi, float scale, float m_old, float* sum);

// Backward of one row: p[j] = exp(scale p[j] - lse) on [lo, hi), else 0 (p holds q.k on entry);
// ds[j] = scale p[j] (ds[j] - delta) (ds holds dout.v on entry).
void p_ds_row(float* p, float* ds, int64_t cols, int64_t lo, int64_t hi, float scale, float lse, float delta);

// sum_x a[x] b[x] over D bf16 values, in fp32 (the backward's delta of one row: dout . out).
float dot_bf16_row(const c10::BFloat16* a, const c10::BFloat16* b, int64_t D);

}  // namespace ugd_ops::cpu
