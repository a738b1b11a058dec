// CPU backward of ugd_ops::partitioned_attention_fwd.
//
// Deterministic and free of atomics, in three passes that recompute P from the saved lse:
//   1. delta[h, i] = sum_x dout[i, h, x] * out[i, h, x] - dlse[h, i]    (one item per row)
//   2. column view: one item per (key tile, kv head) owns dk and dv of its columns and visits only
//      the query tiles whose rows reach them (for a Q-span column: the Q rows, then the P/G rows).
//   3. row view: one item per (query tile, query head) owns dq of its rows and visits only the key
//      tiles they reach.
// Sequences of at most kFusedMaxLen tokens (most text-matching samples) skip 2 and 3: one item per
// (sequence, kv head) owns dk, dv of the whole sequence and dq of its group's heads, so P and dS are
// computed once, not twice. It sums in the same order as passes 2 and 3; long sequences keep the
// split passes for their parallelism and bounded buffers.
// With P = exp(scale * q.k - lse): dv = P^T dout, dS = P * (dout.v - delta), dq = scale * dS k,
// dk = scale * dS^T q. A dlse term enters through delta since d lse_i / d s_ij = P_ij.
// The tile products are tile_gemm's register-blocked loops (K and V loaded transposed for the
// Q K^T and dout V^T products; D-wide rows padded to gemm_padded(D) with zeros).
#define TORCH_ASSERT_ONLY_METHOD_OPERATORS
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <cmath>
#include <tuple>
#include <type_traits>

#include "../common/checks.h"
#include "attention_bf16.h"
#include "attention_tiles.h"
#include "tile_gemm.h"

namespace ugd_ops::cpu {
namespace {

template <typename scalar_t>
void backward_kernel(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                     const at::Tensor& out, const at::Tensor& lse, const std::optional<at::Tensor>& dlse,
                     const at::Tensor& kv_start, const at::Tensor& kv_end, const TilePlan& plan,
                     double softmax_scale, at::Tensor& dq, at::Tensor& dk, at::Tensor& dv) {
  if constexpr (std::is_same_v<scalar_t, at::BFloat16>) {
    // bf16 inputs on a CPU with bf16 units: the same passes with the products on those units.
    const Bf16Backend backend = bf16_backend();
    if (backend != Bf16Backend::kLoop) {
      backward_bf16(Bf16Gemm(backend), dout, q, k, v, out, lse, dlse, kv_start, kv_end, plan, softmax_scale, dq, dk,
                    dv);
      return;
    }
  }
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t T = q.size(0), Hq = q.size(1), Hkv = k.size(1), D = q.size(2), group = Hq / Hkv;
  const auto Q = strided3<const scalar_t>(q), K = strided3<const scalar_t>(k), V = strided3<const scalar_t>(v);
  const auto dO = strided3<const scalar_t>(dout), O = strided3<const scalar_t>(out);
  const auto dQ = strided3<scalar_t>(dq), dK = strided3<scalar_t>(dk), dV = strided3<scalar_t>(dv);
  const at::Tensor lse_c = lse.contiguous();
  const acc_t* L = lse_c.data_ptr<acc_t>();
  const int32_t* ks = kv_start.data_ptr<int32_t>();
  const int32_t* ke = kv_end.data_ptr<int32_t>();
  const acc_t scale = static_cast<acc_t>(softmax_scale);
  const int64_t Dp = gemm_padded(D);  // row stride of the D-wide buffers

  // Pass 1: delta.
  std::vector<acc_t> delta(Hq * T);
  at::Tensor dlse_c;
  const acc_t* dl = nullptr;
  if (dlse.has_value()) {
    dlse_c = dlse->to(lse.scalar_type()).contiguous();
    dl = dlse_c.data_ptr<acc_t>();
  }
  at::parallel_for(0, Hq * T, 256, [&](int64_t begin, int64_t end) {
    for (int64_t idx = begin; idx < end; ++idx) {
      const int64_t h = idx / T, i = idx % T;
      const scalar_t* a = dO.row(i, h);
      const scalar_t* b = O.row(i, h);
      acc_t s = 0;
      for (int64_t x = 0; x < D; ++x) s += static_cast<acc_t>(a[x]) * static_cast<acc_t>(b[x]);
      // Rows with an empty interval have lse = -inf; their dlse cannot reach any input.
      delta[idx] = s - ((dl != nullptr && std::isfinite(dl[idx])) ? dl[idx] : acc_t(0));
    }
  });

  // Short sequences (the fused pass) and the key and query tiles of the others (passes 2 and 3).
  const BackwardWork work = split_backward_work(plan);
  const std::vector<int64_t>& fused_seqs = work.fused_seqs;
  const std::vector<int64_t>& row_tiles = work.row_tiles;
  const std::vector<std::pair<int64_t, int32_t>>& key_tiles = work.key_tiles;

  // P and dS of one (query tile, key tile) pair: p = exp(scale q k^T - lse) on allowed pairs, else 0;
  // ds = p * (dout v^T - delta). qf, dof: [rows, Dp]; kt, vt: [D, ldk] (transposed, from the tile's first
  // column); p, ds: [rows, kBlockN].
  auto tile_p_ds = [&](const QueryTile& t, int64_t h, bool inside, int32_t c0, int32_t c1, const acc_t* qf,
                       const acc_t* dof, const acc_t* kt, const acc_t* vt, int64_t ldk, acc_t* p, acc_t* ds) {
    const int64_t rows = t.row1 - t.row0, cols = c1 - c0, r_abs0 = t.seq_start + t.row0;
    tile_gemm(false, rows, cols, D, scale, qf, Dp, kt, ldk, acc_t(0), p, kBlockN);
    tile_gemm(false, rows, cols, D, acc_t(1), dof, Dp, vt, ldk, acc_t(0), ds, kBlockN);
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t i = r_abs0 + r;
      int32_t lo, hi;
      row_span(inside, ks, ke, i, c0, c1, lo, hi);
      const acc_t li = L[h * T + i], di = delta[h * T + i];
      acc_t* pr = p + r * kBlockN;
      acc_t* dsr = ds + r * kBlockN;
      for (int32_t j = c0; j < c1; ++j) {
        const acc_t pj = (j >= lo && j < hi) ? std::exp(pr[j - c0] - li) : acc_t(0);
        pr[j - c0] = pj;
        dsr[j - c0] = pj * (dsr[j - c0] - di);
      }
    }
  };

