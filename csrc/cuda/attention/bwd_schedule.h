// Tile schedule of the CUDA attention backward, as UGD_HD functions free of torch and CUDA headers
// (host_device.h; built on the scheduling pieces of schedule.h and the skip bounds of tile_bounds.h),
// so that csrc/tests/test_attention_bwd_schedule.cpp runs the very functions the kernels run.
//
// Query tiles and key tiles are the same thing here: kBwdTile consecutive tokens of one sequence
// (kBwdTile query rows, or kBwdTile key columns). The preprocessing launch builds one flat list of
// tiles over the packed batch on the device (sizes known only there: no host sync), each with
// the reach of its rows, into a workspace of max_tiles(T, B) entries; the two compute launches
// are sized by that bound and their surplus blocks return at once.
//
// Skipping, in both directions (docs/spec.md section 3, "column view"): a query tile's rows reach the
// columns [k_lo, k_hi), the union of their non-empty intervals (min kv_start / max kv_end over
// the rows that are not empty). The dk/dv pass of a key tile [c0, c1) visits only the query tiles
// of its sequence that meet it, decided per query tile: in a `ttm` layout the keys of the Q span
// are read by the Q, P and G rows but not by the D rows, which lie between them, so the visited
// tiles are not one interval. The dq pass of a query tile walks the key tiles of [k_lo, k_hi).
// Inside a visited pair every element is masked by its row's own interval.
#pragma once

#include <cmath>
#include <cstdint>

#include "host_device.h"
#include "mma_fragments.h"
#include "schedule.h"
#include "tile_bounds.h"

