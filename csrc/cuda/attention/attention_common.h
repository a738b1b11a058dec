// Pieces of the CUDA partitioned-attention kernels (forward csrc/cuda/attention/fwd_*.cu, backward
// bwd_*.cu) that do not need a GPU to be tested: tile scheduling, per-tile skip decisions, the
// mma.sync m16n8k16 fragment index maps, fragment loaders from shared memory and the online-softmax
// steps. Everything here is plain C++ marked UGD_HD (__host__ __device__ under nvcc, nothing under
// g++), free of torch and CUDA headers, so csrc/tests/test_cuda_attention_plan.cpp runs the very
// same functions on the CPU (against the CPU kernel's tile plan, the PTX ISA tables and a float64
// reference, through a lane-by-lane emulation of the forward kernel).
//
// API (all int32 indices are relative to the start of a sequence unless they say "absolute"):
//
// Scheduling -- a flat list of (sequence, tile) work items, no host sync, no padding to max_seqlen:
//   num_tiles(L, tile)                  tiles of `tile` rows covering a sequence of length L (0 for L <= 0)
//   max_work_slots(T, B, tile)          T / tile + B >= sum_b num_tiles(L_b): the grid size the host
//                                       can compute from shapes alone; surplus blocks exit at once
//   schedule_chunk(tid, nthreads, B,..) the sequences [b0, b1) one thread of the scheduling kernel scans
//   chunk_tile_count / chunk_write_offsets
//                                       the two per-thread passes of that kernel (between them thread 0
//                                       turns the per-thread counts into exclusive prefix sums):
//                                       tile_offsets[b] = sum_{b' < b} num_tiles(L_b'), [B + 1] entries
//   find_work_item(tile_offsets, cu, B, T, slot)
//                                       slot -> WorkItem {seq, seq_start (absolute), seq_len, row0}; valid
//                                       is false for a surplus slot. Binary search, O(log B) per block.
//   sequence_bounds(cu, b, T, start, len) cu_seqlens read defensively (clamped to [0, T], len >= 0):
//                                       a broken layout can never make a kernel read out of bounds
//   clamp_interval(lo, hi, L, ..)       a row's [kv_start, kv_end) clamped into [0, L], lo <= hi
//
// Skip decisions -- a query tile's rows give TileBounds (min/max reductions, so any reduction order
// gives the same result; identical to csrc/cpu/attention_tiles.h's QueryTile fields):
//   TileBounds::add_row(lo, hi) / merge(other)
//   k_lo, k_hi          union of the non-empty intervals: only key columns in [k_lo, k_hi) are read
//   full_lo, full_hi    intersection of all rows' intervals (empty rows included)
//   first_key_tile(tb, BN)     first key column to visit (key tiles start at multiples of BN);
//                              visit c0 = first, first + BN, ... while c0 < tb.k_hi (none if no row reads)
//   key_tile_unmasked(tb, c0, BN)  every row of the tile reads all BN columns [c0, c0 + BN): no element
//                              mask (stricter than the CPU's tile_inside at a sequence's last, short tile)
//   col_allowed(lo, hi, j)     the element mask of a partial tile
//
// Fragments of mma.sync.aligned.m16n8k16.row.col.f32.{bf16,f16}.{bf16,f16}.f32 (PTX ISA, "Matrix
// Fragments for mma.m16n8k16 with floating point type"), g = lane / 4, t = lane % 4:
//   A 16x16 row-major, element e = 0..7 (register e / 2, half e % 2):
//       row = g + 8 * ((e / 2) % 2),  col = 2t + (e % 2) + 8 * (e / 4)
//   B 16x8 (k x n), element e = 0..3:  k = 2t + (e % 2) + 8 * (e / 2),  n = g
//   C 16x8 fp32, element e = 0..3:     row = g + 8 * (e / 2),  col = 2t + (e % 2)
//   frag_{a,b,c}_{row,col,k,n}(lane, e) give these; acc_to_a repacks the C fragments of n-tiles 2j and
//   2j + 1 into the A fragment of k-block j (how P reaches the P V product without shared memory).
//   load_a_rowmajor / load_b_from_rows / load_b_from_cols read fragments from a row-major shared tile
//   of 16-bit values held as raw bits (uint16_t), so the host runs them on ordinary arrays.
//   ldsm_a_offset / ldsm_bt_offset: the per-lane row addresses that make one ldmatrix.x4 (.trans)
//   deliver what those loaders read, four registers per instruction (the forward kernel uses them).
//
// Online softmax (log2 domain: x = s * scale * log2(e), p = 2^(x - m), lse = (m + log2 l) * ln 2):
//   softmax_base(m)           the subtrahend for exponentials: m, or 0 when m = -inf (a row that has
//                             read nothing yet: 2^(-inf - 0) = 0 instead of NaN)
//   finish_row(m, l, ...)     inverse normaliser and lse; l == 0 (empty interval) gives out 0, lse -inf
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define UGD_HD __host__ __device__
#else
#define UGD_HD
#endif