  // Fused pass: dq, dk, dv of short sequences.
  at::parallel_for(0, static_cast<int64_t>(fused_seqs.size()) * Hkv, 1, [&](int64_t begin, int64_t end) {
    constexpr int64_t ldk = kFusedMaxLen;  // kt, vt: the whole sequence transposed, [D, ldk]
    std::vector<acc_t> kt(D * ldk), vt(D * ldk), kf(ldk * Dp), dkf(ldk * Dp), dvf(ldk * Dp);
    std::vector<acc_t> qf(kBlockM * Dp), dof(kBlockM * Dp), dqf(kBlockM * Dp), p(kBlockM * kBlockN),
        ds(kBlockM * kBlockN);
    for (int64_t item = begin; item < end; ++item) {
      const SequenceTiles& sq = plan.seqs[fused_seqs[item / Hkv]];
      const int64_t g = item % Hkv, n = sq.seq_len;
      load_rows_t(K.row(sq.seq_start, g), K.st, n, D, kt.data(), ldk);
      load_rows_t(V.row(sq.seq_start, g), V.st, n, D, vt.data(), ldk);
      load_rows(K.row(sq.seq_start, g), K.st, n, D, kf.data(), Dp);
      std::fill(dkf.begin(), dkf.begin() + n * Dp, acc_t(0));
      std::fill(dvf.begin(), dvf.begin() + n * Dp, acc_t(0));
      for (int64_t h = g * group; h < (g + 1) * group; ++h) {
        for (int64_t ti = sq.first_tile; ti < sq.first_tile + sq.num_tiles; ++ti) {
          const QueryTile& t = plan.tiles[ti];
          const int64_t rows = t.row1 - t.row0, r_abs0 = t.seq_start + t.row0;
          load_rows(Q.row(r_abs0, h), Q.st, rows, D, qf.data(), Dp);
          load_rows(dO.row(r_abs0, h), dO.st, rows, D, dof.data(), Dp);
          std::fill(dqf.begin(), dqf.end(), acc_t(0));
          for (int32_t c0 = first_key_tile(t); c0 < t.k_hi; c0 += kBlockN) {
            const int32_t c1 = std::min<int32_t>(c0 + kBlockN, n), cols = c1 - c0;
            if (!tile_meets(t, c0, c1)) continue;
            tile_p_ds(t, h, tile_inside(t, c0, c1), c0, c1, qf.data(), dof.data(), kt.data() + c0, vt.data() + c0,
                      ldk, p.data(), ds.data());
            // dv += P^T dout;  dk += scale dS^T q;  dq += scale dS k
            tile_gemm(true, cols, D, rows, acc_t(1), p.data(), kBlockN, dof.data(), Dp, acc_t(1),
                      dvf.data() + c0 * Dp, Dp);
            tile_gemm(true, cols, D, rows, scale, ds.data(), kBlockN, qf.data(), Dp, acc_t(1), dkf.data() + c0 * Dp,
                      Dp);
            tile_gemm(false, rows, D, cols, scale, ds.data(), kBlockN, kf.data() + c0 * Dp, Dp, acc_t(1), dqf.data(),
                      Dp);
          }
          for (int64_t r = 0; r < rows; ++r) {
            scalar_t* o = dQ.row(r_abs0 + r, h);
            for (int64_t x = 0; x < D; ++x) o[x] = static_cast<scalar_t>(dqf[r * Dp + x]);
          }
        }
      }
      for (int64_t j = 0; j < n; ++j) {
        scalar_t* dkr = dK.row(sq.seq_start + j, g);
        scalar_t* dvr = dV.row(sq.seq_start + j, g);
        for (int64_t x = 0; x < D; ++x) {
          dkr[x] = static_cast<scalar_t>(dkf[j * Dp + x]);
          dvr[x] = static_cast<scalar_t>(dvf[j * Dp + x]);
        }
      }
    }
  });

