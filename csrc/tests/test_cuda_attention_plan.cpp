// CPU tests of the host-testable parts of the CUDA attention forward (csrc/cuda/attention/: schedule.h,
// tile_bounds.h, mma_fragments.h, online_softmax.h), built by CMake without CUDA and run by ctest:
//
//   fragments   the mma.sync m16n8k16 index maps against the PTX ISA's fragment tables, written out
//               here a second time from the ISA's wording; the shared-memory loaders and acc_to_a
//               against plain matrix indexing; ldmatrix.x4 (.trans), emulated from the ISA's text,
//               with the kernel's lane addresses against those loaders; the emulated warp mma
//               against a plain product
//   schedule    the scheduling kernel's passes (replayed for its 256 threads) and find_work_item
//               against the CPU kernel's tile plan (csrc/cpu/attention_tiles.h), grid bound included
//   skips       TileBounds (in the kernel's reduction order), the visited key tiles and the unmasked
//               fast path against the CPU plan and against the row intervals themselves
//   emulate_bf16, emulate_fp16
//               the forward kernel replayed lane by lane on the CPU -- the kernel's own helper
//               functions in the kernel's order, each mma.sync and shuffle emulated -- on random UGD
//               layouts (UGD masks, awkward lengths 1, 17, 127, empty sequences, empty rows, GQA)
//               against a float64 reference
//
//   test_cuda_attention_plan            run every test
//   test_cuda_attention_plan NAME...    run the named tests
#include <ATen/ATen.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <functional>
#include <limits>
#include <random>
#include <string>
#include <string_view>
#include <vector>

#include "../common/layout.h"
#include "../cpu/attention_tiles.h"
#include "../cuda/attention/mma_fragments.h"
#include "../cuda/attention/online_softmax.h"
#include "../cuda/attention/schedule.h"
#include "../cuda/attention/tile_bounds.h"
#include "test_harness.h"

