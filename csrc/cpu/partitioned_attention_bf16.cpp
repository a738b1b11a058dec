// The bf16 path of the CPU partitioned-attention forward and backward (see attention_bf16.h).
//
// Operands in the products' forms: "A" rows are bf16 row-major with an even row length (a zero pad
// column after an odd D or an odd tile width); "B" operands are packed by Bf16Gemm from tensor rows
// (K^T and V^T with pack_rows_t, K, V, Q, dout with pack_rows). P and dS are written to bf16 once per
// tile, transposed where they are the left operand of a product over query rows (dv, dk). The
// element work of each row (exp, the softmax statistics) is softmax_rows.h's, vectorised.
#define TORCH_ASSERT_ONLY_METHOD_OPERATORS
#include "attention_bf16.h"

#include <ATen/Parallel.h>

#include <cmath>
#include <cstring>
#include <limits>

#include "softmax_rows.h"

namespace ugd_ops::cpu {
namespace {

using bf16 = c10::BFloat16;

// Rows [0, n) of one head of a [T, H, D] bf16 tensor into an A operand [n, D2] (D2 = D rounded up to
// even; the pad column is zero).
inline void load_a(const bf16* src, int64_t stride, int64_t n, int64_t D, bf16* dst) {
  const int64_t D2 = round_up(D, 2);
  for (int64_t r = 0; r < n; ++r) {
    std::memcpy(dst + r * D2, src + r * stride, D * sizeof(bf16));
    if (D2 > D) dst[r * D2 + D] = bf16(0.f);
  }
}

// fp32 rows [rows, cols] (ld_src) to bf16: row-major into `a` (ld_a, zero pad column at an odd cols)
// and, when `at` is given, transposed into `at` [cols, rows] (ld_at, zero pad row at an odd rows).
inline void rows_to_bf16(const Bf16Gemm& g, const float* src, int64_t ld_src, int64_t rows, int64_t cols, bf16* a,
                         int64_t ld_a, bf16* at, int64_t ld_at) {
  for (int64_t r = 0; r < rows; ++r) {
    bf16* ar = a + r * ld_a;
    g.to_bf16(src + r * ld_src, cols, ar);
    if (cols & 1) ar[cols] = bf16(0.f);
    if (at != nullptr)
      for (int64_t j = 0; j < cols; ++j) at[j * ld_at + r] = ar[j];
  }
  if (at != nullptr && (rows & 1))
    for (int64_t j = 0; j < cols; ++j) at[j * ld_at + rows] = bf16(0.f);
}

}  // namespace

void forward_bf16(const Bf16Gemm& g, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                  const at::Tensor& kv_start, const at::Tensor& kv_end, const TilePlan& plan, double softmax_scale,
                  at::Tensor& out, at::Tensor& lse) {
  const int64_t Hq = q.size(1), Hkv = k.size(1), D = q.size(2), group = Hq / Hkv, T = q.size(0);
  const int64_t D2 = round_up(D, 2);
  const auto Q = strided3<const bf16>(q), K = strided3<const bf16>(k), V = strided3<const bf16>(v);
  const auto O = strided3<bf16>(out);
  float* lse_p = lse.data_ptr<float>();
  const int32_t* ks = kv_start.data_ptr<int32_t>();
  const int32_t* ke = kv_end.data_ptr<int32_t>();
  const int64_t n_items = static_cast<int64_t>(plan.tiles.size()) * Hq;
  const float scale = static_cast<float>(softmax_scale);
  const float neg_inf = -std::numeric_limits<float>::infinity();

  at::parallel_for(0, n_items, 1, [&](int64_t begin, int64_t end) {
    std::vector<bf16> qa(kBlockM * D2), ktp(Bf16Gemm::packed_elems(D, kBlockN)), vp(Bf16Gemm::packed_elems(kBlockN, D)),
        pa(kBlockM * kBlockN);
    std::vector<float> s(kBlockM * kBlockN), acc(kBlockM * D), m(kBlockM), l(kBlockM);
    for (int64_t item = begin; item < end; ++item) {
      const QueryTile& t = plan.tiles[item / Hq];
      const int64_t h = item % Hq, gh = h / group;
      const int64_t rows = t.row1 - t.row0, r_abs0 = t.seq_start + t.row0;
      load_a(Q.row(r_abs0, h), Q.st, rows, D, qa.data());
      std::fill(acc.begin(), acc.end(), 0.f);
      std::fill(m.begin(), m.end(), neg_inf);
      std::fill(l.begin(), l.end(), 0.f);
      for (int32_t c0 = first_key_tile(t); c0 < t.k_hi; c0 += kBlockN) {
        const int32_t c1 = std::min(c0 + kBlockN, t.seq_len), cols = c1 - c0;
        if (!tile_meets(t, c0, c1)) continue;
        const bool inside = tile_inside(t, c0, c1);
        const PackedB kt = g.pack_rows_t(K.row(t.seq_start + c0, gh), K.st, cols, D, ktp.data());
        g.gemm(rows, cols, D2, qa.data(), D2, kt, s.data(), kBlockN, false);
        for (int64_t r = 0; r < rows; ++r) {
          float* sr = s.data() + r * kBlockN;
          int32_t lo, hi;
          row_span(inside, ks, ke, r_abs0 + r, c0, c1, lo, hi);
          if (lo >= hi) {  // this row reads nothing here: P = 0, state unchanged
            std::fill(sr, sr + cols, 0.f);
            continue;
          }
          float row_sum;
          const float m_new = softmax_row(sr, cols, lo - c0, hi - c0, scale, m[r], &row_sum);
          // m[r] is -inf before the row's first tile; exp(-inf) = 0 clears the empty state.
          const float alpha = std::exp(m[r] - m_new);
          float* ar = acc.data() + r * D;
          for (int64_t x = 0; x < D; ++x) ar[x] *= alpha;
          l[r] = l[r] * alpha + row_sum;
          m[r] = m_new;
        }
        rows_to_bf16(g, s.data(), kBlockN, rows, cols, pa.data(), kBlockN, nullptr, 0);
        const PackedB vb = g.pack_rows(V.row(t.seq_start + c0, gh), V.st, cols, D, vp.data());
        g.gemm(rows, D, round_up(cols, 2), pa.data(), kBlockN, vb, acc.data(), D, true);
      }
      for (int64_t r = 0; r < rows; ++r) {
        bf16* o = O.row(r_abs0 + r, h);
        const bool empty = l[r] == 0.f;  // an empty interval: output 0, lse -inf
        const float inv = empty ? 0.f : 1.f / l[r];
        const float* ar = acc.data() + r * D;
        for (int64_t x = 0; x < D; ++x) o[x] = bf16(ar[x] * inv);
        lse_p[h * T + r_abs0 + r] = empty ? neg_inf : m[r] + std::log(l[r]);
      }
    }
    g.release();
  });
}

void backward_bf16(const Bf16Gemm& g, const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k,
                   const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse,
                   const std::optional<at::Tensor>& dlse, const at::Tensor& kv_start, const at::Tensor& kv_end,
                   const TilePlan& plan, double softmax_scale, at::Tensor& dq, at::Tensor& dk, at::Tensor& dv) {
  const int64_t T = q.size(0), Hq = q.size(1), Hkv = k.size(1), D = q.size(2), group = Hq / Hkv;
  const int64_t D2 = round_up(D, 2);
  const auto Q = strided3<const bf16>(q), K = strided3<const bf16>(k), V = strided3<const bf16>(v);
  const auto dO = strided3<const bf16>(dout), O = strided3<const bf16>(out);
  const auto dQ = strided3<bf16>(dq), dK = strided3<bf16>(dk), dV = strided3<bf16>(dv);
  const at::Tensor lse_c = lse.contiguous();
  const float* L = lse_c.data_ptr<float>();
  const int32_t* ks = kv_start.data_ptr<int32_t>();
  const int32_t* ke = kv_end.data_ptr<int32_t>();
  const float scale = static_cast<float>(softmax_scale);

  // Pass 1: delta[h, i] = dout[i, h] . out[i, h] - dlse[h, i] (rows with an empty interval have lse
  // -inf; their dlse reaches no input).
  std::vector<float> delta(Hq * T);
  at::Tensor dlse_c;
  const float* dl = nullptr;
  if (dlse.has_value()) {
    dlse_c = dlse->to(at::kFloat).contiguous();
    dl = dlse_c.data_ptr<float>();
  }
  at::parallel_for(0, Hq * T, 256, [&](int64_t begin, int64_t end) {
    for (int64_t idx = begin; idx < end; ++idx) {
      const int64_t h = idx / T, i = idx % T;
      delta[idx] = dot_bf16_row(dO.row(i, h), O.row(i, h), D) -
                   ((dl != nullptr && std::isfinite(dl[idx])) ? dl[idx] : 0.f);
    }
  });

  const int64_t kt_elems = Bf16Gemm::packed_elems(D, kBlockN);  // K^T or V^T of one key tile
  const int64_t kr_elems = Bf16Gemm::packed_elems(kBlockN, D);  // K rows of one key tile
  const int64_t qr_elems = Bf16Gemm::packed_elems(kBlockM, D);  // Q or dout rows of one query tile

  // Short sequences (the fused pass) and the key and query tiles of the others (passes 2 and 3).
  const BackwardWork work = split_backward_work(plan);
  const std::vector<int64_t>& fused_seqs = work.fused_seqs;
  const std::vector<int64_t>& row_tiles = work.row_tiles;
  const std::vector<std::pair<int64_t, int32_t>>& key_tiles = work.key_tiles;

  // Per-thread buffers of one (query tile, key tile) pair.
  struct TileBufs {
    std::vector<bf16> qa, doa, qp, dop, pt, dst, dsa;
    std::vector<float> p, ds;
    TileBufs(int64_t D2, int64_t qr_elems)
        : qa(kBlockM * D2), doa(kBlockM * D2), qp(qr_elems), dop(qr_elems), pt(kBlockN * kBlockM),
          dst(kBlockN * kBlockM), dsa(kBlockM * kBlockN), p(kBlockM * kBlockN), ds(kBlockM * kBlockN) {}
  };
  // P and scale * dS of one pair, from the query tile's qa / doa and the key tile's packed K^T, V^T:
  // p = exp(scale q k^T - lse) on allowed pairs, else 0; ds = scale p (dout v^T - delta). Leaves P^T
  // and dS^T in bf16 (pt, dst: [cols, kBlockM]) and dS in bf16 (dsa: [rows, kBlockN]).
  auto tile_p_ds = [&](TileBufs& b, const QueryTile& t, int64_t h, bool inside, int32_t c0, int32_t c1, PackedB kt,
                       PackedB vt) {
    const int64_t rows = t.row1 - t.row0, cols = c1 - c0, r_abs0 = t.seq_start + t.row0;
    g.gemm(rows, cols, D2, b.qa.data(), D2, kt, b.p.data(), kBlockN, false);
    g.gemm(rows, cols, D2, b.doa.data(), D2, vt, b.ds.data(), kBlockN, false);
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t i = r_abs0 + r;
      int32_t lo, hi;
      row_span(inside, ks, ke, i, c0, c1, lo, hi);
      p_ds_row(b.p.data() + r * kBlockN, b.ds.data() + r * kBlockN, cols, lo - c0, hi - c0, scale, L[h * T + i],
               delta[h * T + i]);
    }
    // P's row-major bf16 form is not an operand: dsa is its scratch before it takes dS.
    rows_to_bf16(g, b.p.data(), kBlockN, rows, cols, b.dsa.data(), kBlockN, b.pt.data(), kBlockM);
    rows_to_bf16(g, b.ds.data(), kBlockN, rows, cols, b.dsa.data(), kBlockN, b.dst.data(), kBlockM);
  };
  auto load_query_tile = [&](TileBufs& b, const QueryTile& t, int64_t h, PackedB* qp, PackedB* dop) {
    const int64_t rows = t.row1 - t.row0, r_abs0 = t.seq_start + t.row0;
    load_a(Q.row(r_abs0, h), Q.st, rows, D, b.qa.data());
    load_a(dO.row(r_abs0, h), dO.st, rows, D, b.doa.data());
    if (qp != nullptr) *qp = g.pack_rows(Q.row(r_abs0, h), Q.st, rows, D, b.qp.data());
    if (dop != nullptr) *dop = g.pack_rows(dO.row(r_abs0, h), dO.st, rows, D, b.dop.data());
  };
  auto store_rows = [&](const float* src, int64_t n, const Strided3<bf16>& dst, int64_t t0, int64_t h) {
    for (int64_t r = 0; r < n; ++r) {
      bf16* o = dst.row(t0 + r, h);
      for (int64_t x = 0; x < D; ++x) o[x] = bf16(src[r * D + x]);
    }
  };

