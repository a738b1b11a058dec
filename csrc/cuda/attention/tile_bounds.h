// Skip decisions of the CUDA attention kernels: a query tile's rows give TileBounds (min / max
// reductions, so any reduction order gives the same result; the same fields as the CPU kernel's
// QueryTile in csrc/cpu/attention_tiles.h):
//   TileBounds::add_row(lo, hi) / merge(other)
//   k_lo, k_hi          union of the non-empty intervals: only key columns in [k_lo, k_hi) are read
//   full_lo, full_hi    intersection of all rows' intervals (empty rows included)
//   first_key_tile(tb, BN)     first key column to visit (key tiles start at multiples of BN);
//                              visit c0 = first, first + BN, ... while c0 < tb.k_hi (none if no row reads)
//   key_tile_unmasked(tb, c0, BN)  every row of the tile reads all BN columns [c0, c0 + BN): no element
//                              mask (stricter than the CPU's tile_inside at a sequence's last, short tile)
//   col_allowed(lo, hi, j)     the element mask of a partial tile
// Plain C++ marked UGD_HD (host_device.h): csrc/tests/ runs them on the CPU.
#pragma once

#include <cstdint>

#include "host_device.h"

namespace ugd_ops::cuda::attn {

constexpr int32_t kIntMax = 0x7fffffff;

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

UGD_HD int32_t first_key_tile(const TileBounds& tb, int32_t block_n) {
  return tb.any() ? (tb.k_lo / block_n) * block_n : tb.k_hi;
}

UGD_HD bool key_tile_unmasked(const TileBounds& tb, int32_t c0, int32_t block_n) {
  return tb.full_lo <= c0 && c0 + block_n <= tb.full_hi;
}

UGD_HD bool col_allowed(int32_t lo, int32_t hi, int32_t j) { return j >= lo && j < hi; }

}  // namespace ugd_ops::cuda::attn