namespace ugd_ops::cuda::attn {

constexpr int32_t kIntMax = 0x7fffffff;

// ---------------------------------------------------------------------------------------------
// Scheduling
// ---------------------------------------------------------------------------------------------
// (len - 1) / tile + 1 rather than (len + tile - 1) / tile: no int32 overflow for len near 2^31.
UGD_HD inline int32_t num_tiles(int32_t len, int32_t tile) { return len > 0 ? (len - 1) / tile + 1 : 0; }

UGD_HD inline int64_t max_work_slots(int64_t T, int64_t B, int32_t tile) { return T / tile + B; }

UGD_HD inline void sequence_bounds(const int32_t* cu, int32_t b, int32_t T, int32_t& start, int32_t& len) {
  int32_t s = cu[b], e = cu[b + 1];
  s = s < 0 ? 0 : (s > T ? T : s);
  e = e < s ? s : (e > T ? T : e);
  start = s;
  len = e - s;
}

UGD_HD inline void clamp_interval(int32_t lo, int32_t hi, int32_t L, int32_t& clo, int32_t& chi) {
  clo = lo < 0 ? 0 : (lo > L ? L : lo);
  chi = hi < clo ? clo : (hi > L ? L : hi);
}

UGD_HD inline void schedule_chunk(int32_t tid, int32_t nthreads, int32_t B, int32_t& b0, int32_t& b1) {
  const int32_t per = B / nthreads + (B % nthreads != 0);  // ceil without overflowing B + nthreads
  const int64_t lo = static_cast<int64_t>(tid) * per, hi = lo + per;
  b0 = static_cast<int32_t>(lo < B ? lo : B);
  b1 = static_cast<int32_t>(hi < B ? hi : B);
}

UGD_HD inline int32_t chunk_tile_count(const int32_t* cu, int32_t T, int32_t b0, int32_t b1, int32_t tile) {
  int32_t n = 0;
  for (int32_t b = b0; b < b1; ++b) {
    int32_t s, L;
    sequence_bounds(cu, b, T, s, L);
    n += num_tiles(L, tile);
  }
  return n;
}

// Writes tile_offsets[b] for b in [b0, b1), starting from `base` (the tiles of all earlier chunks);
// the thread whose chunk ends at B also writes tile_offsets[B], the total.
UGD_HD inline void chunk_write_offsets(const int32_t* cu, int32_t T, int32_t B, int32_t b0, int32_t b1, int32_t tile,
                                       int32_t base, int32_t* tile_offsets) {
  for (int32_t b = b0; b < b1; ++b) {
    tile_offsets[b] = base;
    int32_t s, L;
    sequence_bounds(cu, b, T, s, L);
    base += num_tiles(L, tile);
  }
  if (b1 == B && b0 < b1) tile_offsets[B] = base;
}

struct WorkItem {
  bool valid;
  int32_t seq, seq_start, seq_len, row0;  // rows [row0, min(row0 + tile, seq_len)) of sequence seq
};

// The work item of flat slot `slot`: the last b with tile_offsets[b] <= slot (sequences without
// tiles share their offset with the next one and are passed over).
UGD_HD inline WorkItem find_work_item(const int32_t* tile_offsets, const int32_t* cu, int32_t B, int32_t T,
                                      int64_t slot, int32_t tile) {
  WorkItem w{false, 0, 0, 0, 0};
  if (B <= 0 || slot >= tile_offsets[B]) return w;
  int32_t lo = 0, hi = B - 1;
  while (lo < hi) {
    const int32_t mid = lo + (hi - lo + 1) / 2;
    if (tile_offsets[mid] <= slot) lo = mid; else hi = mid - 1;
  }
  w.seq = lo;
  sequence_bounds(cu, lo, T, w.seq_start, w.seq_len);
  // In int64 and bounded both ways, so that no tile_offsets whatever can name a row outside
  // [0, seq_len). (The scheduling kernel's own output, even wrapped past 2^31 by a broken layout,
  // brackets slot within one sequence's tiles; this guards the function's promise, not a known path.)
  const int64_t row0 = (slot - tile_offsets[lo]) * static_cast<int64_t>(tile);
  w.valid = row0 >= 0 && row0 < w.seq_len;  // always true for a consistent tile_offsets
  w.row0 = w.valid ? static_cast<int32_t>(row0) : 0;
  return w;
}

// ---------------------------------------------------------------------------------------------
// Skip decisions
// ---------------------------------------------------------------------------------------------
struct TileBounds {
  int32_t k_lo = kIntMax, k_hi = 0;      // union of the non-empty intervals
  int32_t full_lo = 0, full_hi = kIntMax;  // intersection of all intervals