  // Fused pass: dq, dk, dv of short sequences; the key tiles of the sequence are packed once.
  at::parallel_for(0, static_cast<int64_t>(fused_seqs.size()) * Hkv, 1, [&](int64_t begin, int64_t end) {
    constexpr int64_t n_kt = kFusedMaxLen / kBlockN;
    TileBufs b(D2, qr_elems);
    std::vector<bf16> ktp(n_kt * kt_elems), vtp(n_kt * kt_elems), kp(n_kt * kr_elems);
    std::vector<PackedB> kt(n_kt), vt(n_kt), kr(n_kt);
    std::vector<float> dkf(kFusedMaxLen * D), dvf(kFusedMaxLen * D), dqf(kBlockM * D);
    for (int64_t item = begin; item < end; ++item) {
      const SequenceTiles& sq = plan.seqs[fused_seqs[item / Hkv]];
      const int64_t gh = item % Hkv, n = sq.seq_len;
      for (int32_t c0 = 0; c0 < n; c0 += kBlockN) {
        const int64_t x = c0 / kBlockN, cols = std::min<int64_t>(kBlockN, n - c0);
        kt[x] = g.pack_rows_t(K.row(sq.seq_start + c0, gh), K.st, cols, D, ktp.data() + x * kt_elems);
        vt[x] = g.pack_rows_t(V.row(sq.seq_start + c0, gh), V.st, cols, D, vtp.data() + x * kt_elems);
        kr[x] = g.pack_rows(K.row(sq.seq_start + c0, gh), K.st, cols, D, kp.data() + x * kr_elems);
      }
      std::fill(dkf.begin(), dkf.begin() + n * D, 0.f);
      std::fill(dvf.begin(), dvf.begin() + n * D, 0.f);
      for (int64_t h = gh * group; h < (gh + 1) * group; ++h) {
        for (int64_t ti = sq.first_tile; ti < sq.first_tile + sq.num_tiles; ++ti) {
          const QueryTile& t = plan.tiles[ti];
          const int64_t rows = t.row1 - t.row0, rows2 = round_up(rows, 2);
          PackedB qp{}, dop{};
          load_query_tile(b, t, h, &qp, &dop);
          std::fill(dqf.begin(), dqf.end(), 0.f);
          for (int32_t c0 = first_key_tile(t); c0 < t.k_hi; c0 += kBlockN) {
            const int32_t c1 = std::min<int32_t>(c0 + kBlockN, n), cols = c1 - c0;
            if (!tile_meets(t, c0, c1)) continue;
            const int64_t x = c0 / kBlockN;
            tile_p_ds(b, t, h, tile_inside(t, c0, c1), c0, c1, kt[x], vt[x]);
            // dv += P^T dout;  dk += (scale dS)^T q;  dq += (scale dS) k
            g.gemm(cols, D, rows2, b.pt.data(), kBlockM, dop, dvf.data() + c0 * D, D, true);
            g.gemm(cols, D, rows2, b.dst.data(), kBlockM, qp, dkf.data() + c0 * D, D, true);
            g.gemm(rows, D, round_up(cols, 2), b.dsa.data(), kBlockN, kr[x], dqf.data(), D, true);
          }
          store_rows(dqf.data(), rows, dQ, t.seq_start + t.row0, h);
        }
      }
      store_rows(dkf.data(), n, dK, sq.seq_start, gh);
      store_rows(dvf.data(), n, dV, sq.seq_start, gh);
    }
    g.release();
  });