namespace ugd_ops::cuda::attn {

constexpr int kBwdTile = 64;  // rows of a query tile == columns of a key tile

struct BwdTile {
  int32_t seq_start;   // absolute index of the sequence's first token
  int32_t seq_len;     // L
  int32_t row0, row1;  // tokens [row0, row1) of the sequence (relative), as rows or as columns
  int32_t k_lo, k_hi;  // union of the non-empty (clamped) intervals of rows [row0, row1); none: k_lo >= k_hi
  int32_t first_tile;  // index of the sequence's first tile in the flat list
  int32_t num_tiles;   // tiles of the sequence
};
constexpr int kBwdTileInts = 8;  // BwdTile as int32 words (the workspace is an int32 tensor)
static_assert(sizeof(BwdTile) == kBwdTileInts * sizeof(int32_t), "BwdTile must be 8 packed int32");

// An upper bound of the tiles of any batch of B sequences and T tokens (schedule.h's
// max_work_slots), and at most T since every tile holds a token.
UGD_HD int64_t max_tiles(int64_t T, int64_t B) {
  const int64_t bound = max_work_slots(T, B, kBwdTile);
  return bound < T ? bound : T;
}

// The header of tile `t` of a sequence; its reach is still "nothing" until tile_reach.
UGD_HD BwdTile tile_header(int32_t seq_start, int32_t L, int32_t t, int32_t first_tile) {
  BwdTile x;
  x.seq_start = seq_start;
  x.seq_len = L;
  x.row0 = t * kBwdTile;
  x.row1 = x.row0 + kBwdTile < L ? x.row0 + kBwdTile : L;
  const TileBounds none{};
  x.k_lo = none.k_lo;
  x.k_hi = none.k_hi;
  x.first_tile = first_tile;
  x.num_tiles = num_tiles(L, kBwdTile);
  return x;
}

// Fills k_lo / k_hi from the rows' intervals (kv_start / kv_end indexed by absolute token),
// clamped into the sequence so that intervals that break the contract (reported by the host-side
// checks only) can never make a kernel load a key outside its sequence.
UGD_HD void tile_reach(BwdTile& x, const int32_t* kv_start, const int32_t* kv_end) {
  TileBounds tb;
  for (int32_t r = x.row0; r < x.row1; ++r) {
    int32_t lo, hi;
    clamp_interval(kv_start[x.seq_start + r], kv_end[x.seq_start + r], x.seq_len, lo, hi);
    tb.add_row(lo, hi);
  }
  x.k_lo = tb.k_lo;
  x.k_hi = tb.k_hi;
}

UGD_HD bool tile_empty(const BwdTile& x) { return x.k_lo >= x.k_hi; }

// Whether some row of query tile `q` may reach a column of [c0, c1) (a necessary condition; the
// element masks decide exactly). The dk/dv pass's per-query-tile skip.
UGD_HD bool tile_meets(const BwdTile& q, int32_t c0, int32_t c1) { return q.k_lo < c1 && c0 < q.k_hi; }

// The first key column the dq pass of query tile q visits; it visits c0 = first, first + kBwdTile, ...
// while c0 < q.k_hi (none when no row reads anything).
UGD_HD int32_t first_key_col(const BwdTile& q) {
  TileBounds tb;
  tb.k_lo = q.k_lo;
  tb.k_hi = q.k_hi;
  return first_key_tile(tb, kBwdTile);
}

// The element mask: row with interval [lo, hi) reads column c (relative to its sequence).
UGD_HD bool allowed(int32_t lo, int32_t hi, int32_t c) { return col_allowed(lo, hi, c); }

// delta of one row: rowsum(dout * out) - dlse, where a non-finite dlse (the gradient of the -inf
// lse of an empty row, as the reference and the CPU kernel treat it) counts as 0.
UGD_HD float delta_value(float dot, float dlse) {
#if defined(__CUDA_ARCH__)
  const bool finite = ::isfinite(dlse);
#else
  const bool finite = std::isfinite(dlse);
#endif
  return dot - (finite ? dlse : 0.0f);
}

// P and dS of one warp's 16 x 64 block of a (query tile, key tile) pair, in place on the mma
// accumulators: s (= q.k) becomes P = 2^(s * scale log2 e - lse log2 e) on allowed pairs and 0
// elsewhere, dp (= dO.v) becomes dS = P (dp - delta). kKeyMajor: the block's rows are key columns
// and its columns query rows (the dk/dv pass computes S^T), else the reverse (the dq pass).
// wrow: the warp's first block row in the tile; c0: the key tile's first column (relative to the
// sequence); cols: its columns; lse2_s, delta_s, ks_s, ke_s: per query row of the tile (rows past
// the end hold the empty interval [0, 0), so they are never allowed). A row with an empty interval
// (lse -inf) is never allowed either: its P and dS are exactly 0, never NaN.
template <bool kKeyMajor, int kNTiles>
UGD_HD void p_ds_block(float (*s)[4], float (*dp)[4], int lane, int wrow, int32_t c0, int cols,
                           const float* lse2_s, const float* delta_s, const int32_t* ks_s, const int32_t* ke_s,
                           float scale_log2) {
  for (int nt = 0; nt < kNTiles; ++nt)
    for (int e = 0; e < 4; ++e) {
      const int fr = wrow + frag_c_row(lane, e), fc = 8 * nt + frag_c_col(lane, e);
      const int kc = kKeyMajor ? fr : fc;  // key column in the tile
      const int qr = kKeyMajor ? fc : fr;  // query row in the tile
      const bool ok = kc < cols && allowed(ks_s[qr], ke_s[qr], c0 + kc);
      const float pv = ok ? exp2f(s[nt][e] * scale_log2 - lse2_s[qr]) : 0.0f;
      s[nt][e] = pv;
      // A select, not 0 * (dp - delta): a masked element must give exactly 0 even where delta is
      // not finite (an empty row's out holding NaN / inf makes rowsum(dout * out) NaN), or one such
      // row would spread NaN through dS^T Q over every key of the tile.
      dp[nt][e] = ok ? pv * (dp[nt][e] - delta_s[qr]) : 0.0f;
    }
}

// The schedule a thread of the scheduling block writes: the headers of the tiles of its chunk of
// sequences [b0, b1) (schedule_chunk), starting at slot `base` (the tiles of earlier chunks),
// none at or past `limit`. The device runs this per thread after a prefix sum of
// chunk_tile_count; build_schedule_reference runs it as one chunk.
UGD_HD void write_chunk_headers(const int32_t* cu_seqlens, int32_t T, int32_t b0, int32_t b1, int64_t base,
                                    int64_t limit, BwdTile* tiles) {
  int64_t n = base;
  for (int32_t b = b0; b < b1; ++b) {
    int32_t start, L;
    sequence_bounds(cu_seqlens, b, T, start, L);
    const int32_t first = static_cast<int32_t>(n);
    for (int32_t t = 0; t < num_tiles(L, kBwdTile); ++t, ++n)
      if (n < limit) tiles[n] = tile_header(start, L, t, first);
  }
}

// The scheduling block's work in sequential form, for the tests: the same tiles in the same
// order. Returns the number of tiles.
inline int64_t build_schedule_reference(const int32_t* cu_seqlens, int32_t B, int32_t T, const int32_t* kv_start,
                                        const int32_t* kv_end, int64_t limit, BwdTile* tiles) {
  const int64_t total = chunk_tile_count(cu_seqlens, T, 0, B, kBwdTile);
  const int64_t n = total < limit ? total : limit;
  write_chunk_headers(cu_seqlens, T, 0, B, 0, limit, tiles);
  for (int64_t t = 0; t < n; ++t) tile_reach(tiles[t], kv_start, kv_end);
  return n;
}

}  // namespace ugd_ops::cuda::attn
