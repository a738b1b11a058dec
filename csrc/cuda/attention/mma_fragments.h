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
// Plain C++ marked UGD_HD (host_device.h): csrc/tests/test_cuda_attention_plan.cpp checks them against
// the PTX ISA tables and an ldmatrix emulation written from the ISA text.
#pragma once

#include <cstdint>

#include "host_device.h"

namespace ugd_ops::cuda::attn {

UGD_HD int frag_a_row(int lane, int e) { return lane / 4 + 8 * ((e / 2) % 2); }
UGD_HD int frag_a_col(int lane, int e) { return 2 * (lane % 4) + (e % 2) + 8 * (e / 4); }
UGD_HD int frag_b_k(int lane, int e) { return 2 * (lane % 4) + (e % 2) + 8 * (e / 2); }
UGD_HD int frag_b_n(int lane, int /*e*/) { return lane / 4; }
UGD_HD int frag_c_row(int lane, int e) { return lane / 4 + 8 * (e / 2); }
UGD_HD int frag_c_col(int lane, int e) { return 2 * (lane % 4) + (e % 2); }

UGD_HD uint32_t pack2(uint16_t lo, uint16_t hi) {
  return static_cast<uint32_t>(lo) | (static_cast<uint32_t>(hi) << 16);
}

// A(r, c) = X[row0 + r][col0 + c], X row-major with leading dimension ld (elements). The two halves
// of a register are (col, col + 1) of one row: one aligned 32-bit read (col0 and ld even).
UGD_HD void load_a_rowmajor(const uint16_t* x, int ld, int row0, int col0, int lane, uint32_t a[4]) {
  for (int r = 0; r < 4; ++r) {
    const int row = row0 + frag_a_row(lane, 2 * r), col = col0 + frag_a_col(lane, 2 * r);
    a[r] = *reinterpret_cast<const uint32_t*>(x + row * ld + col);
  }
}

// B(k, n) = X[n0 + n][k0 + k]: B is a block of X^T (S = Q K^T with K stored key-major). The pair
// (k, k + 1) is adjacent in a row of X: one 32-bit read.
UGD_HD void load_b_from_rows(const uint16_t* x, int ld, int k0, int n0, int lane, uint32_t b[2]) {
  for (int r = 0; r < 2; ++r) {
    const int k = k0 + frag_b_k(lane, 2 * r), n = n0 + frag_b_n(lane, 2 * r);
    b[r] = *reinterpret_cast<const uint32_t*>(x + n * ld + k);
  }
}

// B(k, n) = X[k0 + k][n0 + n]: B is a block of X itself (O += P V with V stored key-major). The
// pair (k, k + 1) lies in consecutive rows: two 16-bit reads.
UGD_HD void load_b_from_cols(const uint16_t* x, int ld, int k0, int n0, int lane, uint32_t b[2]) {
  for (int r = 0; r < 2; ++r) {
    const int k = k0 + frag_b_k(lane, 2 * r), n = n0 + frag_b_n(lane, 2 * r);
    b[r] = pack2(x[k * ld + n], x[(k + 1) * ld + n]);
  }
}

// The A fragment of k-block j from the fp32 C fragments of n-tiles 2j (c_lo) and 2j + 1 (c_hi);
// to16 converts a float to 16-bit bits (round to nearest even).
template <typename To16>
UGD_HD void acc_to_a(const float c_lo[4], const float c_hi[4], To16 to16, uint32_t a[4]) {
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
UGD_HD void ldsm_a_offset(int lane, int& row, int& col) {
  row = lane % 8 + 8 * ((lane / 8) % 2);
  col = 8 * (lane / 16);
}
UGD_HD void ldsm_bt_offset(int lane, int& row, int& col) {
  row = lane % 8 + 8 * (lane / 16);
  col = 8 * ((lane / 8) % 2);
}

}  // namespace ugd_ops::cuda::attn