  // Pass 2: dk, dv (column view) of the long sequences.
  at::parallel_for(0, static_cast<int64_t>(key_tiles.size()) * Hkv, 1, [&](int64_t begin, int64_t end) {
    TileBufs b(D2, qr_elems);
    std::vector<bf16> ktp(kt_elems), vtp(kt_elems);
    std::vector<float> dkf(kBlockN * D), dvf(kBlockN * D);
    for (int64_t item = begin; item < end; ++item) {
      const auto [sb, c0] = key_tiles[item / Hkv];
      const int64_t gh = item % Hkv;
      const SequenceTiles& sq = plan.seqs[sb];
      const int32_t c1 = std::min(c0 + kBlockN, sq.seq_len), cols = c1 - c0;
      const PackedB kt = g.pack_rows_t(K.row(sq.seq_start + c0, gh), K.st, cols, D, ktp.data());
      const PackedB vt = g.pack_rows_t(V.row(sq.seq_start + c0, gh), V.st, cols, D, vtp.data());
      std::fill(dkf.begin(), dkf.end(), 0.f);
      std::fill(dvf.begin(), dvf.end(), 0.f);
      for (int64_t h = gh * group; h < (gh + 1) * group; ++h) {
        for (int64_t ti = sq.first_tile; ti < sq.first_tile + sq.num_tiles; ++ti) {
          const QueryTile& t = plan.tiles[ti];
          if (!tile_meets(t, c0, c1)) continue;
          const int64_t rows2 = round_up(t.row1 - t.row0, 2);
          PackedB qp{}, dop{};
          load_query_tile(b, t, h, &qp, &dop);
          tile_p_ds(b, t, h, tile_inside(t, c0, c1), c0, c1, kt, vt);
          g.gemm(cols, D, rows2, b.pt.data(), kBlockM, dop, dvf.data(), D, true);
          g.gemm(cols, D, rows2, b.dst.data(), kBlockM, qp, dkf.data(), D, true);
        }
      }
      store_rows(dkf.data(), cols, dK, sq.seq_start + c0, gh);
      store_rows(dvf.data(), cols, dV, sq.seq_start + c0, gh);
    }
    g.release();
  });

