// ugd_ops::_cuda_attention_bwd: the CUDA backward of partitioned attention, with the
// schema of ugd_ops::partitioned_attention_bwd and a CUDA kernel only. ugd_ops/cuda_attention.py
// decides when the public operator routes here (bf16 / fp16, head dims 64 and 128, behind the
// UGD_CUDA_ATTENTION switch until a GPU run has verified it).
//
// Three launches on the current stream, no host synchronisation, no T x T buffer:
//   1. bwd_prep_kernel: delta = rowsum(dout * out) - dlse per (row, head) (a warp per row), and in
//      its first block the tile schedule (bwd_schedule.cuh) of the packed batch;
//   2. dkdv_kernel and 3. dq_kernel (bwd_kernel.cuh), instantiated in bwd_<dtype>_d<D>.cu.
// Workspace: delta fp32 [Hq, T] and the schedule, max_tiles(T, B) x 8 int32.
#define TORCH_ASSERT_ONLY_METHOD_OPERATORS
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_fp16.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <optional>
#include <tuple>

#include "../../common/checks.h"
#include "bwd_params.h"
#include "bwd_schedule.cuh"

namespace ugd_ops::cuda::attn_bwd {
namespace {

constexpr int kPrepThreads = kScheduleThreads;  // the schedule block is one of these blocks
constexpr int kPrepWarps = kPrepThreads / 32;
constexpr int64_t kMaxDeltaBlocks = 4096;  // rows past blocks * 8 are reached by a grid-stride loop

struct PrepParams {
  const uint16_t *dout, *out;
  int64_t do_st, do_sh, o_st, o_sh;
  const float* dlse;  // [Hq, T] contiguous fp32, or nullptr
  float* delta;       // [Hq, T]
  int64_t T;
  int32_t Hq, D;
  const int32_t *cu_seqlens, *kv_start, *kv_end;
  int32_t B;
  Tile* tiles;
  int32_t* num_tiles;
  int64_t max_tiles;
};

template <bool kBf16>
__device__ __forceinline__ float to_float(uint16_t x) {
  if constexpr (kBf16) {
    return __uint_as_float(static_cast<uint32_t>(x) << 16);
  } else {
    return __half2float(__ushort_as_half(x));
  }
}

// The schedule, by one block: per-thread tile counts of a chunk of sequences, their prefix sum,
// the tile headers, then each tile's reach from its rows' intervals -- the functions of
// build_schedule_reference (bwd_schedule.cuh), which the C++ tests check.
__device__ void build_schedule(const PrepParams& p) {
  __shared__ int32_t scan[kPrepThreads];
  const int tid = threadIdx.x;
  const int32_t T = static_cast<int32_t>(p.T);
  int32_t b0, b1;
  attn::schedule_chunk(tid, kPrepThreads, p.B, b0, b1);
  const int32_t local = attn::chunk_tile_count(p.cu_seqlens, T, b0, b1, kTile);
  scan[tid] = local;
  __syncthreads();
  for (int off = 1; off < kPrepThreads; off <<= 1) {  // inclusive Hillis-Steele scan
    const int32_t add = tid >= off ? scan[tid - off] : 0;
    __syncthreads();
    scan[tid] += add;
    __syncthreads();
  }
  const int64_t total = min(static_cast<int64_t>(scan[kPrepThreads - 1]), p.max_tiles);
  write_chunk_headers(p.cu_seqlens, T, b0, b1, scan[tid] - local, total, p.tiles);
  if (tid == 0) *p.num_tiles = static_cast<int32_t>(total);
  __syncthreads();  // the headers (global memory) are visible to the whole block
  for (int64_t t = tid; t < total; t += kPrepThreads) tile_reach(p.tiles[t], p.kv_start, p.kv_end);
}

template <bool kBf16>
__global__ void __launch_bounds__(kPrepThreads) bwd_prep_kernel(const PrepParams p) {
  // Block 0 builds the schedule: blocks start roughly in index order, so the one serial block of
  // the launch starts first and overlaps the delta blocks instead of running after them.
  if (blockIdx.x == 0) {
    build_schedule(p);
    return;
  }
  const int lane = threadIdx.x % 32;
  const int64_t rows = p.T * p.Hq;
  const int64_t stride = static_cast<int64_t>(gridDim.x - 1) * kPrepWarps;
  // A warp per (row, head), uniform over its lanes (the full-mask shuffles below need all 32).
  for (int64_t idx = static_cast<int64_t>(blockIdx.x - 1) * kPrepWarps + threadIdx.x / 32; idx < rows; idx += stride) {
    const int64_t i = idx / p.Hq;
    const int h = static_cast<int>(idx % p.Hq);
    const uint16_t* a = p.dout + i * p.do_st + h * p.do_sh;
    const uint16_t* b = p.out + i * p.o_st + h * p.o_sh;
    float dot = 0.0f;
    for (int x = lane; x < p.D; x += 32) dot += to_float<kBf16>(a[x]) * to_float<kBf16>(b[x]);
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) dot += __shfl_xor_sync(0xffffffffu, dot, off);
    if (lane == 0) {
      const int64_t o = h * p.T + i;
      p.delta[o] = delta_value(dot, p.dlse != nullptr ? p.dlse[o] : 0.0f);
    }
  }
}

bool aligned16(const at::Tensor& t) {
  return reinterpret_cast<uintptr_t>(t.const_data_ptr()) % 16 == 0 && t.stride(0) % 8 == 0 && t.stride(1) % 8 == 0;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> cuda_attention_bwd(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& lse, const std::optional<at::Tensor>& dlse, const at::Tensor& cu_seqlens,
    const at::Tensor& kv_start, const at::Tensor& kv_end, std::optional<int64_t> max_seqlen, double softmax_scale) {
  check_attention_meta(q, k, v, cu_seqlens, kv_start, kv_end, 128);
  check_qkv_tensor(dout, "dout", q);
  check_qkv_tensor(out, "out", q);
  TORCH_CHECK_VALUE(dout.sizes() == q.sizes() && out.sizes() == q.sizes(),
                    "ugd_ops: dout and out must have the shape of q ", q.sizes(), ", got ", dout.sizes(), " and ",
                    out.sizes());
  TORCH_CHECK_VALUE(q.is_cuda(), "ugd_ops: _cuda_attention_bwd takes CUDA tensors, got ", q.device(),
                    "; call ugd_ops.partitioned_attention_bwd, which routes every device");
  const bool bf16 = q.scalar_type() == at::kBFloat16;
  const int64_t T = q.size(0), Hq = q.size(1), Hkv = k.size(1), D = q.size(2);
  TORCH_CHECK_VALUE((bf16 || q.scalar_type() == at::kHalf) && (D == 64 || D == 128),
                    "ugd_ops: the CUDA attention backward serves bfloat16 / float16 with head dim 64 or 128, got ",
                    q.scalar_type(), " with head dim ", D, "; call ugd_ops.partitioned_attention_bwd, which routes "
                    "other inputs to another kernel");
  TORCH_CHECK_VALUE(lse.scalar_type() == at::kFloat && lse.dim() == 2 && lse.size(0) == Hq && lse.size(1) == T &&
                        lse.device() == q.device(),
                    "ugd_ops: lse must be float32 [Hq, T] = [", Hq, ", ", T, "] on ", q.device(), ", got ",
                    lse.scalar_type(), " ", lse.sizes(), " on ", lse.device());
  if (dlse.has_value()) {
    TORCH_CHECK_VALUE(dlse->sizes() == lse.sizes() && dlse->device() == q.device(),
                      "ugd_ops: dlse must have the shape of lse ", lse.sizes(), " on ", q.device(), ", got ",
                      dlse->sizes(), " on ", dlse->device());
  }
  if (max_seqlen.has_value()) {
    TORCH_CHECK_VALUE(*max_seqlen >= 0, "ugd_ops: max_seqlen must be >= 0, got ", *max_seqlen);
  }
  // Not read: the schedule is built on the device from cu_seqlens (max_seqlen may be omitted).
  (void)max_seqlen;
  // int32 row / column indices reach a tile's end, up to 64 past the last token: keep headroom.
  TORCH_CHECK_VALUE(T <= INT32_MAX - 2 * kTile && cu_seqlens.size(0) - 1 <= INT32_MAX,
                    "ugd_ops: the CUDA attention backward takes at most 2^31 - ", 2 * kTile + 1,
                    " tokens and 2^31 - 1 sequences, got T = ", T, "; split the batch");
  // The heads are gridDim.y of the dk/dv (Hkv) and dq (Hq) launches.
  TORCH_CHECK_VALUE(Hq <= 65535, "ugd_ops: the CUDA attention backward takes at most 65535 query heads, got ", Hq);

  const c10::cuda::CUDAGuard guard(q.device());
  at::Tensor dq = at::empty(q.sizes(), q.options());
  at::Tensor dk = at::empty(k.sizes(), k.options());
  at::Tensor dv = at::empty(v.sizes(), v.options());
  if (T == 0) return {dq, dk, dv};
  const int64_t B = cu_seqlens.size(0) - 1;
  const int64_t n_tiles = max_tiles(T, B);
  if (B == 0) {
    // No sequence holds the tokens (a broken layout that the host-side check rejects unless it was
    // skipped; the forward gives out 0, lse -inf): nothing reaches anything, the gradients are 0.
    // The kernels would write nothing (and max_tiles may be 0, an invalid grid).
    dq.zero_();
    dk.zero_();
    dv.zero_();
    return {dq, dk, dv};
  }
  const at::Tensor lse_c = lse.contiguous();
  const at::Tensor dlse_c = dlse.has_value() ? dlse->to(at::kFloat).contiguous() : at::Tensor();
  const at::Tensor cu = cu_seqlens.contiguous(), ks = kv_start.contiguous(), ke = kv_end.contiguous();
  at::Tensor delta = at::empty({Hq, T}, q.options().dtype(at::kFloat));
  at::Tensor sched = at::empty({n_tiles * kTileInts + 1}, q.options().dtype(at::kInt));
  Tile* tiles = reinterpret_cast<Tile*>(sched.mutable_data_ptr<int32_t>());
  int32_t* num_tiles = sched.mutable_data_ptr<int32_t>() + n_tiles * kTileInts;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(q.device().index()).stream();

  PrepParams pp{};
  pp.dout = static_cast<const uint16_t*>(dout.const_data_ptr());
  pp.out = static_cast<const uint16_t*>(out.const_data_ptr());
  pp.do_st = dout.stride(0);
  pp.do_sh = dout.stride(1);
  pp.o_st = out.stride(0);
  pp.o_sh = out.stride(1);
  pp.dlse = dlse_c.defined() ? dlse_c.const_data_ptr<float>() : nullptr;
  pp.delta = delta.mutable_data_ptr<float>();
  pp.T = T;
  pp.Hq = static_cast<int32_t>(Hq);
  pp.D = static_cast<int32_t>(D);
  pp.cu_seqlens = cu.const_data_ptr<int32_t>();
  pp.kv_start = ks.const_data_ptr<int32_t>();
  pp.kv_end = ke.const_data_ptr<int32_t>();
  pp.B = static_cast<int32_t>(B);
  pp.tiles = tiles;
  pp.num_tiles = num_tiles;
  pp.max_tiles = n_tiles;
  const int64_t delta_blocks = std::min<int64_t>((T * Hq + kPrepWarps - 1) / kPrepWarps, kMaxDeltaBlocks);
  const unsigned prep_grid = static_cast<unsigned>(delta_blocks + 1);  // + the schedule block
  if (bf16) {
    bwd_prep_kernel<true><<<prep_grid, kPrepThreads, 0, stream>>>(pp);
  } else {
    bwd_prep_kernel<false><<<prep_grid, kPrepThreads, 0, stream>>>(pp);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();

  BwdParams p{};
  p.q = static_cast<const uint16_t*>(q.const_data_ptr());
  p.k = static_cast<const uint16_t*>(k.const_data_ptr());
  p.v = static_cast<const uint16_t*>(v.const_data_ptr());
  p.dout = pp.dout;
  p.q_st = q.stride(0);
  p.q_sh = q.stride(1);
  p.k_st = k.stride(0);
  p.k_sh = k.stride(1);
  p.v_st = v.stride(0);
  p.v_sh = v.stride(1);
  p.do_st = dout.stride(0);
  p.do_sh = dout.stride(1);
  p.dq = static_cast<uint16_t*>(dq.mutable_data_ptr());
  p.dk = static_cast<uint16_t*>(dk.mutable_data_ptr());
  p.dv = static_cast<uint16_t*>(dv.mutable_data_ptr());
  p.lse = lse_c.const_data_ptr<float>();
  p.delta = pp.delta;
  p.kv_start = pp.kv_start;
  p.kv_end = pp.kv_end;
  p.tiles = tiles;
  p.num_tiles = num_tiles;
  p.T = T;
  p.Hq = static_cast<int32_t>(Hq);
  p.Hkv = static_cast<int32_t>(Hkv);
  p.group = static_cast<int32_t>(Hq / Hkv);
  p.scale = static_cast<float>(softmax_scale);
  p.scale_log2 = static_cast<float>(softmax_scale * 1.4426950408889634);
  p.vec16 = aligned16(q) && aligned16(k) && aligned16(v) && aligned16(dout);
  void* s = static_cast<void*>(stream);
  if (bf16) {
    if (D == 64) launch_bwd_kernels<true, 64>(p, n_tiles, s);
    else launch_bwd_kernels<true, 128>(p, n_tiles, s);
  } else {
    if (D == 64) launch_bwd_kernels<false, 64>(p, n_tiles, s);
    else launch_bwd_kernels<false, 128>(p, n_tiles, s);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {dq, dk, dv};
}

}  // namespace

}  // namespace ugd_ops::cuda::attn_bwd

TORCH_LIBRARY_FRAGMENT(ugd_ops, m) {
  m.def(
      "_cuda_attention_bwd(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, Tensor? dlse, "
      "Tensor cu_seqlens, Tensor kv_start, Tensor kv_end, int? max_seqlen, float softmax_scale) "
      "-> (Tensor dq, Tensor dk, Tensor dv)");
}

TORCH_LIBRARY_IMPL(ugd_ops, CUDA, m) { m.impl("_cuda_attention_bwd", &ugd_ops::cuda::attn_bwd::cuda_attention_bwd); }
