// Tile metadata of the CPU partitioned-attention kernels.
//
// A query tile is up to kBlockM rows of one sequence. Its metadata bounds the key columns any of
// its rows may read (the row view) and the columns every row may read (so a key tile inside that
// range needs no element mask). The backward's column view walks the same list from the key side.
#pragma once

#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>

#include <algorithm>
#include <climits>
#include <cstdint>
#include <utility>
#include <vector>

#include "tile_gemm.h"

namespace ugd_ops::cpu {

constexpr int kBlockM = 64;  // query rows per tile
constexpr int kBlockN = 64;  // key columns per tile
// The backward's fused pass takes sequences of at most this many tokens whole (partitioned_attention_bwd.cpp).
constexpr int32_t kFusedMaxLen = 4 * kBlockN;
static_assert(kBlockN % kGemmNR == 0, "tile_gemm rounds S's columns up to kGemmNR inside the tile");

struct QueryTile {
  int32_t seq_start;   // absolute index of the sequence's first token
  int32_t seq_len;     // L of the sequence
  int32_t row0, row1;  // rows [row0, row1), relative to seq_start
  int32_t k_lo, k_hi;  // union of the rows' non-empty intervals: columns [k_lo, k_hi)
  int32_t full_lo, full_hi;  // intersection of all rows' intervals: columns [full_lo, full_hi)
};

struct SequenceTiles {
  int32_t seq_start, seq_len;
  int64_t first_tile, num_tiles;  // index range into the flat QueryTile list
};

struct TilePlan {
  std::vector<QueryTile> tiles;
  std::vector<SequenceTiles> seqs;
};

// Requires checked layout tensors on the CPU (see check_layout_values_cpu).
inline TilePlan make_tile_plan(const at::Tensor& cu_seqlens, const at::Tensor& kv_start,
                               const at::Tensor& kv_end) {
  const at::Tensor cu = cu_seqlens.contiguous(), ks = kv_start.contiguous(), ke = kv_end.contiguous();
  const int32_t* c = cu.data_ptr<int32_t>();
  const int32_t* s = ks.data_ptr<int32_t>();
  const int32_t* e = ke.data_ptr<int32_t>();
  TilePlan plan;
  const int64_t B = cu.size(0) - 1;
  for (int64_t b = 0; b < B; ++b) {
    const int32_t start = c[b], L = c[b + 1] - c[b];
    plan.seqs.push_back({start, L, static_cast<int64_t>(plan.tiles.size()), 0});
    for (int32_t r0 = 0; r0 < L; r0 += kBlockM) {
      QueryTile t{start, L, r0, std::min(r0 + kBlockM, L), INT_MAX, 0, 0, INT_MAX};
      for (int32_t r = t.row0; r < t.row1; ++r) {
        const int32_t lo = s[start + r], hi = e[start + r];
        t.full_lo = std::max(t.full_lo, lo);
        t.full_hi = std::min(t.full_hi, hi);
        if (lo < hi) {
          t.k_lo = std::min(t.k_lo, lo);
          t.k_hi = std::max(t.k_hi, hi);
        }
      }
      plan.tiles.push_back(t);
    }
    plan.seqs.back().num_tiles = static_cast<int64_t>(plan.tiles.size()) - plan.seqs.back().first_tile;
  }
  return plan;
}

// The backward's work, in the order its passes take it: sequences short enough for the fused pass
// (whole), then the others' key tiles as (sequence, first column) pairs (pass 2) and their query tiles
// (pass 3). The fp32 and the bf16 backward split the same way, so their results do not depend on which runs.
struct BackwardWork {
  std::vector<int64_t> fused_seqs, row_tiles;
  std::vector<std::pair<int64_t, int32_t>> key_tiles;
};

inline BackwardWork split_backward_work(const TilePlan& plan) {
  BackwardWork w;
  for (int64_t b = 0; b < static_cast<int64_t>(plan.seqs.size()); ++b) {
    const SequenceTiles& sq = plan.seqs[b];
    if (sq.seq_len <= kFusedMaxLen) {
      w.fused_seqs.push_back(b);
      continue;
    }
    for (int32_t c0 = 0; c0 < sq.seq_len; c0 += kBlockN) w.key_tiles.emplace_back(b, c0);
    for (int64_t ti = sq.first_tile; ti < sq.first_tile + sq.num_tiles; ++ti) w.row_tiles.push_back(ti);
  }
  return w;
}

inline bool tile_meets(const QueryTile& t, int32_t c0, int32_t c1) { return t.k_lo < c1 && c0 < t.k_hi; }
// First column of the first key tile the tile's rows reach (== k_hi, so no tile, when all rows are empty).
inline int32_t first_key_tile(const QueryTile& t) { return t.k_lo < t.k_hi ? (t.k_lo / kBlockN) * kBlockN : t.k_hi; }

inline bool tile_inside(const QueryTile& t, int32_t c0, int32_t c1) {
  return t.full_lo <= c0 && c1 <= t.full_hi;
}

// Copies rows [0, n) of one head of a [T, H, D] tensor (last dim contiguous) into a dense acc_t
// buffer with row stride ld_dst, optionally scaled; columns [D, ld_dst) are left as they are.
template <typename scalar_t, typename acc_t>
inline void load_rows(const scalar_t* base, int64_t stride_t, int64_t n, int64_t D, acc_t* dst, int64_t ld_dst,
                      acc_t scale = acc_t(1)) {
  for (int64_t r = 0; r < n; ++r) {
    const scalar_t* src = base + r * stride_t;
    acc_t* d = dst + r * ld_dst;
    for (int64_t x = 0; x < D; ++x) d[x] = static_cast<acc_t>(src[x]) * scale;
  }
}

// The same rows transposed: dst[x * ld_dst + r] (D rows of n columns), the B operand of Q K^T.
template <typename scalar_t, typename acc_t>
inline void load_rows_t(const scalar_t* base, int64_t stride_t, int64_t n, int64_t D, acc_t* dst, int64_t ld_dst) {
  for (int64_t r = 0; r < n; ++r) {
    const scalar_t* src = base + r * stride_t;
    for (int64_t x = 0; x < D; ++x) dst[x * ld_dst + r] = static_cast<acc_t>(src[x]);
  }
}

// Columns [lo, hi) of key tile [c0, c1) that row `i` may read (empty when lo >= hi).
inline void row_span(bool inside, const int32_t* ks, const int32_t* ke, int64_t i, int32_t c0, int32_t c1,
                     int32_t& lo, int32_t& hi) {
  lo = inside ? c0 : std::max(c0, ks[i]);
  hi = inside ? c1 : std::min(c1, ke[i]);
}

// Strided view of a [T, H, D] tensor: element (t, h, x) at data[t * st + h * sh + x].
template <typename T>
struct Strided3 {
  T* data;
  int64_t st, sh;
  T* row(int64_t t, int64_t h) const { return data + t * st + h * sh; }
};

template <typename T>
inline Strided3<T> strided3(const at::Tensor& x) {
  return {static_cast<T*>(x.data_ptr()), x.stride(0), x.stride(1)};
}

}  // namespace ugd_ops::cpu