  // Pass 3: dq (row view) of the long sequences.
  at::parallel_for(0, static_cast<int64_t>(row_tiles.size()) * Hq, 1, [&](int64_t begin, int64_t end) {
    TileBufs b(D2, qr_elems);
    std::vector<bf16> ktp(kt_elems), vtp(kt_elems), kp(kr_elems);
    std::vector<float> dqf(kBlockM * D);
    for (int64_t item = begin; item < end; ++item) {
      const QueryTile& t = plan.tiles[row_tiles[item / Hq]];
      const int64_t h = item % Hq, gh = h / group;
      const int64_t rows = t.row1 - t.row0;
      load_query_tile(b, t, h, nullptr, nullptr);
      std::fill(dqf.begin(), dqf.end(), 0.f);
      for (int32_t c0 = first_key_tile(t); c0 < t.k_hi; c0 += kBlockN) {
        const int32_t c1 = std::min(c0 + kBlockN, t.seq_len), cols = c1 - c0;
        if (!tile_meets(t, c0, c1)) continue;
        const PackedB kt = g.pack_rows_t(K.row(t.seq_start + c0, gh), K.st, cols, D, ktp.data());
        const PackedB vt = g.pack_rows_t(V.row(t.seq_start + c0, gh), V.st, cols, D, vtp.data());
        const PackedB kr = g.pack_rows(K.row(t.seq_start + c0, gh), K.st, cols, D, kp.data());
        tile_p_ds(b, t, h, tile_inside(t, c0, c1), c0, c1, kt, vt);
        g.gemm(rows, D, round_up(cols, 2), b.dsa.data(), kBlockN, kr, dqf.data(), D, true);
      }
      store_rows(dqf.data(), rows, dQ, t.seq_start + t.row0, h);
    }
    g.release();
  });
}

}  // namespace ugd_ops::cpu