  // Pass 2: dk, dv (column view) of the long sequences.
  at::parallel_for(0, static_cast<int64_t>(key_tiles.size()) * Hkv, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> kt(D * kBlockN), vt(D * kBlockN), dkf(kBlockN * Dp), dvf(kBlockN * Dp);
    std::vector<acc_t> qf(kBlockM * Dp), dof(kBlockM * Dp), p(kBlockM * kBlockN), ds(kBlockM * kBlockN);
    for (int64_t item = begin; item < end; ++item) {
      const auto [b, c0] = key_tiles[item / Hkv];
      const int64_t g = item % Hkv;
      const SequenceTiles& sq = plan.seqs[b];
      const int32_t c1 = std::min(c0 + kBlockN, sq.seq_len), cols = c1 - c0;
      load_rows_t(K.row(sq.seq_start + c0, g), K.st, cols, D, kt.data(), kBlockN);
      load_rows_t(V.row(sq.seq_start + c0, g), V.st, cols, D, vt.data(), kBlockN);
      std::fill(dkf.begin(), dkf.end(), acc_t(0));
      std::fill(dvf.begin(), dvf.end(), acc_t(0));
      for (int64_t h = g * group; h < (g + 1) * group; ++h) {
        for (int64_t ti = sq.first_tile; ti < sq.first_tile + sq.num_tiles; ++ti) {
          const QueryTile& t = plan.tiles[ti];
          if (!tile_meets(t, c0, c1)) continue;
          const int64_t rows = t.row1 - t.row0, r_abs0 = t.seq_start + t.row0;
          load_rows(Q.row(r_abs0, h), Q.st, rows, D, qf.data(), Dp);
          load_rows(dO.row(r_abs0, h), dO.st, rows, D, dof.data(), Dp);
          tile_p_ds(t, h, tile_inside(t, c0, c1), c0, c1, qf.data(), dof.data(), kt.data(), vt.data(), kBlockN,
                    p.data(), ds.data());
          // dv += P^T dout;  dk += scale dS^T q
          tile_gemm(true, cols, D, rows, acc_t(1), p.data(), kBlockN, dof.data(), Dp, acc_t(1), dvf.data(), Dp);
          tile_gemm(true, cols, D, rows, scale, ds.data(), kBlockN, qf.data(), Dp, acc_t(1), dkf.data(), Dp);
        }
      }
      for (int32_t j = c0; j < c1; ++j) {
        scalar_t* dkr = dK.row(sq.seq_start + j, g);
        scalar_t* dvr = dV.row(sq.seq_start + j, g);
        for (int64_t x = 0; x < D; ++x) {
          dkr[x] = static_cast<scalar_t>(dkf[(j - c0) * Dp + x]);
          dvr[x] = static_cast<scalar_t>(dvf[(j - c0) * Dp + x]);
        }
      }
    }
  });