  UGD_HD void add_row(int32_t lo, int32_t hi) {
    full_lo = full_lo > lo ? full_lo : lo;
    full_hi = full_hi < hi ? full_hi : hi;
    if (lo < hi) {
      k_lo = k_lo < lo ? k_lo : lo;
      k_hi = k_hi > hi ? k_hi : hi;
    }
  }
  UGD_HD void merge(const TileBounds& o) {
    k_lo = k_lo < o.k_lo ? k_lo : o.k_lo;
    k_hi = k_hi > o.k_hi ? k_hi : o.k_hi;
    full_lo = full_lo > o.full_lo ? full_lo : o.full_lo;
    full_hi = full_hi < o.full_hi ? full_hi : o.full_hi;
  }
  UGD_HD bool any() const { return k_lo < k_hi; }
};

UGD_HD inline int32_t first_key_tile(const TileBounds& tb, int32_t block_n) {
  return tb.any() ? (tb.k_lo / block_n) * block_n : tb.k_hi;
}

UGD_HD inline bool key_tile_unmasked(const TileBounds& tb, int32_t c0, int32_t block_n) {
  return tb.full_lo <= c0 && c0 + block_n <= tb.full_hi;
}

UGD_HD inline bool col_allowed(int32_t lo, int32_t hi, int32_t j) { return j >= lo && j < hi; }

// ---------------------------------------------------------------------------------------------
// mma.sync m16n8k16 fragments
// ---------------------------------------------------------------------------------------------
UGD_HD inline int frag_a_row(int lane, int e) { return lane / 4 + 8 * ((e / 2) % 2); }
UGD_HD inline int frag_a_col(int lane, int e) { return 2 * (lane % 4) + (e % 2) + 8 * (e / 4); }
UGD_HD inline int frag_b_k(int lane, int e) { return 2 * (lane % 4) + (e % 2) + 8 * (e / 2); }
UGD_HD inline int frag_b_n(int lane, int /*e*/) { return lane / 4; }
UGD_HD inline int frag_c_row(int lane, int e) { return lane / 4 + 8 * (e / 2); }
UGD_HD inline int frag_c_col(int lane, int e) { return 2 * (lane % 4) + (e % 2); }

UGD_HD inline uint32_t pack2(uint16_t lo, uint16_t hi) {
  return static_cast<uint32_t>(lo) | (static_cast<uint32_t>(hi) << 16);
}

// A(r, c) = X[row0 + r][col0 + c], X row-major with leading dimension ld (elements). The two halves
// of a register are (col, col + 1) of one row: one aligned 32-bit read (col0 and ld even).
UGD_HD inline void load_a_rowmajor(const uint16_t* x, int ld, int row0, int col0, int lane, uint32_t a[4]) {
  for (int r = 0; r < 4; ++r) {
    const int row = row0 + frag_a_row(lane, 2 * r), col = col0 + frag_a_col(lane, 2 * r);
    a[r] = *reinterpret_cast<const uint32_t*>(x + row * ld + col);
  }
}

// B(k, n) = X[n0 + n][k0 + k]: B is a block of X^T (S = Q K^T with K stored key-major). The pair
// (k, k + 1) is adjacent in a row of X: one 32-bit read.
UGD_HD inline void load_b_from_rows(const uint16_t* x, int ld, int k0, int n0, int lane, uint32_t b[2]) {
  for (int r = 0; r < 2; ++r) {
    const int k = k0 + frag_b_k(lane, 2 * r), n = n0 + frag_b_n(lane, 2 * r);
    b[r] = *reinterpret_cast<const uint32_t*>(x + n * ld + k);
  }
}

// B(k, n) = X[k0 + k][n0 + n]: B is a block of X itself (O += P V with V stored key-major). The
// pair (k, k + 1) lies in consecutive rows: two 16-bit reads.
UGD_HD inline void load_b_from_cols(const uint16_t* x, int ld, int k0, int n0, int lane, uint32_t b[2]) {
  for (int r = 0; r < 2; ++r) {
    const int k = k0 + frag_b_k(lane, 2 * r), n = n0 + frag_b_n(lane, 2 * r);
    b[r] = pack2(x[k * ld + n], x[(k + 1) * ld + n]);
  }
}

// The A fragment of k-block j from the fp32 C fragments of n-tiles 2j (c_lo) and 2j + 1 (c_hi);
// to16 converts a float to 16-bit bits (round to nearest even).
template <typename To16>
UGD_HD inline void acc_to_a(const float c_lo[4], const float c_hi[4], To16 to16, uint32_t a[4]) {
  a[0] = pack2(to16(c_lo[0]), to16(c_lo[1]));  // row g,     cols 2t, 2t+1
  a[1] = pack2(to16(c_lo[2]), to16(c_lo[3]));  // row g + 8, cols 2t, 2t+1
  a[2] = pack2(to16(c_hi[0]), to16(c_hi[1]));  // row g,     cols 2t+8, 2t+9
  a[3] = pack2(to16(c_hi[2]), to16(c_hi[3]));  // row g + 8, cols 2t+8, 2t+9
}

// ldmatrix.sync.aligned.m8n8.x4[.trans].shared.b16 reads four 8x8 matrices; lane l gives the
// address of row l % 8 of matrix l / 8, and register j of every lane receives matrix j (without
// .trans: row lane / 4, columns 2 (lane % 4), +1; with .trans: rows 2 (lane % 4), +1 of column
// lane / 4). The offsets below (row, col of the lane's address within a 16x16 block) make one x4
// deliver exactly what the loaders above read (csrc/tests/test_cuda_attention_plan.cpp checks
// that against an emulation written from the ISA text):
//   ldsm_a_offset, no .trans:  the A fragment of a 16x16 block of a row-major X (= load_a_rowmajor)
//   ldsm_bt_offset, no .trans: B fragments of n-tiles n0 and n0 + 8 from rows of X (= load_b_from_rows
//                              at n0 -> registers 0, 1 and at n0 + 8 -> registers 2, 3)
//   ldsm_a_offset, .trans:     B fragments of n-tiles n0 and n0 + 8 from a block of X itself
//                              (= load_b_from_cols at n0 -> registers 0, 1, at n0 + 8 -> 2, 3)
UGD_HD inline void ldsm_a_offset(int lane, int& row, int& col) {
  row = lane % 8 + 8 * ((lane / 8) % 2);
  col = 8 * (lane / 16);
}
UGD_HD inline void ldsm_bt_offset(int lane, int& row, int& col) {
  row = lane % 8 + 8 * (lane / 16);
  col = 8 * ((lane / 8) % 2);
}

// ---------------------------------------------------------------------------------------------
// Online softmax steps (per lane; the row max / sum reductions over the 4 lanes of a quad happen
// between them: shuffles on the device, an emulation on the host)
// ---------------------------------------------------------------------------------------------
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

UGD_HD inline float neg_inf_f() { return -INFINITY; }

UGD_HD inline float softmax_base(float m) { return m == neg_inf_f() ? 0.0f : m; }

UGD_HD inline float fmax_f(float a, float b) { return a < b ? b : a; }

// Masks, scales (to the log2 domain) and row-maxes the C fragments of one key tile for the lane's two
// rows (e / 2 = 0: row g, 1: row g + 8). s[nt][e] is column c0 + 8 nt + frag_c_col(lane, e). Masked
// elements become -inf. Returns the lane's partial row maxima in mx[2] (-inf when nothing allowed).
template <int kNTiles>
UGD_HD inline void mask_scale_rowmax(float (*s)[4], int lane, int32_t c0, bool unmasked, const int32_t lo[2],
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
UGD_HD inline void online_softmax_step(float (*s)[4], const float tile_max[2], float m[2], float l[2],
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
UGD_HD inline void finish_row(float m, float l, float& inv_l, float& lse) {
  const bool empty = !(l > 0.0f);
  inv_l = empty ? 0.0f : 1.0f / l;
  lse = empty ? neg_inf_f() : (m + log2f(l)) * kLn2;
}

}  // namespace ugd_ops::cuda::attn