namespace {

namespace attn = ugd_ops::cuda::attn;

using ugd_ops_tests::g_failures;

// ---------------------------------------------------------------------------------------------
// Fragments
// ---------------------------------------------------------------------------------------------

// The PTX ISA tables for mma.m16n8k16 with .f16/.bf16 A and B and .f32 C, as the ISA words them
// (groupID = %laneid >> 2, threadID_in_group = %laneid % 4):
//   A: row = groupID for a0, a1, a4, a5, groupID + 8 for a2, a3, a6, a7;
//      col = threadID_in_group * 2 + (i & 1) for ai with i < 4, that + 8 for i >= 4
//   B: row (k) = threadID_in_group * 2 + (i & 1) for bi with i < 2, that + 8 for i >= 2; col (n) = groupID
//   C: row = groupID for c0, c1, groupID + 8 for c2, c3; col = threadID_in_group * 2 + (i & 1)
void isa_a(int lane, int i, int& row, int& col) {
  const int gid = lane >> 2, tig = lane % 4;
  row = (i == 0 || i == 1 || i == 4 || i == 5) ? gid : gid + 8;
  col = tig * 2 + (i & 1) + (i >= 4 ? 8 : 0);
}
void isa_b(int lane, int i, int& k, int& n) {
  const int gid = lane >> 2, tig = lane % 4;
  k = tig * 2 + (i & 1) + (i >= 2 ? 8 : 0);
  n = gid;
}
void isa_c(int lane, int i, int& row, int& col) {
  const int gid = lane >> 2, tig = lane % 4;
  row = i < 2 ? gid : gid + 8;
  col = tig * 2 + (i & 1);
}

// A warp's fragments of one mma: a[lane][4], b[lane][2] registers, c[lane][4] floats.
struct WarpA { uint32_t r[32][4]; };
struct WarpB { uint32_t r[32][2]; };

using Bits2Float = float (*)(uint16_t);
float bf16_to_f(uint16_t b) { return static_cast<float>(c10::BFloat16(b, c10::BFloat16::from_bits())); }
float fp16_to_f(uint16_t b) { return static_cast<float>(c10::Half(b, c10::Half::from_bits())); }
uint16_t f_to_bf16(float x) { return c10::BFloat16(x).x; }
uint16_t f_to_fp16(float x) { return c10::Half(x).x; }

uint16_t half_of(uint32_t reg, int which) { return static_cast<uint16_t>(which ? reg >> 16 : reg & 0xffffu); }

// d[lane][e] += sum_k A[row][k] B[k][col] with A, B rebuilt from the fragments through the maps,
// products in fp32 as the tensor cores keep them (exact for 16-bit inputs), summed in double and
// rounded once (the hardware's summation order is unspecified; its rounding is at fp32 level).
void emulate_mma(float (*d)[4], const WarpA& a, const WarpB& b, Bits2Float to_f) {
  float A[16][16], Bm[16][8];
  for (int lane = 0; lane < 32; ++lane) {
    for (int e = 0; e < 8; ++e)
      A[attn::frag_a_row(lane, e)][attn::frag_a_col(lane, e)] = to_f(half_of(a.r[lane][e / 2], e % 2));
    for (int e = 0; e < 4; ++e)
      Bm[attn::frag_b_k(lane, e)][attn::frag_b_n(lane, e)] = to_f(half_of(b.r[lane][e / 2], e % 2));
  }
  for (int lane = 0; lane < 32; ++lane) {
    for (int e = 0; e < 4; ++e) {
      const int row = attn::frag_c_row(lane, e), col = attn::frag_c_col(lane, e);
      double acc = d[lane][e];
      for (int k = 0; k < 16; ++k) acc += static_cast<double>(A[row][k]) * Bm[k][col];
      d[lane][e] = static_cast<float>(acc);
    }
  }
}

// ldmatrix.sync.aligned.m8n8.x4[.trans].shared.b16 as the PTX ISA describes it: lanes 8j .. 8j + 7
// give the addresses of rows 0 .. 7 of matrix j; register j of lane i receives, without .trans,
// elements 2 (i % 4) and 2 (i % 4) + 1 of row i / 4 of matrix j, and with .trans element i / 4 of
// rows 2 (i % 4) and 2 (i % 4) + 1 (the matrix is delivered transposed). `offset` gives each lane's
// row address as (row, col) relative to (row0, col0) of the row-major x.
void emulate_ldmatrix_x4(const uint16_t* x, int ld, int row0, int col0, void (*offset)(int, int&, int&), bool trans,
                         uint32_t regs[32][4]) {
  const uint16_t* row_ptr[4][8];
  for (int lane = 0; lane < 32; ++lane) {
    int r, c;
    offset(lane, r, c);
    row_ptr[lane / 8][lane % 8] = x + (row0 + r) * ld + col0 + c;
  }
  for (int i = 0; i < 32; ++i)
    for (int j = 0; j < 4; ++j) {
      if (!trans) {
        regs[i][j] = attn::pack2(row_ptr[j][i / 4][2 * (i % 4)], row_ptr[j][i / 4][2 * (i % 4) + 1]);
      } else {
        regs[i][j] = attn::pack2(row_ptr[j][2 * (i % 4)][i / 4], row_ptr[j][2 * (i % 4) + 1][i / 4]);
      }
    }
}

void test_fragments() {
  // The maps equal the ISA tables, and each is a bijection onto its matrix.
  int seen_a[16][16] = {}, seen_b[16][8] = {}, seen_c[16][8] = {};
  for (int lane = 0; lane < 32; ++lane) {
    for (int e = 0; e < 8; ++e) {
      int r, c;
      isa_a(lane, e, r, c);
      EXPECT(attn::frag_a_row(lane, e) == r && attn::frag_a_col(lane, e) == c, "A lane ", lane, " e ", e);
      ++seen_a[r][c];
    }
    for (int e = 0; e < 4; ++e) {
      int k, n;
      isa_b(lane, e, k, n);
      EXPECT(attn::frag_b_k(lane, e) == k && attn::frag_b_n(lane, e) == n, "B lane ", lane, " e ", e);
      ++seen_b[k][n];
      int r, c;
      isa_c(lane, e, r, c);
      EXPECT(attn::frag_c_row(lane, e) == r && attn::frag_c_col(lane, e) == c, "C lane ", lane, " e ", e);
      ++seen_c[r][c];
    }
  }
  for (int r = 0; r < 16; ++r)
    for (int c = 0; c < 16; ++c)
      EXPECT(seen_a[r][c] == 1, "A element (", r, ", ", c, ") held ", seen_a[r][c], " times");
  for (int r = 0; r < 16; ++r)
    for (int c = 0; c < 8; ++c) {
      EXPECT(seen_b[r][c] == 1, "B element (", r, ", ", c, ") held ", seen_b[r][c], " times");
      EXPECT(seen_c[r][c] == 1, "C element (", r, ", ", c, ") held ", seen_c[r][c], " times");
    }
  // acc_to_a: A element e of k-block j is C element e % 4 of n-tile 2j + e / 4, the same (row, col).
  for (int lane = 0; lane < 32; ++lane) {
    float lo[4], hi[4];
    for (int e = 0; e < 4; ++e) {
      lo[e] = static_cast<float>(100 * attn::frag_c_row(lane, e) + attn::frag_c_col(lane, e));
      hi[e] = static_cast<float>(100 * attn::frag_c_row(lane, e) + attn::frag_c_col(lane, e) + 8);
    }
    uint32_t a[4];
    attn::acc_to_a(lo, hi, f_to_fp16, a);
    for (int e = 0; e < 8; ++e) {
      const float got = fp16_to_f(half_of(a[e / 2], e % 2));
      EXPECT(got == static_cast<float>(100 * attn::frag_a_row(lane, e) + attn::frag_a_col(lane, e)),
             "acc_to_a lane ", lane, " e ", e, " got ", got);
    }
  }
  // Loaders: X[r][c] = a unique value; ld 24 (a padded pitch), offsets inside.
  constexpr int kLd = 24;
  std::vector<uint16_t> x(40 * kLd);
  for (size_t i = 0; i < x.size(); ++i) x[i] = static_cast<uint16_t>(i + 1);
  auto X = [&](int r, int c) { return x[r * kLd + c]; };
  for (int lane = 0; lane < 32; ++lane) {
    uint32_t a[4], b[2], bt[2];
    attn::load_a_rowmajor(x.data(), kLd, 16, 8, lane, a);
    for (int e = 0; e < 8; ++e)
      EXPECT(half_of(a[e / 2], e % 2) == X(16 + attn::frag_a_row(lane, e), 8 + attn::frag_a_col(lane, e)),
             "load_a_rowmajor lane ", lane, " e ", e);
    attn::load_b_from_rows(x.data(), kLd, 8, 24, lane, b);  // B(k, n) = X[24 + n][8 + k]
    attn::load_b_from_cols(x.data(), kLd, 16, 8, lane, bt);  // B(k, n) = X[16 + k][8 + n]
    for (int e = 0; e < 4; ++e) {
      const int k = attn::frag_b_k(lane, e), n = attn::frag_b_n(lane, e);
      EXPECT(half_of(b[e / 2], e % 2) == X(24 + n, 8 + k), "load_b_from_rows lane ", lane, " e ", e);
      EXPECT(half_of(bt[e / 2], e % 2) == X(16 + k, 8 + n), "load_b_from_cols lane ", lane, " e ", e);
    }
  }
  // One ldmatrix.x4 with the ldsm_*_offset addresses delivers what the loaders read.
  {
    uint32_t r[32][4];
    emulate_ldmatrix_x4(x.data(), kLd, 16, 8, attn::ldsm_a_offset, false, r);
    for (int lane = 0; lane < 32; ++lane) {
      uint32_t a[4];
      attn::load_a_rowmajor(x.data(), kLd, 16, 8, lane, a);
      for (int j = 0; j < 4; ++j) EXPECT(r[lane][j] == a[j], "ldmatrix A lane ", lane, " reg ", j);
    }
    emulate_ldmatrix_x4(x.data(), kLd, 16, 8, attn::ldsm_bt_offset, false, r);  // n0 = 16, k0 = 8
    for (int lane = 0; lane < 32; ++lane) {
      uint32_t b0[2], b1[2];
      attn::load_b_from_rows(x.data(), kLd, 8, 16, lane, b0);
      attn::load_b_from_rows(x.data(), kLd, 8, 24, lane, b1);
      EXPECT(r[lane][0] == b0[0] && r[lane][1] == b0[1] && r[lane][2] == b1[0] && r[lane][3] == b1[1],
             "ldmatrix B from rows, lane ", lane);
    }
    emulate_ldmatrix_x4(x.data(), kLd, 16, 8, attn::ldsm_a_offset, true, r);  // k0 = 16, n0 = 8
    for (int lane = 0; lane < 32; ++lane) {
      uint32_t b0[2], b1[2];
      attn::load_b_from_cols(x.data(), kLd, 16, 8, lane, b0);
      attn::load_b_from_cols(x.data(), kLd, 16, 16, lane, b1);
      EXPECT(r[lane][0] == b0[0] && r[lane][1] == b0[1] && r[lane][2] == b1[0] && r[lane][3] == b1[1],
             "ldmatrix.trans B from columns, lane ", lane);
    }
  }
  // The emulated mma on loader-built fragments equals a plain product.
  std::mt19937 gen(7);
  std::uniform_real_distribution<float> u(-2, 2);
  std::vector<uint16_t> qa(16 * kLd), kb(8 * kLd);
  for (auto& v : qa) v = f_to_bf16(u(gen));
  for (auto& v : kb) v = f_to_bf16(u(gen));
  WarpA A;
  WarpB Bf;
  float d[32][4] = {};
  for (int lane = 0; lane < 32; ++lane) {
    attn::load_a_rowmajor(qa.data(), kLd, 0, 0, lane, A.r[lane]);
    attn::load_b_from_rows(kb.data(), kLd, 0, 0, lane, Bf.r[lane]);
  }
  emulate_mma(d, A, Bf, bf16_to_f);
  for (int lane = 0; lane < 32; ++lane)
    for (int e = 0; e < 4; ++e) {
      const int r = attn::frag_c_row(lane, e), c = attn::frag_c_col(lane, e);
      double want = 0;
      for (int k = 0; k < 16; ++k) want += static_cast<double>(bf16_to_f(qa[r * kLd + k])) * bf16_to_f(kb[c * kLd + k]);
      EXPECT(std::abs(d[lane][e] - want) <= 1e-5 * (1 + std::abs(want)), "mma lane ", lane, " e ", e);
    }
}

// ---------------------------------------------------------------------------------------------
// Layouts
// ---------------------------------------------------------------------------------------------
struct Layout {
  std::vector<int32_t> cu, ks, ke;
  int32_t T() const { return cu.back(); }
  int32_t B() const { return static_cast<int32_t>(cu.size()) - 1; }
};

// Random layouts: UGD masks (spans with empty parts), plain causal / bidirectional, and
// arbitrary intervals with empty rows; lengths drawn from `lens` (0 = an empty sequence).
Layout random_layout(std::mt19937& gen, int B, const std::vector<int>& lens) {
  Layout l;
  l.cu.push_back(0);
  std::uniform_int_distribution<int> pick(0, static_cast<int>(lens.size()) - 1), kind(0, 4);
  for (int b = 0; b < B; ++b) {
    const int L = lens[pick(gen)];
    const int kd = kind(gen);
    std::uniform_int_distribution<int> cut(0, std::max(L, 0));
    int c1 = cut(gen), c2 = cut(gen), c3 = cut(gen);
    int s[3] = {c1, c2, c3};
    std::sort(s, s + 3);
    const int Lq = s[0], Ld = s[1] - s[0], Lp = s[2] - s[1];
    for (int i = 0; i < L; ++i) {
      int32_t lo = 0, hi = 0;
      if (kd <= 3) {
        ugd_ops::row_interval(static_cast<ugd_ops::Mask>(kd), Lq, Ld, Lp, L, i, lo, hi);
      } else {
        std::uniform_int_distribution<int> e(0, L);
        lo = e(gen);
        hi = e(gen);
        if (lo > hi) std::swap(lo, hi);
        if (e(gen) % 5 == 0) hi = lo;  // an empty row
      }
      l.ks.push_back(lo);
      l.ke.push_back(hi);
    }
    l.cu.push_back(l.cu.back() + std::max(L, 0));
  }
  return l;
}

at::Tensor i32(const std::vector<int32_t>& v) {
  return at::tensor(at::ArrayRef<int32_t>(v), at::TensorOptions().dtype(at::kInt)).clone();
}

// The scheduling kernel, replayed for its 256 threads (schedule.cu).
std::vector<int32_t> replay_schedule(const Layout& l, int32_t tile) {
  constexpr int kThreads = 256;
  const int32_t B = l.B(), T = l.T();
  std::vector<int32_t> offsets(B + 1, -1), base(kThreads);
  for (int t = 0; t < kThreads; ++t) {
    int32_t b0, b1;
    attn::schedule_chunk(t, kThreads, B, b0, b1);
    base[t] = attn::chunk_tile_count(l.cu.data(), T, b0, b1, tile);
  }
  int32_t run = 0;
  for (int t = 0; t < kThreads; ++t) {
    const int32_t n = base[t];
    base[t] = run;
    run += n;
  }
  if (B == 0) offsets[0] = 0;
  for (int t = 0; t < kThreads; ++t) {
    int32_t b0, b1;
    attn::schedule_chunk(t, kThreads, B, b0, b1);
    attn::chunk_write_offsets(l.cu.data(), T, B, b0, b1, tile, base[t], offsets.data());
  }
  return offsets;
}

std::vector<Layout> schedule_layouts() {
  std::mt19937 gen(11);
  std::vector<Layout> out;
  out.push_back(random_layout(gen, 1, {1}));
  out.push_back(random_layout(gen, 1, {64}));
  out.push_back(random_layout(gen, 1, {65}));
  out.push_back(random_layout(gen, 3, {0}));
  out.push_back(random_layout(gen, 7, {0, 1, 17, 127}));
  out.push_back(random_layout(gen, 32, {20, 85, 100, 420, 0, 63, 64, 129}));
  out.push_back(random_layout(gen, 1000, {1, 2, 3, 4, 5, 6, 7, 8}));  // more sequences than scheduler threads
  out.push_back(random_layout(gen, 600, {0, 1, 127, 300}));
  out.push_back(random_layout(gen, 2, {4352, 17}));
  return out;
}

void test_schedule() {
  for (const Layout& l : schedule_layouts()) {
    const int32_t B = l.B(), T = l.T();
    const auto plan = ugd_ops::cpu::make_tile_plan(i32(l.cu), i32(l.ks), i32(l.ke));
    const std::vector<int32_t> offsets = replay_schedule(l, ugd_ops::cpu::kBlockM);
    EXPECT(static_cast<int64_t>(plan.seqs.size()) == B, "B");
    for (int32_t b = 0; b < B; ++b)
      EXPECT(offsets[b] == plan.seqs[b].first_tile && offsets[b + 1] - offsets[b] == plan.seqs[b].num_tiles,
             "offsets of sequence ", b, " (B = ", B, ")");
    EXPECT(offsets[B] == static_cast<int32_t>(plan.tiles.size()), "total tiles ", offsets[B], " vs ",
           plan.tiles.size());
    const int64_t slots = attn::max_work_slots(T, B, ugd_ops::cpu::kBlockM);
    EXPECT(slots >= offsets[B], "grid bound ", slots, " < tiles ", offsets[B]);
    size_t next = 0;
    for (int64_t s = 0; s < slots; ++s) {
      const attn::WorkItem w = attn::find_work_item(offsets.data(), l.cu.data(), B, T, s, ugd_ops::cpu::kBlockM);
      if (s < offsets[B]) {
        const auto& t = plan.tiles[next++];
        EXPECT(w.valid && w.seq_start == t.seq_start && w.seq_len == t.seq_len && w.row0 == t.row0,
               "slot ", s, ": (", w.valid, ", ", w.seq_start, ", ", w.seq_len, ", ", w.row0, ") vs CPU (",
               t.seq_start, ", ", t.seq_len, ", ", t.row0, ")");
        EXPECT(l.cu[w.seq] == w.seq_start, "slot ", s, " sequence index");
      } else {
        EXPECT(!w.valid, "surplus slot ", s, " is not marked invalid");
      }
    }
  }
  // A broken cu_seqlens never leads outside [0, T].
  const std::vector<int32_t> bad = {0, 50, 20, 90};
  for (int32_t b = 0; b < 3; ++b) {
    int32_t s, L;
    attn::sequence_bounds(bad.data(), b, 60, s, L);
    EXPECT(s >= 0 && L >= 0 && s + L <= 60, "sequence_bounds of a broken layout: ", s, ", ", L);
  }
  int32_t lo, hi;
  attn::clamp_interval(-3, 99, 10, lo, hi);
  EXPECT(lo == 0 && hi == 10, "clamp_interval");
  attn::clamp_interval(7, 2, 10, lo, hi);
  EXPECT(lo == 7 && hi == 7, "clamp_interval of a reversed interval");

  // No int32 overflow near 2^31 in the tile count or the scheduler's chunking.
  constexpr int32_t kBig = std::numeric_limits<int32_t>::max() - 1;
  for (const int32_t len : {-5, 0, 1, 63, 64, 65, kBig, kBig + 1})
    EXPECT(attn::num_tiles(len, 64) == (len > 0 ? (static_cast<int64_t>(len) + 63) / 64 : 0), "num_tiles(", len,
           ", 64) = ", attn::num_tiles(len, 64));
  for (const int32_t B : {0, 1, 255, 256, 257, 1000, kBig, kBig + 1}) {
    int32_t expect_b0 = 0;
    for (int t = 0; t < 256; ++t) {
      int32_t b0, b1;
      attn::schedule_chunk(t, 256, B, b0, b1);
      EXPECT(b0 == expect_b0 && b1 >= b0 && b1 <= B, "schedule_chunk(", t, ", 256, ", B, ") = [", b0, ", ", b1, ")");
      expect_b0 = b1;
    }
    EXPECT(expect_b0 == B, "schedule_chunk's chunks cover [0, ", B, "), end at ", expect_b0);
  }

  // find_work_item on garbage tile_offsets (wrapped, unsorted totals, a non-zero first entry) and a
  // broken cu_seqlens: a valid item always names rows inside its sequence, inside [0, T).
  std::mt19937 gen(3);
  const int32_t extremes[] = {0, 1, 63, 64, std::numeric_limits<int32_t>::min(), std::numeric_limits<int32_t>::max(),
                              std::numeric_limits<int32_t>::min() + 7, std::numeric_limits<int32_t>::max() - 7};
  for (int trial = 0; trial < 2000; ++trial) {
    const int32_t B = 1 + static_cast<int32_t>(gen() % 6), T = static_cast<int32_t>(gen() % 300);
    std::vector<int32_t> cu(B + 1), offsets(B + 1);
    for (auto& x : cu) x = gen() % 3 ? static_cast<int32_t>(gen() % (T + 1)) : extremes[gen() % 8];
    for (auto& x : offsets) x = gen() % 2 ? static_cast<int32_t>(gen() % 20) : static_cast<int32_t>(gen());
    offsets[0] = gen() % 2 ? 0 : offsets[0];
    std::sort(offsets.begin(), offsets.end());
    if (gen() % 2) offsets[B] = extremes[gen() % 8];  // a wrapped total
    for (const int64_t slot : {int64_t{0}, int64_t{1}, int64_t{5}, int64_t{17}, static_cast<int64_t>(gen() % 100000),
                               int64_t{std::numeric_limits<int32_t>::max()} - 1}) {
      const attn::WorkItem w = attn::find_work_item(offsets.data(), cu.data(), B, T, slot, 64);
      if (!w.valid) continue;
      EXPECT(w.seq >= 0 && w.seq < B && w.seq_start >= 0 && w.seq_len >= 0 &&
                 static_cast<int64_t>(w.seq_start) + w.seq_len <= T && w.row0 >= 0 && w.row0 < w.seq_len,
             "find_work_item on a broken schedule: slot ", slot, " -> seq ", w.seq, " start ", w.seq_start, " len ",
             w.seq_len, " row0 ", w.row0, " (T = ", T, ")");
    }
  }
}

// TileBounds of rows [row0, row0 + 64) in the kernel's order: each lane adds its two rows, then
// xor-shuffle merges within a warp (16, 8, 4, 2, 1), then the four warps in order.
attn::TileBounds kernel_tile_bounds(const Layout& l, int32_t start, int32_t L, int32_t row0) {
  attn::TileBounds lane_tb[4][32];
  for (int warp = 0; warp < 4; ++warp)
    for (int lane = 0; lane < 32; ++lane)
      for (int hh = 0; hh < 2; ++hh) {
        const int32_t r = row0 + warp * 16 + attn::frag_c_row(lane, 2 * hh);
        if (r < L) {
          int32_t lo, hi;
          attn::clamp_interval(l.ks[start + r], l.ke[start + r], L, lo, hi);
          lane_tb[warp][lane].add_row(lo, hi);
        }
      }
  for (int warp = 0; warp < 4; ++warp)
    for (int off = 16; off >= 1; off /= 2) {
      attn::TileBounds next[32];
      for (int lane = 0; lane < 32; ++lane) {
        next[lane] = lane_tb[warp][lane];
        next[lane].merge(lane_tb[warp][lane ^ off]);
      }
      std::copy(next, next + 32, lane_tb[warp]);
    }
  attn::TileBounds tb;
  for (int warp = 0; warp < 4; ++warp) tb.merge(lane_tb[warp][0]);
  return tb;
}

void test_skips() {
  constexpr int32_t BN = ugd_ops::cpu::kBlockN;
  int64_t visited = 0, unmasked = 0;
  for (const Layout& l : schedule_layouts()) {
    const auto plan = ugd_ops::cpu::make_tile_plan(i32(l.cu), i32(l.ks), i32(l.ke));
    for (const auto& t : plan.tiles) {
      const attn::TileBounds tb = kernel_tile_bounds(l, t.seq_start, t.seq_len, t.row0);
      EXPECT(tb.k_lo == t.k_lo && tb.k_hi == t.k_hi && tb.full_lo == t.full_lo && tb.full_hi == t.full_hi,
             "tile bounds at ", t.seq_start, "+", t.row0);
      EXPECT(attn::first_key_tile(tb, BN) == ugd_ops::cpu::first_key_tile(t), "first key tile");
      // The kernel visits c0 = first, first + BN, ... < k_hi: the CPU's visited tiles, in order.
      std::vector<int32_t> cpu_tiles, gpu_tiles;
      for (int32_t c0 = ugd_ops::cpu::first_key_tile(t); c0 < t.k_hi; c0 += BN)
        if (ugd_ops::cpu::tile_meets(t, c0, std::min(c0 + BN, t.seq_len))) cpu_tiles.push_back(c0);
      for (int32_t c0 = attn::first_key_tile(tb, BN); c0 < tb.k_hi; c0 += BN) gpu_tiles.push_back(c0);
      EXPECT(cpu_tiles == gpu_tiles, "visited key tiles at ", t.seq_start, "+", t.row0);
      for (int32_t c0 : gpu_tiles) {
        ++visited;
        const int32_t c1 = std::min(c0 + BN, t.seq_len);
        const bool fast = attn::key_tile_unmasked(tb, c0, BN);
        unmasked += fast;
        // The fast path implies the CPU's "inside", and equals it for full-width tiles.
        EXPECT(!fast || ugd_ops::cpu::tile_inside(t, c0, c1), "unmasked but not inside");
        if (c1 == c0 + BN) EXPECT(fast == ugd_ops::cpu::tile_inside(t, c0, c1), "full tile: fast != inside");
        // And it is right by the rows themselves: every row reads all BN columns.
        if (fast)
          for (int32_t r = t.row0; r < t.row1; ++r)
            EXPECT(l.ks[t.seq_start + r] <= c0 && c0 + BN <= l.ke[t.seq_start + r], "fast path on row ", r);
      }
      // Every allowed (row, column) lies in a visited tile.
      for (int32_t r = t.row0; r < t.row1; ++r) {
        const int32_t lo = l.ks[t.seq_start + r], hi = l.ke[t.seq_start + r];
        if (lo < hi)
          EXPECT(!gpu_tiles.empty() && gpu_tiles.front() <= lo && hi <= std::min(gpu_tiles.back() + BN, t.seq_len),
                 "row ", r, " [", lo, ", ", hi, ") not covered");
      }
    }
  }
  EXPECT(visited > 100 && unmasked > 10, "the layouts exercise too little: ", visited, " tiles, ", unmasked,
         " unmasked");
}

// ---------------------------------------------------------------------------------------------
// The forward kernel, replayed lane by lane (fwd_kernel.cuh, step for step)
// ---------------------------------------------------------------------------------------------
struct Inputs {
  int32_t T, Hq, Hkv, D;
  std::vector<uint16_t> q, k, v;  // [T, H, D] contiguous, 16-bit bits
};

template <int kD>
void emulate_forward(const Inputs& in, const Layout& l, float scale, Bits2Float to_f, uint16_t (*to16)(float),
                     std::vector<float>& out, std::vector<float>& lse) {
  constexpr int kBM = 64, kBN = 64, kLd = kD + 8, kNTiles = kBN / 8, kDTiles = kD / 8, kKSteps = kD / 16;
  const int32_t T = in.T, Hq = in.Hq, B = l.B(), group = in.Hq / in.Hkv;
  const float scale_log2 = static_cast<float>(scale * 1.4426950408889634);
  out.assign(static_cast<size_t>(T) * Hq * kD, std::numeric_limits<float>::quiet_NaN());  // poisoned
  lse.assign(static_cast<size_t>(T) * Hq, std::numeric_limits<float>::quiet_NaN());
  const std::vector<int32_t> offsets = replay_schedule(l, kBM);
  const int64_t slots = attn::max_work_slots(T, B, kBM);
  std::vector<uint16_t> sQ(kBM * kLd), sK(kBN * kLd), sV(kBN * kLd);
  auto load = [&](std::vector<uint16_t>& dst, const std::vector<uint16_t>& src, int32_t H, int32_t head, int32_t start,
                  int32_t row0, int32_t rows, int32_t L) {
    for (int r = 0; r < rows; ++r)
      for (int c = 0; c < kD; ++c)
        dst[r * kLd + c] = row0 + r < L ? src[(static_cast<size_t>(start + row0 + r) * H + head) * kD + c] : 0;
  };
  for (int64_t item = 0; item < slots * Hq; ++item) {
    const int32_t h = static_cast<int32_t>(item % Hq);
    const attn::WorkItem w = attn::find_work_item(offsets.data(), l.cu.data(), B, T, item / Hq, kBM);
    if (!w.valid) continue;
    const int32_t g = h / group, L = w.seq_len, start = w.seq_start;
    const attn::TileBounds tb = kernel_tile_bounds(l, start, L, w.row0);
    for (int warp = 0; warp < 4; ++warp) {
      // Per-lane state of this warp.
      int32_t lo[32][2], hi[32][2];
      float o[32][kDTiles][4] = {}, m[32][2], lsum[32][2];
      WarpA qa[kKSteps];
      for (int lane = 0; lane < 32; ++lane)
        for (int hh = 0; hh < 2; ++hh) {
          const int32_t r = w.row0 + warp * 16 + attn::frag_c_row(lane, 2 * hh);
          lo[lane][hh] = hi[lane][hh] = 0;
          if (r < L) attn::clamp_interval(l.ks[start + r], l.ke[start + r], L, lo[lane][hh], hi[lane][hh]);
          m[lane][hh] = attn::neg_inf_f();
          lsum[lane][hh] = 0;
        }
      if (tb.any()) {
        const int32_t c_first = attn::first_key_tile(tb, kBN);
        load(sQ, in.q, Hq, h, start, w.row0, kBM, L);
        for (int32_t c0 = c_first; c0 < tb.k_hi; c0 += kBN) {
          load(sK, in.k, in.Hkv, g, start, c0, kBN, L);
          load(sV, in.v, in.Hkv, g, start, c0, kBN, L);
          if (c0 == c_first)
            for (int ks = 0; ks < kKSteps; ++ks)
              emulate_ldmatrix_x4(sQ.data(), kLd, warp * 16, ks * 16, attn::ldsm_a_offset, false, qa[ks].r);
          float s[32][kNTiles][4] = {};
          for (int ks = 0; ks < kKSteps; ++ks)
            for (int np = 0; np < kNTiles / 2; ++np) {
              uint32_t r[32][4];
              emulate_ldmatrix_x4(sK.data(), kLd, np * 16, ks * 16, attn::ldsm_bt_offset, false, r);
              for (int half = 0; half < 2; ++half) {
                const int nt = 2 * np + half;
                WarpB b;
                float c[32][4];
                for (int lane = 0; lane < 32; ++lane) {
                  b.r[lane][0] = r[lane][2 * half];
                  b.r[lane][1] = r[lane][2 * half + 1];
                  for (int e = 0; e < 4; ++e) c[lane][e] = s[lane][nt][e];
                }
                emulate_mma(c, qa[ks], b, to_f);
                for (int lane = 0; lane < 32; ++lane)
                  for (int e = 0; e < 4; ++e) s[lane][nt][e] = c[lane][e];
              }
            }
          const bool fast = attn::key_tile_unmasked(tb, c0, kBN);
          float mx[32][2];
          for (int lane = 0; lane < 32; ++lane)
            attn::mask_scale_rowmax<kNTiles>(s[lane], lane, c0, fast, lo[lane], hi[lane], scale_log2, mx[lane]);
          for (int off = 1; off <= 2; off *= 2) {  // __shfl_xor_sync(.., 1) then (.., 2)
            float nx[32][2];
            for (int lane = 0; lane < 32; ++lane)
              for (int hh = 0; hh < 2; ++hh) nx[lane][hh] = attn::fmax_f(mx[lane][hh], mx[lane ^ off][hh]);
            std::copy(&nx[0][0], &nx[0][0] + 64, &mx[0][0]);
          }
          for (int lane = 0; lane < 32; ++lane)
            attn::online_softmax_step<kNTiles, kDTiles>(s[lane], mx[lane], m[lane], lsum[lane], o[lane]);
          for (int kk = 0; kk < kBN / 16; ++kk) {
            WarpA pa;
            for (int lane = 0; lane < 32; ++lane)
              attn::acc_to_a(s[lane][2 * kk], s[lane][2 * kk + 1], to16, pa.r[lane]);
            for (int dp = 0; dp < kDTiles / 2; ++dp) {
              uint32_t r[32][4];
              emulate_ldmatrix_x4(sV.data(), kLd, kk * 16, dp * 16, attn::ldsm_a_offset, true, r);
              for (int half = 0; half < 2; ++half) {
                const int dt = 2 * dp + half;
                WarpB b;
                float c[32][4];
                for (int lane = 0; lane < 32; ++lane) {
                  b.r[lane][0] = r[lane][2 * half];
                  b.r[lane][1] = r[lane][2 * half + 1];
                  for (int e = 0; e < 4; ++e) c[lane][e] = o[lane][dt][e];
                }
                emulate_mma(c, pa, b, to_f);
                for (int lane = 0; lane < 32; ++lane)
                  for (int e = 0; e < 4; ++e) o[lane][dt][e] = c[lane][e];
              }
            }
          }
        }
      }
      for (int off = 1; off <= 2; off *= 2) {  // the row sums over the quad
        float nl[32][2];
        for (int lane = 0; lane < 32; ++lane)
          for (int hh = 0; hh < 2; ++hh) nl[lane][hh] = lsum[lane][hh] + lsum[lane ^ off][hh];
        std::copy(&nl[0][0], &nl[0][0] + 64, &lsum[0][0]);
      }
      for (int lane = 0; lane < 32; ++lane)
        for (int hh = 0; hh < 2; ++hh) {
          const int32_t r = w.row0 + warp * 16 + attn::frag_c_row(lane, 2 * hh);
          if (r >= L) continue;
          float inv_l, row_lse;
          attn::finish_row(m[lane][hh], lsum[lane][hh], inv_l, row_lse);
          for (int dt = 0; dt < kDTiles; ++dt)
            for (int x = 0; x < 2; ++x) {
              const int col = dt * 8 + attn::frag_c_col(lane, 2 * hh) + x;
              out[(static_cast<size_t>(start + r) * Hq + h) * kD + col] = to_f(to16(o[lane][dt][2 * hh + x] * inv_l));
            }
          if (lane % 4 == 0) lse[static_cast<size_t>(h) * T + start + r] = row_lse;
        }
    }
  }
}

// float64 reference on the 16-bit inputs.
void reference_forward(const Inputs& in, const Layout& l, double scale, Bits2Float to_f, std::vector<double>& out,
                       std::vector<double>& lse) {
  const int32_t T = in.T, Hq = in.Hq, D = in.D, group = in.Hq / in.Hkv;
  out.assign(static_cast<size_t>(T) * Hq * D, 0.0);
  lse.assign(static_cast<size_t>(T) * Hq, -std::numeric_limits<double>::infinity());
  std::vector<double> p;
  for (int32_t b = 0; b < l.B(); ++b)
    for (int32_t i = l.cu[b]; i < l.cu[b + 1]; ++i)
      for (int32_t h = 0; h < Hq; ++h) {
        const int32_t lo = l.cu[b] + l.ks[i], hi = l.cu[b] + l.ke[i], g = h / group;
        if (lo >= hi) continue;
        p.assign(hi - lo, 0.0);
        double mx = -std::numeric_limits<double>::infinity();
        for (int32_t j = lo; j < hi; ++j) {
          double s = 0;
          for (int x = 0; x < D; ++x)
            s += static_cast<double>(to_f(in.q[(static_cast<size_t>(i) * Hq + h) * D + x])) *
                 to_f(in.k[(static_cast<size_t>(j) * in.Hkv + g) * D + x]);
          p[j - lo] = s * scale;
          mx = std::max(mx, p[j - lo]);
        }
        double sum = 0;
        for (auto& x : p) sum += (x = std::exp(x - mx));
        for (int32_t j = lo; j < hi; ++j)
          for (int x = 0; x < D; ++x)
            out[(static_cast<size_t>(i) * Hq + h) * D + x] +=
                p[j - lo] / sum * to_f(in.v[(static_cast<size_t>(j) * in.Hkv + g) * D + x]);
        lse[static_cast<size_t>(h) * T + i] = mx + std::log(sum);
      }
}

template <int kD>
void check_emulation(const Layout& l, int Hq, int Hkv, bool bf16, uint32_t seed, const std::string& what) {
  Bits2Float to_f = bf16 ? bf16_to_f : fp16_to_f;
  uint16_t (*to16)(float) = bf16 ? f_to_bf16 : f_to_fp16;
  std::mt19937 gen(seed);
  std::normal_distribution<float> n01(0, 1);
  Inputs in{l.T(), Hq, Hkv, kD, {}, {}, {}};
  in.q.resize(static_cast<size_t>(in.T) * Hq * kD);
  in.k.resize(static_cast<size_t>(in.T) * Hkv * kD);
  in.v.resize(in.k.size());
  // Spread-out logits (q scaled by 2), so that the online rescaling across tiles matters.
  for (auto& x : in.q) x = to16(2 * n01(gen));
  for (auto& x : in.k) x = to16(n01(gen));
  for (auto& x : in.v) x = to16(n01(gen));
  const float scale = 1.0f / std::sqrt(static_cast<float>(kD));
  std::vector<float> out, lse;
  std::vector<double> rout, rlse;
  emulate_forward<kD>(in, l, scale, to_f, to16, out, lse);
  reference_forward(in, l, scale, to_f, rout, rlse);
  // Tolerances: P is rounded to the 16-bit type before P V (as FlashAttention does) and out to it
  // at the end, each a relative error of about one unit in the last place of that type.
  const double eps = bf16 ? 1.0 / 128 : 1.0 / 1024;
  double worst = 0;
  for (size_t i = 0; i < out.size(); ++i) {
    const double err = std::abs(out[i] - rout[i]);
    worst = std::max(worst, err);
    EXPECT(err <= 3 * eps * (0.25 + std::abs(rout[i])), what, ": out[", i, "] = ", out[i], " vs ", rout[i]);
  }
  for (size_t i = 0; i < lse.size(); ++i) {
    if (std::isinf(rlse[i])) {
      EXPECT(lse[i] == -std::numeric_limits<float>::infinity(), what, ": lse[", i, "] = ", lse[i], " for an empty row");
      const int32_t h = static_cast<int32_t>(i / l.T()), t = static_cast<int32_t>(i % l.T());
      for (int x = 0; x < kD; ++x)
        EXPECT(out[(static_cast<size_t>(t) * Hq + h) * kD + x] == 0.0f, what, ": empty row ", t, " out != 0");
    } else {
      EXPECT(std::abs(lse[i] - rlse[i]) <= 1e-4 * (1 + std::abs(rlse[i])), what, ": lse[", i, "] = ", lse[i], " vs ",
             rlse[i]);
    }
  }
  std::printf("  %s: T %d, largest |out - ref| %.3g\n", what.c_str(), l.T(), worst);
}

// A layout from UGD span lengths (Lq, Ld, Lp, Lg) under one mask.
Layout spans_layout(const std::vector<std::array<int32_t, 4>>& spans, ugd_ops::Mask mask) {
  Layout l;
  l.cu.push_back(0);
  for (const auto& sp : spans) {
    const int32_t L = sp[0] + sp[1] + sp[2] + sp[3];
    for (int32_t i = 0; i < L; ++i) {
      int32_t lo, hi;
      ugd_ops::row_interval(mask, sp[0], sp[1], sp[2], L, i, lo, hi);
      l.ks.push_back(lo);
      l.ke.push_back(hi);
    }
    l.cu.push_back(l.cu.back() + L);
  }
  return l;
}

void test_emulate(bool bf16) {
  std::mt19937 gen(bf16 ? 21 : 22);
  const std::vector<Layout> layouts = {
      random_layout(gen, 1, {1}),
      random_layout(gen, 5, {0, 1, 17, 127}),
      random_layout(gen, 4, {63, 64, 65, 129, 0}),
      random_layout(gen, 3, {200, 17, 0}),
      // TTM with spans across several key tiles: D rows never reach the first tile, Q rows never
      // the last, G rows causal across tile edges.
      spans_layout({{70, 70, 10, 30}, {5, 150, 3, 20}, {1, 1, 0, 0}}, ugd_ops::Mask::kTtm),
      random_layout(gen, 300, {1, 2, 3, 4, 5, 6, 7, 8}),
  };
  int i = 0;
  for (const Layout& l : layouts) {
    const std::string tag = std::string(bf16 ? "bf16" : "fp16") + " layout " + std::to_string(i);
    check_emulation<64>(l, 4, 2, bf16, 100 + i, tag + " D64 GQA 4/2");
    if (i % 2 == 0) check_emulation<128>(l, 3, 1, bf16, 200 + i, tag + " D128 GQA 3/1");
    else check_emulation<128>(l, 2, 2, bf16, 200 + i, tag + " D128 MHA 2/2");
    ++i;
  }
}

const std::vector<ugd_ops_tests::TestCase> kTests = {
    {"fragments", test_fragments},
    {"schedule", test_schedule},
    {"skips", test_skips},
    {"emulate_bf16", [] { test_emulate(true); }},
    {"emulate_fp16", [] { test_emulate(false); }},
};

}  // namespace

int main(int argc, char** argv) { return ugd_ops_tests::run_tests(argc, argv, kTests); }
