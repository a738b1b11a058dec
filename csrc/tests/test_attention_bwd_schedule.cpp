// CPU tests of the host-testable parts of the CUDA attention backward (csrc/cuda/attention/
// bwd_schedule.h and bwd_tile_io.h, with the fragment pieces of mma_fragments.h), built by CMake without CUDA
// and run by ctest:
//
//   schedule      the scheduling block's work (replayed for its 256 threads: chunk counts, prefix
//                 sum, write_chunk_headers, tile_reach) against build_schedule_reference and the
//                 CPU kernel's tile plan (csrc/cpu/attention_tiles.h); the grid bound
//   visits        both directions of skipping: every allowed (row, column) pair is visited by the
//                 dk/dv pass of its key tile and the dq pass of its query tile; in `ttm` the key
//                 tile of the Q span skips the D-row tiles between the Q and the P/G rows
//   delta         delta_value and its dlse rule (non-finite dlse counts as 0, as the reference)
//   emulate_bf16, emulate_fp16
//                 the two compute kernels replayed warp by warp, lane by lane on the CPU -- the same
//                 schedule, loaders, p_ds_block and acc_to_a in the kernels' order, each mma.sync
//                 emulated from the fragment maps, 16-bit rounding where the kernel rounds -- on
//                 random layouts (ttm, stm, causal, bidirectional; lengths 1, 17, 127, 0; empty
//                 rows, whose out holds NaN; GQA 6:1 and 1:1; nonzero dlse) against a float64
//                 reference of partitioned_attention_bwd; exact zeros where nothing is read; no NaN
//
//   test_attention_bwd_schedule            run every test
//   test_attention_bwd_schedule NAME...    run the named tests
#include <ATen/ATen.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
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
#include "../cuda/attention/bwd_schedule.h"
#include "../cuda/attention/bwd_tile_io.h"
#include "../cuda/attention/params.h"
#include "test_harness.h"

