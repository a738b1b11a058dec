// Scheduling of the CUDA attention kernels: a flat list of (sequence, tile) work items built on the
// device, with no host sync and no padding to max_seqlen (the forward's query tiles; the backward's
// tile list in bwd_schedule.h is built from the same pieces). All int32 indices are relative to the
// start of a sequence unless they say "absolute".
//
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
// The scheduling kernel (schedule.cu, launch_tile_offsets in launch.h) runs these in one block of
// kScheduleThreads threads. Plain C++ marked UGD_HD (host_device.h): csrc/tests/ runs them on the CPU.
#pragma once

#include <cstdint>

#include "host_device.h"

namespace ugd_ops::cuda::attn {

// Threads of the one block that builds a schedule (the forward's tile_offsets, the backward's tiles).
constexpr int kScheduleThreads = 256;

// (len - 1) / tile + 1 rather than (len + tile - 1) / tile: no int32 overflow for len near 2^31.
UGD_HD int32_t num_tiles(int32_t len, int32_t tile) { return len > 0 ? (len - 1) / tile + 1 : 0; }

UGD_HD int64_t max_work_slots(int64_t T, int64_t B, int32_t tile) { return T / tile + B; }

UGD_HD void sequence_bounds(const int32_t* cu, int32_t b, int32_t T, int32_t& start, int32_t& len) {
  int32_t s = cu[b], e = cu[b + 1];
  s = s < 0 ? 0 : (s > T ? T : s);
  e = e < s ? s : (e > T ? T : e);
  start = s;
  len = e - s;
}

UGD_HD void clamp_interval(int32_t lo, int32_t hi, int32_t L, int32_t& clo, int32_t& chi) {
  clo = lo < 0 ? 0 : (lo > L ? L : lo);
  chi = hi < clo ? clo : (hi > L ? L : hi);
}

UGD_HD void schedule_chunk(int32_t tid, int32_t nthreads, int32_t B, int32_t& b0, int32_t& b1) {
  const int32_t per = B / nthreads + (B % nthreads != 0);  // ceil without overflowing B + nthreads
  const int64_t lo = static_cast<int64_t>(tid) * per, hi = lo + per;
  b0 = static_cast<int32_t>(lo < B ? lo : B);
  b1 = static_cast<int32_t>(hi < B ? hi : B);
}

UGD_HD int32_t chunk_tile_count(const int32_t* cu, int32_t T, int32_t b0, int32_t b1, int32_t tile) {
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
UGD_HD void chunk_write_offsets(const int32_t* cu, int32_t T, int32_t B, int32_t b0, int32_t b1, int32_t tile,
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
UGD_HD WorkItem find_work_item(const int32_t* tile_offsets, const int32_t* cu, int32_t B, int32_t T,
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

}  // namespace ugd_ops::cuda::attn
