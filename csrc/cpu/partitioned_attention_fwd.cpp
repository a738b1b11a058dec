// CPU forward of ugd_ops::partitioned_attention_fwd.
//
// Flash-style: each work item is one (query tile, query head); it streams the key tiles its rows
// can reach with an online softmax in acc_t (fp32, fp64 for fp64 inputs). Key tiles no row of the
// tile reaches are skipped; tiles inside every row's interval skip the per-row bounds. The two
// tile products (S = Q K^T, O += P V) are tile_gemm's register-blocked loops on dense buffers: K is
// loaded transposed, rows of D values are padded to gemm_padded(D) with zeros.
#define TORCH_ASSERT_ONLY_METHOD_OPERATORS
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <cmath>
#include <limits>
#include <tuple>

#include "../common/checks.h"
#include "attention_bf16.h"
#include "attention_tiles.h"
#include "tile_gemm.h"

namespace ugd_ops::cpu {
namespace {

template <typename scalar_t>
void forward_kernel(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& kv_start,
                    const at::Tensor& kv_end, const TilePlan& plan, double softmax_scale, at::Tensor& out,
                    at::Tensor& lse) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t Hq = q.size(1), Hkv = k.size(1), D = q.size(2), group = Hq / Hkv;
  const auto Q = strided3<const scalar_t>(q), K = strided3<const scalar_t>(k), V = strided3<const scalar_t>(v);
  const auto O = strided3<scalar_t>(out);
  acc_t* lse_p = lse.data_ptr<acc_t>();
  const int64_t T = q.size(0);
  const int32_t* ks = kv_start.data_ptr<int32_t>();
  const int32_t* ke = kv_end.data_ptr<int32_t>();
  const int64_t n_items = static_cast<int64_t>(plan.tiles.size()) * Hq;
  const acc_t scale = static_cast<acc_t>(softmax_scale);
  const acc_t neg_inf = -std::numeric_limits<acc_t>::infinity();

  at::parallel_for(0, n_items, 1, [&](int64_t begin, int64_t end) {
    // Dp: the padded row stride of the D-wide buffers (tile_gemm's column rounding).
    const int64_t Dp = gemm_padded(D);
    std::vector<acc_t> qf(kBlockM * Dp), kt(D * kBlockN), vf(kBlockN * Dp), acc(kBlockM * Dp), s(kBlockM * kBlockN);
    std::vector<acc_t> m(kBlockM), l(kBlockM);
    for (int64_t item = begin; item < end; ++item) {
      const QueryTile& t = plan.tiles[item / Hq];
      const int64_t h = item % Hq, g = h / group;
      const int64_t rows = t.row1 - t.row0, r_abs0 = t.seq_start + t.row0;
      load_rows(Q.row(r_abs0, h), Q.st, rows, D, qf.data(), Dp, scale);
      std::fill(acc.begin(), acc.end(), acc_t(0));
      std::fill(m.begin(), m.end(), neg_inf);
      std::fill(l.begin(), l.end(), acc_t(0));
      for (int32_t c0 = first_key_tile(t); c0 < t.k_hi; c0 += kBlockN) {
        const int32_t c1 = std::min(c0 + kBlockN, t.seq_len), cols = c1 - c0;
        if (!tile_meets(t, c0, c1)) continue;
        const bool inside = tile_inside(t, c0, c1);
        load_rows_t(K.row(t.seq_start + c0, g), K.st, cols, D, kt.data(), kBlockN);
        load_rows(V.row(t.seq_start + c0, g), V.st, cols, D, vf.data(), Dp);
        // S = (scale Q) K^T, then P = exp(S - m_new) in place on the row's allowed columns.
        tile_gemm(false, rows, cols, D, acc_t(1), qf.data(), Dp, kt.data(), kBlockN, acc_t(0), s.data(), kBlockN);
        for (int64_t r = 0; r < rows; ++r) {
          acc_t* sr = s.data() + r * kBlockN;
          int32_t lo, hi;
          row_span(inside, ks, ke, r_abs0 + r, c0, c1, lo, hi);
          if (lo >= hi) {  // this row reads nothing here: P = 0, state unchanged
            std::fill(sr, sr + cols, acc_t(0));
            continue;
          }
          acc_t m_new = m[r];
          for (int32_t j = lo; j < hi; ++j) m_new = std::max(m_new, sr[j - c0]);
          acc_t row_sum = 0;
          for (int32_t j = c0; j < c1; ++j) {
            const acc_t p = (j >= lo && j < hi) ? std::exp(sr[j - c0] - m_new) : acc_t(0);
            sr[j - c0] = p;
            row_sum += p;
          }
          // m[r] is -inf before the row's first tile; exp(-inf) = 0 clears the empty state.
          const acc_t alpha = std::exp(m[r] - m_new);
          acc_t* ar = acc.data() + r * Dp;
          for (int64_t x = 0; x < D; ++x) ar[x] *= alpha;
          l[r] = l[r] * alpha + row_sum;
          m[r] = m_new;
        }
        tile_gemm(false, rows, D, cols, acc_t(1), s.data(), kBlockN, vf.data(), Dp, acc_t(1), acc.data(), Dp);
      }
      for (int64_t r = 0; r < rows; ++r) {
        scalar_t* o = O.row(r_abs0 + r, h);
        const bool empty = l[r] == acc_t(0);  // an empty interval: output 0, lse -inf
        const acc_t inv = empty ? acc_t(0) : acc_t(1) / l[r];
        const acc_t* ar = acc.data() + r * Dp;
        for (int64_t x = 0; x < D; ++x) o[x] = static_cast<scalar_t>(ar[x] * inv);
        lse_p[h * T + r_abs0 + r] = empty ? neg_inf : m[r] + std::log(l[r]);
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor> partitioned_attention_fwd_cpu(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& cu_seqlens,
    const at::Tensor& kv_start, const at::Tensor& kv_end, std::optional<int64_t> max_seqlen, double softmax_scale) {
  check_attention_meta(q, k, v, cu_seqlens, kv_start, kv_end, kCpuMaxHeadDim);
  const int64_t T = q.size(0), Hq = q.size(1);
  check_max_seqlen(max_seqlen, check_layout_values_cpu(cu_seqlens, kv_start, kv_end, T));
  const TilePlan plan = make_tile_plan(cu_seqlens, kv_start, kv_end);
  at::Tensor out = at::empty(q.sizes(), q.options());
  const auto lse_dtype = q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor lse = at::empty({Hq, T}, q.options().dtype(lse_dtype));
  const at::Tensor ks = kv_start.contiguous(), ke = kv_end.contiguous();
  if (q.scalar_type() == at::kBFloat16) {
    // On a CPU with bf16 units the tile products run there (attention_bf16.h); else the loop below.
    const Bf16Backend backend = bf16_backend();
    if (backend != Bf16Backend::kLoop) {
      forward_bf16(Bf16Gemm(backend), q, k, v, ks, ke, plan, softmax_scale, out, lse);
      return {out, lse};
    }
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "partitioned_attention_fwd_cpu", [&] {
    forward_kernel<scalar_t>(q, k, v, ks, ke, plan, softmax_scale, out, lse);
  });
  return {out, lse};
}

}  // namespace

TORCH_LIBRARY_IMPL(ugd_ops, CPU, m) { m.impl("partitioned_attention_fwd", &partitioned_attention_fwd_cpu); }

}  // namespace ugd_ops::cpu