namespace {

namespace attn = ugd_ops::cuda::attn;
using attn::BwdSmem;

using ugd_ops_tests::g_failures;

constexpr float kInf = std::numeric_limits<float>::infinity();

// ---------------------------------------------------------------------------------------------
// Layouts
// ---------------------------------------------------------------------------------------------
struct Layout {
  std::vector<int32_t> cu, ks, ke;
  int32_t T = 0;
};

// B sequences of random masks and span lengths drawn from `lens` (awkward sizes), some rows
// made empty, some sequences empty (causal / bidirectional of length 0).
Layout random_layout(std::mt19937& rng, int B, const std::vector<int>& lens, double empty_row_p) {
  Layout l;
  l.cu.push_back(0);
  auto pick = [&](const std::vector<int>& v) { return v[std::uniform_int_distribution<size_t>(0, v.size() - 1)(rng)]; };
  std::uniform_real_distribution<double> u(0, 1);
  for (int b = 0; b < B; ++b) {
    const auto mask = static_cast<ugd_ops::Mask>(std::uniform_int_distribution<int>(0, 3)(rng));
    int32_t Lq = 0, Ld = 0, Lp = 0, Lg = 0, L;
    if (mask == ugd_ops::Mask::kTtm || mask == ugd_ops::Mask::kStm) {
      Lq = std::max(1, pick(lens));
      Ld = std::max(1, pick(lens));
      Lp = pick(lens) / 4;
      Lg = pick(lens) / 2;
      L = Lq + Ld + Lp + Lg;
    } else {
      L = u(rng) < 0.1 ? 0 : pick(lens);
    }
    for (int32_t i = 0; i < L; ++i) {
      int32_t lo, hi;
      ugd_ops::row_interval(mask, Lq, Ld, Lp, L, i, lo, hi);
      if (u(rng) < empty_row_p) lo = hi = std::uniform_int_distribution<int32_t>(0, L)(rng);
      l.ks.push_back(lo);
      l.ke.push_back(hi);
    }
    l.cu.push_back(l.cu.back() + L);
  }
  l.T = l.cu.back();
  return l;
}

// A ttm sequence with 64-aligned spans: Q [0, 64), D [64, 192), P [192, 256), G [256, 320).
Layout ttm_aligned() {
  Layout l;
  const int32_t Lq = 64, Ld = 128, Lp = 64, Lg = 64, L = Lq + Ld + Lp + Lg;
  l.cu = {0, L};
  for (int32_t i = 0; i < L; ++i) {
    int32_t lo, hi;
    ugd_ops::row_interval(ugd_ops::Mask::kTtm, Lq, Ld, Lp, L, i, lo, hi);
    l.ks.push_back(lo);
    l.ke.push_back(hi);
  }
  l.T = L;
  return l;
}

// The device's scheduling block, replayed thread by thread for its 256 threads.
int64_t replay_schedule(const Layout& l, std::vector<attn::BwdTile>& tiles) {
  constexpr int kThreads = attn::kScheduleThreads;
  const int32_t B = static_cast<int32_t>(l.cu.size()) - 1;
  const int64_t limit = attn::max_tiles(l.T, B);
  tiles.assign(std::max<int64_t>(limit, 1), attn::BwdTile{-1, -1, -1, -1, -1, -1, -1, -1});
  int32_t b0[kThreads], b1[kThreads], local[kThreads], scan[kThreads];
  for (int t = 0; t < kThreads; ++t) {
    attn::schedule_chunk(t, kThreads, B, b0[t], b1[t]);
    local[t] = attn::chunk_tile_count(l.cu.data(), l.T, b0[t], b1[t], attn::kBwdTile);
  }
  for (int t = 0; t < kThreads; ++t) scan[t] = local[t] + (t ? scan[t - 1] : 0);
  const int64_t total = std::min<int64_t>(scan[kThreads - 1], limit);
  for (int t = 0; t < kThreads; ++t)
    attn::write_chunk_headers(l.cu.data(), l.T, b0[t], b1[t], scan[t] - local[t], total, tiles.data());
  for (int64_t t = 0; t < total; ++t) attn::tile_reach(tiles[t], l.ks.data(), l.ke.data());
  return total;
}

at::Tensor i32(const std::vector<int32_t>& v) {
  return at::tensor(at::ArrayRef<int32_t>(v), at::TensorOptions().dtype(at::kInt));
}

bool same_tile(const attn::BwdTile& a, const attn::BwdTile& b) {
  return a.seq_start == b.seq_start && a.seq_len == b.seq_len && a.row0 == b.row0 && a.row1 == b.row1 &&
         a.k_lo == b.k_lo && a.k_hi == b.k_hi && a.first_tile == b.first_tile && a.num_tiles == b.num_tiles;
}

std::vector<Layout> test_layouts(uint32_t seed) {
  std::mt19937 rng(seed);
  std::vector<Layout> out;
  out.push_back(ttm_aligned());
  out.push_back(random_layout(rng, 1, {1}, 0.0));
  out.push_back(random_layout(rng, 5, {1, 17, 127}, 0.1));
  out.push_back(random_layout(rng, 40, {1, 2, 3, 5, 8}, 0.05));  // many tiny sequences
  out.push_back(random_layout(rng, 300, {1, 17}, 0.0));          // > 256 sequences: chunks of 2
  out.push_back(random_layout(rng, 3, {64, 65, 127, 128, 200}, 0.2));
  Layout empty;  // B = 2 sequences of length 0
  empty.cu = {0, 0, 0};
  out.push_back(empty);
  return out;
}

// ---------------------------------------------------------------------------------------------
// schedule, visits, delta
// ---------------------------------------------------------------------------------------------
void test_schedule() {
  for (const Layout& l : test_layouts(1)) {
    const int32_t B = static_cast<int32_t>(l.cu.size()) - 1;
    std::vector<attn::BwdTile> dev, ref(std::max<int64_t>(attn::max_tiles(l.T, B), 1));
    const int64_t n = replay_schedule(l, dev);
    const int64_t n_ref = attn::build_schedule_reference(l.cu.data(), B, l.T, l.ks.data(), l.ke.data(),
                                                        attn::max_tiles(l.T, B), ref.data());
    EXPECT(n == n_ref, "device replay gives ", n, " tiles, the reference ", n_ref);
    EXPECT(n <= attn::max_tiles(l.T, B), n, " tiles exceed the bound ", attn::max_tiles(l.T, B));
    for (int64_t t = 0; t < std::min(n, n_ref); ++t) EXPECT(same_tile(dev[t], ref[t]), "tile ", t);

    // Against the CPU kernel's plan (same tile size, same bounds).
    static_assert(attn::kBwdTile == ugd_ops::cpu::kBlockM && attn::kBwdTile == ugd_ops::cpu::kBlockN);
    const auto plan = ugd_ops::cpu::make_tile_plan(i32(l.cu), i32(l.ks), i32(l.ke));
    EXPECT(static_cast<int64_t>(plan.tiles.size()) == n, "CPU plan has ", plan.tiles.size(), " tiles, we ", n);
    for (size_t t = 0; t < std::min<size_t>(plan.tiles.size(), n); ++t) {
      const auto& c = plan.tiles[t];
      const auto& d = dev[t];
      EXPECT(c.seq_start == d.seq_start && c.seq_len == d.seq_len && c.row0 == d.row0 && c.row1 == d.row1,
             "tile ", t, " rows");
      EXPECT(c.k_lo == d.k_lo && c.k_hi == d.k_hi, "tile ", t, " reach [", d.k_lo, ", ", d.k_hi, ") vs CPU [",
             c.k_lo, ", ", c.k_hi, ")");
      EXPECT(ugd_ops::cpu::first_key_tile(c) == attn::first_key_col(d), "tile ", t, " first key tile");
      for (int32_t c0 = 0; c0 < d.seq_len; c0 += attn::kBwdTile) {
        const int32_t c1 = std::min(c0 + attn::kBwdTile, d.seq_len);
        EXPECT(ugd_ops::cpu::tile_meets(c, c0, c1) == attn::tile_meets(d, c0, c1), "tile ", t, " meets ", c0);
      }
    }
    for (size_t b = 0; b < plan.seqs.size(); ++b)
      if (plan.seqs[b].num_tiles > 0) {
        const auto& d = dev[plan.seqs[b].first_tile];
        EXPECT(d.first_tile == plan.seqs[b].first_tile && d.num_tiles == plan.seqs[b].num_tiles, "sequence ", b);
      }
  }
  // A schedule cut by a too small limit (only cu_seqlens that break the contract can do that on
  // the device): no header at or past the limit is written.
  Layout l = test_layouts(2)[2];
  std::vector<attn::BwdTile> t(64, attn::BwdTile{-1, -1, -1, -1, -1, -1, -1, -1});
  const int64_t n = attn::build_schedule_reference(l.cu.data(), static_cast<int32_t>(l.cu.size()) - 1, l.T,
                                                  l.ks.data(), l.ke.data(), 2, t.data());
  EXPECT(n == 2 && t[2].row0 == -1, "a cut schedule has ", n, " tiles");
  // max_tiles: sum_b ceil(L_b / 64) <= T / 64 + B and <= T.
  EXPECT(attn::max_tiles(0, 3) == 0 && attn::max_tiles(1, 1) == 1 && attn::max_tiles(128, 1) == 3 &&
             attn::max_tiles(129, 2) == 4,
         "max_tiles");
}

void test_visits() {
  for (const Layout& l : test_layouts(3)) {
    std::vector<attn::BwdTile> tiles;
    const int64_t n = replay_schedule(l, tiles);
    // Per tile: the query tiles its dk/dv pass visits, the key columns its dq pass walks.
    for (int64_t j = 0; j < n; ++j) {
      const attn::BwdTile& kt = tiles[j];
      for (int32_t qi = kt.first_tile; qi < kt.first_tile + kt.num_tiles; ++qi) {
        const attn::BwdTile& qt = tiles[qi];
        EXPECT(qt.seq_start == kt.seq_start, "tile ", qi, " is not of the sequence of tile ", j);
        const bool visited = attn::tile_meets(qt, kt.row0, kt.row1);
        bool needed = false;
        for (int32_t r = qt.row0; r < qt.row1; ++r)
          for (int32_t c = kt.row0; c < kt.row1; ++c)
            needed = needed || attn::allowed(l.ks[qt.seq_start + r], l.ke[qt.seq_start + r], c);
        EXPECT(visited || !needed, "key tile ", j, " skips query tile ", qi, " whose rows read it");
        // The dq pass of qt walks kt iff kt meets [k_lo, k_hi): the same condition from the row side.
        bool walked = false;
        for (int32_t c0 = attn::first_key_col(qt); c0 < qt.k_hi; c0 += attn::kBwdTile) walked = walked || c0 == kt.row0;
        EXPECT(walked == visited, "dq walk and dk/dv visit disagree on (", qi, ", ", j, ")");
      }
    }
  }
  // ttm with 64-aligned spans: tile 0 = Q rows/keys, 1-2 = D, 3 = P, 4 = G. The Q keys are read by
  // Q, P and G rows only: the D tiles in between are skipped. The D keys only by D, P, G rows.
  const Layout l = ttm_aligned();
  std::vector<attn::BwdTile> tiles;
  EXPECT(replay_schedule(l, tiles) == 5, "ttm tiles");
  const bool expect_q_keys[5] = {true, false, false, true, true};
  const bool expect_d_keys[5] = {false, true, true, true, true};
  for (int qi = 0; qi < 5; ++qi) {
    EXPECT(attn::tile_meets(tiles[qi], 0, 64) == expect_q_keys[qi], "ttm: Q keys vs query tile ", qi);
    EXPECT(attn::tile_meets(tiles[qi], 64, 128) == expect_d_keys[qi], "ttm: D keys vs query tile ", qi);
  }
  EXPECT(attn::first_key_col(tiles[1]) == 64 && tiles[1].k_hi == 192, "ttm: D rows walk keys [64, 192)");
}

void test_delta() {
  EXPECT(attn::delta_value(1.5f, 0.25f) == 1.25f, "finite dlse");
  EXPECT(attn::delta_value(1.5f, kInf) == 1.5f && attn::delta_value(1.5f, -kInf) == 1.5f, "infinite dlse counts 0");
  EXPECT(attn::delta_value(1.5f, std::nanf("")) == 1.5f, "NaN dlse counts 0");
  EXPECT(attn::delta_value(1.5f, 0.0f) == 1.5f, "no dlse");
}

// ---------------------------------------------------------------------------------------------
// Emulation of the kernels
// ---------------------------------------------------------------------------------------------
using u16 = uint16_t;
struct Dtype {
  bool bf16;
  float to_f(u16 b) const {
    return bf16 ? static_cast<float>(c10::BFloat16(b, c10::BFloat16::from_bits()))
                : static_cast<float>(c10::Half(b, c10::Half::from_bits()));
  }
  u16 to16(float x) const { return bf16 ? c10::BFloat16(x).x : c10::Half(x).x; }
  double eps() const { return bf16 ? 1.0 / 256 : 1.0 / 2048; }
};

constexpr int kWarps = 4, kNT = attn::kBwdTile / 8;
using LaneAcc = std::vector<std::array<float, 4>>;  // [n-tiles] per lane

u16 half_of(uint32_t reg, int which) { return static_cast<u16>(which ? reg >> 16 : reg & 0xffffu); }

// c[lane][nt][e] += A B for one m16n8k16, A and B rebuilt from the lanes' registers by the maps.
void emu_mma(std::vector<LaneAcc>& c, int nt, const uint32_t a[32][4], const uint32_t b[32][2], const Dtype& dt) {
  float A[16][16], Bm[16][8];
  for (int lane = 0; lane < 32; ++lane) {
    for (int e = 0; e < 8; ++e) A[attn::frag_a_row(lane, e)][attn::frag_a_col(lane, e)] = dt.to_f(half_of(a[lane][e / 2], e % 2));
    for (int e = 0; e < 4; ++e) Bm[attn::frag_b_k(lane, e)][attn::frag_b_n(lane, e)] = dt.to_f(half_of(b[lane][e / 2], e % 2));
  }
  for (int lane = 0; lane < 32; ++lane)
    for (int e = 0; e < 4; ++e) {
      const int row = attn::frag_c_row(lane, e), col = attn::frag_c_col(lane, e);
      float acc = c[lane][nt][e];
      for (int k = 0; k < 16; ++k) acc += A[row][k] * Bm[k][col];
      c[lane][nt][e] = acc;
    }
}

// warp_gemm_abt: acc = A[row0.., :D] B[:64, :D]^T from two shared tiles.
std::vector<LaneAcc> emu_gemm_abt(const std::vector<u16>& a, int row0, const std::vector<u16>& b, int D, int ld,
                                  const Dtype& dt) {
  std::vector<LaneAcc> acc(32, LaneAcc(kNT, {0, 0, 0, 0}));
  for (int kk = 0; kk < D / 16; ++kk) {
    uint32_t af[32][4], bf[32][2];
    for (int lane = 0; lane < 32; ++lane) attn::load_a_rowmajor(a.data(), ld, row0, 16 * kk, lane, af[lane]);
    for (int nt = 0; nt < kNT; ++nt) {
      for (int lane = 0; lane < 32; ++lane) attn::load_b_from_rows(b.data(), ld, 16 * kk, 8 * nt, lane, bf[lane]);
      emu_mma(acc, nt, af, bf, dt);
    }
  }
  return acc;
}

// warp_gemm_xb: acc[D/8] += X (16 x 64, accumulator fragments, rounded to 16 bits) B[64][D].
void emu_gemm_xb(std::vector<LaneAcc>& acc, const std::vector<LaneAcc>& x, const std::vector<u16>& b, int D, int ld,
                 const Dtype& dt) {
  auto to16 = [&](float v) { return dt.to16(v); };
  for (int kb = 0; kb < kNT / 2; ++kb) {
    uint32_t af[32][4], bf[32][2];
    for (int lane = 0; lane < 32; ++lane) attn::acc_to_a(x[lane][2 * kb].data(), x[lane][2 * kb + 1].data(), to16, af[lane]);
    for (int nd = 0; nd < D / 8; ++nd) {
      for (int lane = 0; lane < 32; ++lane) attn::load_b_from_cols(b.data(), ld, 16 * kb, 8 * nd, lane, bf[lane]);
      emu_mma(acc, nd, af, bf, dt);
    }
  }
}

struct Problem {
  Layout l;
  int Hq, Hkv, D;
  float scale;
  std::vector<u16> q, k, v, dout, out;  // [T, H, D] contiguous, 16-bit bits
  std::vector<float> lse, dlse;         // [Hq, T]
};

// The inputs as the kernels see them: q in a [T, Hq + 1, D + 2] buffer (head stride D + 2: rows not
// 16-byte aligned, the element-by-element path) or contiguous; k and v as views of one fused
// [T, 2 Hkv, D] buffer (token stride 2 Hkv D).
struct Staged {
  std::vector<u16> q_buf, kv_buf;
  int64_t q_st, q_sh, k_st, k_sh;
  const u16 *q, *k, *v;
  bool vec16;
};

Staged stage(const Problem& p, bool strided) {
  Staged st;
  const int T = p.l.T, D = p.D;
  if (strided) {
    st.q_sh = D + 2;
    st.q_st = (p.Hq + 1) * st.q_sh;
    st.q_buf.assign(static_cast<size_t>(T) * st.q_st + 16, 0x7fc0);  // NaN bits around the values
    for (int i = 0; i < T; ++i)
      for (int h = 0; h < p.Hq; ++h)
        for (int d = 0; d < D; ++d) st.q_buf[i * st.q_st + (h + 1) * st.q_sh + d] = p.q[(i * p.Hq + h) * D + d];
    st.q = st.q_buf.data() + st.q_sh;
  } else {
    st.q_st = static_cast<int64_t>(p.Hq) * D;
    st.q_sh = D;
    st.q = p.q.data();
  }
  st.k_sh = D;
  st.k_st = 2 * p.Hkv * D;
  st.kv_buf.assign(static_cast<size_t>(T) * st.k_st + 1, 0);
  for (int i = 0; i < T; ++i)
    for (int g = 0; g < p.Hkv; ++g)
      for (int d = 0; d < D; ++d) {
        st.kv_buf[i * st.k_st + g * D + d] = p.k[(i * p.Hkv + g) * D + d];
        st.kv_buf[i * st.k_st + (p.Hkv + g) * D + d] = p.v[(i * p.Hkv + g) * D + d];
      }
  st.k = st.kv_buf.data();
  st.v = st.kv_buf.data() + p.Hkv * D;
  st.vec16 = !strided;
  return st;
}

// Shared memory of one block: the kernels' layout (BwdSmem<D>, carved by their bwd_smem_views), 16-byte aligned.
struct Block : attn::BwdSmemViews {
  std::vector<uint64_t> raw;
  template <int D>
  static Block make() {
    Block b;
    b.raw.assign(BwdSmem<D>::kBytes / 8 + 2, 0xffffffffffffffffull);  // garbage, as shared memory starts
    static_cast<attn::BwdSmemViews&>(b) = attn::bwd_smem_views<D>(reinterpret_cast<unsigned char*>(b.raw.data()));
    return b;
  }
};

template <int D>
void load_tile_all(u16* dst, const u16* src, int64_t tok0, int rows, int64_t st, int64_t sh, int head, bool vec16) {
  for (int tid = 0; tid < attn::kBwdThreads; ++tid) attn::load_tile<D>(tid, dst, src, tok0, rows, st, sh, head, vec16);
}

void load_rows_all(const Block& b, const attn::BwdParams& p, int h, int64_t tok0, int rows) {
  for (int tid = 0; tid < attn::kBwdThreads; ++tid) attn::load_rows(tid, b.lse2, b.delta, b.ks, b.ke, p, h, tok0, rows);
}

// The three launches, replayed: the kernels' staging (bwd_tile_io.h) for every thread, their
// per-warp products lane by lane. Outputs as float (the 16-bit values the kernels store).
template <int D>
void emulate_backward(const Problem& p, const Dtype& dt, bool strided, std::vector<float>& dq, std::vector<float>& dk,
                      std::vector<float>& dv) {
  const int T = p.l.T, Hq = p.Hq, Hkv = p.Hkv, group = Hq / Hkv, ld = BwdSmem<D>::kLd;
  const Staged st = stage(p, strided);
  // Launch 1: delta and the schedule.
  std::vector<float> delta(static_cast<size_t>(Hq) * T);
  for (int h = 0; h < Hq; ++h)
    for (int i = 0; i < T; ++i) {
      float dot = 0;
      for (int d = 0; d < D; ++d) dot += dt.to_f(p.dout[(i * Hq + h) * D + d]) * dt.to_f(p.out[(i * Hq + h) * D + d]);
      delta[h * T + i] = attn::delta_value(dot, p.dlse.empty() ? 0.0f : p.dlse[h * T + i]);
    }
  std::vector<attn::BwdTile> tiles;
  int32_t n = static_cast<int32_t>(replay_schedule(p.l, tiles));  // BwdParams::num_tiles (the prep launch writes it)
  std::vector<u16> dq16(static_cast<size_t>(T) * Hq * D, 0x7fc0), dk16(static_cast<size_t>(T) * Hkv * D, 0x7fc0),
      dv16(static_cast<size_t>(T) * Hkv * D, 0x7fc0);  // poisoned with NaN: every element must be written

  attn::BwdParams prm{};
  prm.q = st.q;
  prm.k = st.k;
  prm.v = st.v;
  prm.dout = p.dout.data();
  prm.q_st = st.q_st;
  prm.q_sh = st.q_sh;
  prm.k_st = prm.v_st = st.k_st;
  prm.k_sh = prm.v_sh = st.k_sh;
  prm.do_st = static_cast<int64_t>(Hq) * D;
  prm.do_sh = D;
  prm.dq = dq16.data();
  prm.dk = dk16.data();
  prm.dv = dv16.data();
  prm.lse = const_cast<float*>(p.lse.data());  // read only (the forward writes lse through FwdParams)
  prm.delta = delta.data();
  prm.kv_start = p.l.ks.data();
  prm.kv_end = p.l.ke.data();
  prm.tiles = tiles.data();
  prm.num_tiles = &n;
  prm.T = T;
  prm.Hq = Hq;
  prm.Hkv = Hkv;
  prm.group = group;
  prm.scale = p.scale;
  prm.scale_log2 = static_cast<float>(p.scale * 1.4426950408889634);
  prm.vec16 = st.vec16;
  auto to16 = [&](float x) { return dt.to16(x); };
  auto frag = [](const std::vector<LaneAcc>& acc, int lane, float (*out)[4], int nt) {
    for (int t = 0; t < nt; ++t)
      for (int e = 0; e < 4; ++e) out[t][e] = acc[lane][t][e];
  };
  auto unfrag = [](std::vector<LaneAcc>& acc, int lane, const float (*in)[4], int nt) {
    for (int t = 0; t < nt; ++t)
      for (int e = 0; e < 4; ++e) acc[lane][t][e] = in[t][e];
  };
  auto store = [&](u16* out, int64_t tok0, int h, int H, int wrow, int rows, const std::vector<LaneAcc>& acc,
                   float scale) {
    for (int lane = 0; lane < 32; ++lane) {
      float a[D / 8][4];
      frag(acc, lane, a, D / 8);
      attn::store_rows<D>(out, tok0, h, H, wrow, rows, a, scale, lane, to16);
    }
  };

  // Launch 2: dkdv_kernel, block (j, g).
  for (int32_t j = 0; j < n; ++j)
    for (int g = 0; g < Hkv; ++g) {
      Block b = Block::make<D>();
      u16 *k_s = b.t0, *v_s = b.t1, *q_s = b.t2, *do_s = b.t3;
      const attn::BwdTile kt = prm.tiles[j];
      const int32_t c0 = kt.row0, cols = kt.row1 - kt.row0;
      const int64_t key0 = static_cast<int64_t>(kt.seq_start) + c0;
      load_tile_all<D>(k_s, prm.k, key0, cols, prm.k_st, prm.k_sh, g, prm.vec16);
      load_tile_all<D>(v_s, prm.v, key0, cols, prm.v_st, prm.v_sh, g, prm.vec16);
      const std::vector<u16> k_v(k_s, k_s + BwdSmem<D>::kTileElems), v_v(v_s, v_s + BwdSmem<D>::kTileElems);
      std::vector<std::vector<LaneAcc>> dk_acc(kWarps, std::vector<LaneAcc>(32, LaneAcc(D / 8, {0, 0, 0, 0})));
      auto dv_acc = dk_acc;
      const int32_t q_end = std::min(kt.first_tile + kt.num_tiles, *prm.num_tiles);
      for (int32_t qi = kt.first_tile; qi < q_end; ++qi) {
        const attn::BwdTile qt = prm.tiles[qi];
        if (!attn::tile_meets(qt, c0, kt.row1)) continue;
        const int rows = qt.row1 - qt.row0;
        const int64_t tok0 = static_cast<int64_t>(qt.seq_start) + qt.row0;
        for (int h = g * prm.group; h < (g + 1) * prm.group; ++h) {
          load_tile_all<D>(q_s, prm.q, tok0, rows, prm.q_st, prm.q_sh, h, prm.vec16);
          load_tile_all<D>(do_s, prm.dout, tok0, rows, prm.do_st, prm.do_sh, h, prm.vec16);
          load_rows_all(b, prm, h, tok0, rows);
          const std::vector<u16> q_v(q_s, q_s + BwdSmem<D>::kTileElems), do_v(do_s, do_s + BwdSmem<D>::kTileElems);
          for (int w = 0; w < kWarps; ++w) {
            auto s = emu_gemm_abt(k_v, 16 * w, q_v, D, ld, dt);
            auto dp = emu_gemm_abt(v_v, 16 * w, do_v, D, ld, dt);
            for (int lane = 0; lane < 32; ++lane) {
              float sl[kNT][4], dpl[kNT][4];
              frag(s, lane, sl, kNT);
              frag(dp, lane, dpl, kNT);
              attn::p_ds_block<true, kNT>(sl, dpl, lane, 16 * w, c0, cols, b.lse2, b.delta, b.ks, b.ke,
                                         prm.scale_log2);
              unfrag(s, lane, sl, kNT);
              unfrag(dp, lane, dpl, kNT);
            }
            emu_gemm_xb(dv_acc[w], s, do_v, D, ld, dt);
            emu_gemm_xb(dk_acc[w], dp, q_v, D, ld, dt);
          }
        }
      }
      for (int w = 0; w < kWarps; ++w) {
        store(prm.dk, key0, g, Hkv, 16 * w, cols, dk_acc[w], prm.scale);
        store(prm.dv, key0, g, Hkv, 16 * w, cols, dv_acc[w], 1.0f);
      }
    }
  // Launch 3: dq_kernel, block (i, h).
  for (int32_t i = 0; i < n; ++i)
    for (int h = 0; h < Hq; ++h) {
      Block b = Block::make<D>();
      u16 *q_s = b.t0, *do_s = b.t1, *k_s = b.t2, *v_s = b.t3;
      const int g = h / prm.group;
      const attn::BwdTile qt = prm.tiles[i];
      const int rows = qt.row1 - qt.row0;
      const int64_t tok0 = static_cast<int64_t>(qt.seq_start) + qt.row0;
      load_tile_all<D>(q_s, prm.q, tok0, rows, prm.q_st, prm.q_sh, h, prm.vec16);
      load_tile_all<D>(do_s, prm.dout, tok0, rows, prm.do_st, prm.do_sh, h, prm.vec16);
      load_rows_all(b, prm, h, tok0, rows);
      const std::vector<u16> q_v(q_s, q_s + BwdSmem<D>::kTileElems), do_v(do_s, do_s + BwdSmem<D>::kTileElems);
      std::vector<std::vector<LaneAcc>> dq_acc(kWarps, std::vector<LaneAcc>(32, LaneAcc(D / 8, {0, 0, 0, 0})));
      for (int32_t c0 = attn::first_key_col(qt); c0 < qt.k_hi; c0 += attn::kBwdTile) {
        const int32_t c1 = std::min(c0 + attn::kBwdTile, qt.seq_len), cols = c1 - c0;
        const int64_t key0 = static_cast<int64_t>(qt.seq_start) + c0;
        load_tile_all<D>(k_s, prm.k, key0, cols, prm.k_st, prm.k_sh, g, prm.vec16);
        load_tile_all<D>(v_s, prm.v, key0, cols, prm.v_st, prm.v_sh, g, prm.vec16);
        const std::vector<u16> k_v(k_s, k_s + BwdSmem<D>::kTileElems), v_v(v_s, v_s + BwdSmem<D>::kTileElems);
        for (int w = 0; w < kWarps; ++w) {
          auto s = emu_gemm_abt(q_v, 16 * w, k_v, D, ld, dt);
          auto dp = emu_gemm_abt(do_v, 16 * w, v_v, D, ld, dt);
          for (int lane = 0; lane < 32; ++lane) {
            float sl[kNT][4], dpl[kNT][4];
            frag(s, lane, sl, kNT);
            frag(dp, lane, dpl, kNT);
            attn::p_ds_block<false, kNT>(sl, dpl, lane, 16 * w, c0, cols, b.lse2, b.delta, b.ks, b.ke, prm.scale_log2);
            unfrag(dp, lane, dpl, kNT);
          }
          emu_gemm_xb(dq_acc[w], dp, k_v, D, ld, dt);
        }
      }
      for (int w = 0; w < kWarps; ++w) store(prm.dq, tok0, h, Hq, 16 * w, rows, dq_acc[w], prm.scale);
    }
  auto to_float = [&](const std::vector<u16>& x, std::vector<float>& out) {
    out.resize(x.size());
    for (size_t i = 0; i < x.size(); ++i) out[i] = dt.to_f(x[i]);
  };
  to_float(dq16, dq);
  to_float(dk16, dk);
  to_float(dv16, dv);
}

// A float64 forward (for out and lse, rounded as the forward stores them) and the float64
// backward of ugd_ops.reference.partitioned_attention_bwd from those saved values.
void reference(Problem& p, const Dtype& dt, std::vector<double>& dq, std::vector<double>& dk, std::vector<double>& dv) {
  const int T = p.l.T, D = p.D, Hq = p.Hq, Hkv = p.Hkv, group = Hq / Hkv;
  auto f = [&](const std::vector<u16>& x, int64_t idx) { return static_cast<double>(dt.to_f(x[idx])); };
  p.out.assign(static_cast<size_t>(T) * Hq * D, 0);
  p.lse.assign(static_cast<size_t>(Hq) * T, -kInf);
  dq.assign(static_cast<size_t>(T) * Hq * D, 0);
  dk.assign(static_cast<size_t>(T) * Hkv * D, 0);
  dv.assign(static_cast<size_t>(T) * Hkv * D, 0);
  for (size_t b = 0; b + 1 < p.l.cu.size(); ++b) {
    const int s0 = p.l.cu[b], L = p.l.cu[b + 1] - s0;
    for (int h = 0; h < Hq; ++h) {
      const int g = h / group;
      for (int r = 0; r < L; ++r) {
        const int i = s0 + r, lo = p.l.ks[i], hi = p.l.ke[i];
        if (lo >= hi) continue;
        std::vector<double> sc(hi - lo);
        double mx = -INFINITY;
        for (int c = lo; c < hi; ++c) {
          double acc = 0;
          for (int d = 0; d < D; ++d) acc += f(p.q, (i * Hq + h) * D + d) * f(p.k, ((s0 + c) * Hkv + g) * D + d);
          sc[c - lo] = acc * p.scale;
          mx = std::max(mx, sc[c - lo]);
        }
        double sum = 0;
        for (double x : sc) sum += std::exp(x - mx);
        const double lse = mx + std::log(sum);
        p.lse[h * T + i] = static_cast<float>(lse);
        for (int d = 0; d < D; ++d) {
          double o = 0;
          for (int c = lo; c < hi; ++c) o += std::exp(sc[c - lo] - lse) * f(p.v, ((s0 + c) * Hkv + g) * D + d);
          p.out[(i * Hq + h) * D + d] = dt.to16(static_cast<float>(o));
        }
      }
    }
  }
  for (size_t b = 0; b + 1 < p.l.cu.size(); ++b) {
    const int s0 = p.l.cu[b], L = p.l.cu[b + 1] - s0;
    for (int h = 0; h < Hq; ++h) {
      const int g = h / group;
      for (int r = 0; r < L; ++r) {
        const int i = s0 + r, lo = p.l.ks[i], hi = p.l.ke[i];
        double delta = 0;
        for (int d = 0; d < D; ++d) delta += f(p.dout, (i * Hq + h) * D + d) * f(p.out, (i * Hq + h) * D + d);
        const float dl = p.dlse.empty() ? 0.0f : p.dlse[h * T + i];
        if (std::isfinite(dl)) delta -= dl;
        for (int c = lo; c < hi; ++c) {
          double sc = 0, dpv = 0;
          for (int d = 0; d < D; ++d) {
            sc += f(p.q, (i * Hq + h) * D + d) * f(p.k, ((s0 + c) * Hkv + g) * D + d);
            dpv += f(p.dout, (i * Hq + h) * D + d) * f(p.v, ((s0 + c) * Hkv + g) * D + d);
          }
          const double pv = std::exp(sc * p.scale - static_cast<double>(p.lse[h * T + i]));
          const double ds = pv * (dpv - delta);
          for (int d = 0; d < D; ++d) {
            dv[((s0 + c) * Hkv + g) * D + d] += pv * f(p.dout, (i * Hq + h) * D + d);
            dk[((s0 + c) * Hkv + g) * D + d] += p.scale * ds * f(p.q, (i * Hq + h) * D + d);
            dq[(i * Hq + h) * D + d] += p.scale * ds * f(p.k, ((s0 + c) * Hkv + g) * D + d);
          }
        }
      }
    }
  }
}

// |emu - ref| <= tol * (max |ref| over the tensor) elementwise, no NaN; exact 0 where ref is
// exactly 0 because nothing was read (tracked by `touched`).
void compare(const std::vector<float>& emu, const std::vector<double>& ref, double tol, const std::string& what) {
  double mx = 0, worst = 0;
  for (double x : ref) mx = std::max(mx, std::abs(x));
  int64_t bad = 0, nan = 0;
  for (size_t i = 0; i < ref.size(); ++i) {
    if (!std::isfinite(emu[i])) {
      ++nan;
      continue;
    }
    const double err = std::abs(emu[i] - ref[i]);
    worst = std::max(worst, err);
    if (err > tol * mx + 1e-30) ++bad;
    if (ref[i] == 0.0 && emu[i] != 0.0f) ++bad;  // zero gradients (nothing read) must be exact
  }
  std::printf("  %s: max |err| / max |ref| = %.2e\n", what.c_str(), mx > 0 ? worst / mx : worst);
  EXPECT(nan == 0, what, ": ", nan, " non-finite values (unwritten or NaN)");
  EXPECT(bad == 0, what, ": ", bad, " elements off, worst error ", worst, " vs max |ref| ", mx, " (tol ", tol, ")");
}

void emulate(bool bf16) {
  const Dtype dt{bf16};
  std::mt19937 rng(bf16 ? 11 : 12);
  std::normal_distribution<float> normal(0, 1);
  struct Case {
    int Hq, Hkv, D, B;
    std::vector<int> lens;
    double empty_p;
    bool dlse, strided;
  };
  const Case cases[] = {
      {6, 1, 64, 4, {1, 17, 127}, 0.1, true, false},    // GQA 6:1, nonzero dlse
      {2, 2, 64, 3, {17, 64, 70}, 0.0, false, true},    // 1:1, no dlse, strided q (scalar loads)
      {2, 1, 128, 2, {1, 33, 127}, 0.15, true, true},   // head dim 128
      {4, 4, 128, 2, {65, 128, 129}, 0.0, true, false},  // 1:1, tile edges
  };
  for (const Case& c : cases) {
    Problem p;
    p.l = random_layout(rng, c.B, c.lens, c.empty_p);
    p.Hq = c.Hq;
    p.Hkv = c.Hkv;
    p.D = c.D;
    p.scale = 1.0f / std::sqrt(static_cast<float>(c.D));
    const int T = p.l.T;
    auto fill = [&](std::vector<u16>& x, int H, float sd) {
      x.resize(static_cast<size_t>(T) * H * c.D);
      for (auto& e : x) e = dt.to16(sd * normal(rng));
    };
    fill(p.q, c.Hq, 1.5f);
    fill(p.k, c.Hkv, 1.5f);
    fill(p.v, c.Hkv, 1.0f);
    fill(p.dout, c.Hq, 1.0f);
    std::vector<double> rdq, rdk, rdv;
    if (c.dlse) {  // set before the reference reads it; the empty rows' lse is -inf, give them inf dlse
      p.dlse.resize(static_cast<size_t>(c.Hq) * T);
      for (auto& e : p.dlse) e = 0.5f * normal(rng);
    }
    reference(p, dt, rdq, rdk, rdv);
    if (c.dlse)
      for (size_t i = 0; i < p.dlse.size(); ++i)
        if (std::isinf(p.lse[i])) p.dlse[i] = (i % 2) ? kInf : std::nanf("");
    if (c.dlse) reference(p, dt, rdq, rdk, rdv);  // (out and lse do not depend on dlse)
    // NaN in out of the empty rows (a stand-in for any non-finite value there): their delta is NaN,
    // yet they read nothing, so they must contribute exactly nothing -- the mask must select 0 for
    // dS, not multiply P = 0 by (dP - delta). The reference's gradients do not depend on it.
    int64_t poisoned = 0;
    for (int h = 0; h < c.Hq; ++h)
      for (int i = 0; i < T; ++i)
        if (p.l.ks[i] >= p.l.ke[i]) {
          for (int d = 0; d < c.D; ++d) p.out[(static_cast<size_t>(i) * c.Hq + h) * c.D + d] = dt.to16(std::nanf(""));
          ++poisoned;
        }
    EXPECT(c.empty_p == 0 || poisoned > 0, "the case has no empty row to poison");
    std::vector<float> dq, dk, dv;
    if (c.D == 64) emulate_backward<64>(p, dt, c.strided, dq, dk, dv);
    else emulate_backward<128>(p, dt, c.strided, dq, dk, dv);
    // The kernel rounds P and dS to 16 bits for the second products and the outputs once: a few
    // units of the 16-bit epsilon relative to the tensor's magnitude. A wrong index or mask gives
    // errors of order 1.
    const double tol = 8 * dt.eps();
    const std::string tag = std::string(bf16 ? "bf16" : "fp16") + (c.strided ? " strided" : "") + " Hq " + std::to_string(c.Hq) + " Hkv " +
                            std::to_string(c.Hkv) + " D " + std::to_string(c.D) + " T " + std::to_string(T);
    compare(dq, rdq, tol, tag + " dq");
    compare(dk, rdk, tol, tag + " dk");
    compare(dv, rdv, tol, tag + " dv");
  }
}

const std::vector<ugd_ops_tests::TestCase> kTests = {
    {"schedule", test_schedule},
    {"visits", test_visits},
    {"delta", test_delta},
    {"emulate_bf16", [] { emulate(true); }},
    {"emulate_fp16", [] { emulate(false); }},
};

}  // namespace

int main(int argc, char** argv) { return ugd_ops_tests::run_tests(argc, argv, kTests); }