  // Pass 3: dq (row view) of the long sequences.
  at::parallel_for(0, static_cast<int64_t>(row_tiles.size()) * Hq, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> qf(kBlockM * Dp), dof(kBlockM * Dp), dqf(kBlockM * Dp), kf(kBlockN * Dp);
    std::vector<acc_t> kt(D * kBlockN), vt(D * kBlockN);
    std::vector<acc_t> p(kBlockM * kBlockN), ds(kBlockM * kBlockN);
    for (int64_t item = begin; item < end; ++item) {
      const QueryTile& t = plan.tiles[row_tiles[item / Hq]];
      const int64_t h = item % Hq, g = h / group;
      const int64_t rows = t.row1 - t.row0, r_abs0 = t.seq_start + t.row0;
      load_rows(Q.row(r_abs0, h), Q.st, rows, D, qf.data(), Dp);
      load_rows(dO.row(r_abs0, h), dO.st, rows, D, dof.data(), Dp);
      std::fill(dqf.begin(), dqf.end(), acc_t(0));
      for (int32_t c0 = first_key_tile(t); c0 < t.k_hi; c0 += kBlockN) {
        const int32_t c1 = std::min(c0 + kBlockN, t.seq_len), cols = c1 - c0;
        if (!tile_meets(t, c0, c1)) continue;
        load_rows(K.row(t.seq_start + c0, g), K.st, cols, D, kf.data(), Dp);
        load_rows_t(K.row(t.seq_start + c0, g), K.st, cols, D, kt.data(), kBlockN);
        load_rows_t(V.row(t.seq_start + c0, g), V.st, cols, D, vt.data(), kBlockN);
        tile_p_ds(t, h, tile_inside(t, c0, c1), c0, c1, qf.data(), dof.data(), kt.data(), vt.data(), kBlockN,
                  p.data(), ds.data());
        // dq += scale dS k
        tile_gemm(false, rows, D, cols, scale, ds.data(), kBlockN, kf.data(), Dp, acc_t(1), dqf.data(), Dp);
      }
      for (int64_t r = 0; r < rows; ++r) {
        scalar_t* o = dQ.row(r_abs0 + r, h);
        for (int64_t x = 0; x < D; ++x) o[x] = static_cast<scalar_t>(dqf[r * Dp + x]);
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> partitioned_attention_bwd_cpu(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& lse, const std::optional<at::Tensor>& dlse, const at::Tensor& cu_seqlens,
    const at::Tensor& kv_start, const at::Tensor& kv_end, std::optional<int64_t> max_seqlen, double softmax_scale) {
  check_attention_meta(q, k, v, cu_seqlens, kv_start, kv_end, kCpuMaxHeadDim);
  check_qkv_tensor(dout, "dout", q);
  check_qkv_tensor(out, "out", q);
  TORCH_CHECK_VALUE(dout.sizes() == q.sizes() && out.sizes() == q.sizes(),
              "ugd_ops: dout and out must have the shape of q ", q.sizes(), ", got ", dout.sizes(), " and ",
              out.sizes());
  const int64_t T = q.size(0), Hq = q.size(1);
  const auto lse_dtype = q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  TORCH_CHECK_VALUE(lse.scalar_type() == lse_dtype && lse.dim() == 2 && lse.size(0) == Hq && lse.size(1) == T,
              "ugd_ops: lse must be ", lse_dtype, " [Hq, T] = [", Hq, ", ", T, "], got ", lse.scalar_type(), " ",
              lse.sizes());
  if (dlse.has_value()) {
    TORCH_CHECK_VALUE(dlse->sizes() == lse.sizes(), "ugd_ops: dlse must have the shape of lse ", lse.sizes(), ", got ",
                dlse->sizes());
  }
  check_max_seqlen(max_seqlen, check_layout_values_cpu(cu_seqlens, kv_start, kv_end, T));
  const TilePlan plan = make_tile_plan(cu_seqlens, kv_start, kv_end);
  at::Tensor dq = at::empty(q.sizes(), q.options());
  at::Tensor dk = at::empty(k.sizes(), k.options());
  at::Tensor dv = at::empty(v.sizes(), v.options());
  const at::Tensor ks = kv_start.contiguous(), ke = kv_end.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "partitioned_attention_bwd_cpu", [&] {
    backward_kernel<scalar_t>(dout, q, k, v, out, lse, dlse, ks, ke, plan, softmax_scale, dq, dk, dv);
  });
  return {dq, dk, dv};
}

}  // namespace

TORCH_LIBRARY_IMPL(ugd_ops, CPU, m) { m.impl("partitioned_attention_bwd", &partitioned_attention_bwd_cpu); }

}  // namespace ugd_ops::cpu
