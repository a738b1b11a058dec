// ugd_ops::_cuda_attention_bwd: the CUDA backward of partitioned attention, with the
// schema of ugd_ops::partitioned_attention_bwd and a CUDA kernel only. ugd_ops/cuda_attention.py
// decides when the public operator routes here (bf16 / fp16, head dims 64 and 128, behind the
// UGD_CUDA_ATTENTION switch until a GPU run has verified it).
//
// The forward's twin (fwd_op.cu): the checks, one BwdParams (params.h), then three launches on
// the current stream (launch.h), no host synchronisation, no T x T buffer:
//   1. bwd_prep.cu: delta = rowsum(dout * out) - dlse per (row, head) (a warp per row), and in its
//      first block the tile schedule (bwd_schedule.h) of the packed batch;
//   2. dkdv_kernel and 3. dq_kernel (bwd_kernel.cuh), instantiated in bwd_<dtype>_d<D>.cu.
// Workspace: delta fp32 [Hq, T] and the schedule, max_tiles(T, B) x 8 int32.
#define TORCH_ASSERT_ONLY_METHOD_OPERATORS
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdint>
#include <optional>
#include <tuple>

#include "../../common/checks.h"
#include "bwd_schedule.h"
#include "launch.h"
#include "params.h"

namespace ugd_ops::cuda::attn {
namespace {

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
  TORCH_CHECK_VALUE(T <= INT32_MAX - 2 * kBwdTile && cu_seqlens.size(0) - 1 <= INT32_MAX,
                    "ugd_ops: the CUDA attention backward takes at most 2^31 - ", 2 * kBwdTile + 1,
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
  at::Tensor sched = at::empty({n_tiles * kBwdTileInts + 1}, q.options().dtype(at::kInt));
  BwdTile* tiles = reinterpret_cast<BwdTile*>(sched.mutable_data_ptr<int32_t>());
  int32_t* num_tiles = sched.mutable_data_ptr<int32_t>() + n_tiles * kBwdTileInts;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(q.device().index()).stream();

  BwdParams p{};
  // what the forward read: q, k, v, out and lse (out and lse only read here; the cast drops const
  // for the shared params struct, nothing writes through these two)
  p.q = static_cast<const uint16_t*>(q.const_data_ptr());
  p.k = static_cast<const uint16_t*>(k.const_data_ptr());
  p.v = static_cast<const uint16_t*>(v.const_data_ptr());
  p.q_st = q.stride(0);
  p.q_sh = q.stride(1);
  p.k_st = k.stride(0);
  p.k_sh = k.stride(1);
  p.v_st = v.stride(0);
  p.v_sh = v.stride(1);
  p.out = const_cast<uint16_t*>(static_cast<const uint16_t*>(out.const_data_ptr()));
  p.o_st = out.stride(0);
  p.o_sh = out.stride(1);
  p.lse = const_cast<float*>(lse_c.const_data_ptr<float>());
  p.cu_seqlens = cu.const_data_ptr<int32_t>();
  p.kv_start = ks.const_data_ptr<int32_t>();
  p.kv_end = ke.const_data_ptr<int32_t>();
  p.T = T;
  p.B = static_cast<int32_t>(B);
  p.Hq = static_cast<int32_t>(Hq);
  p.Hkv = static_cast<int32_t>(Hkv);
  p.group = static_cast<int32_t>(Hq / Hkv);
  p.D = static_cast<int32_t>(D);
  p.scale = static_cast<float>(softmax_scale);
  p.scale_log2 = static_cast<float>(softmax_scale * 1.4426950408889634);
  p.tile_offsets = nullptr;  // the forward's schedule; the backward builds its own tile list
  // the backward's own
  p.dout = static_cast<const uint16_t*>(dout.const_data_ptr());
  p.do_st = dout.stride(0);
  p.do_sh = dout.stride(1);
  p.dq = static_cast<uint16_t*>(dq.mutable_data_ptr());
  p.dk = static_cast<uint16_t*>(dk.mutable_data_ptr());
  p.dv = static_cast<uint16_t*>(dv.mutable_data_ptr());
  p.dlse = dlse_c.defined() ? dlse_c.const_data_ptr<float>() : nullptr;
  p.delta = delta.mutable_data_ptr<float>();
  p.tiles = tiles;
  p.num_tiles = num_tiles;
  p.max_tiles = n_tiles;
  p.vec16 = aligned16(q) && aligned16(k) && aligned16(v) && aligned16(dout);

  launch_bwd_prep(p, bf16, stream);
  if (bf16) {
    if (D == 64) launch_bwd<true, 64>(p, stream);
    else launch_bwd<true, 128>(p, stream);
  } else {
    if (D == 64) launch_bwd<false, 64>(p, stream);
    else launch_bwd<false, 128>(p, stream);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {dq, dk, dv};
}

}  // namespace

}  // namespace ugd_ops::cuda::attn

TORCH_LIBRARY_FRAGMENT(ugd_ops, m) {
  m.def(
      "_cuda_attention_bwd(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, Tensor? dlse, "
      "Tensor cu_seqlens, Tensor kv_start, Tensor kv_end, int? max_seqlen, float softmax_scale) "
      "-> (Tensor dq, Tensor dk, Tensor dv)");
}

TORCH_LIBRARY_IMPL(ugd_ops, CUDA, m) { m.impl("_cuda_attention_bwd", &ugd_ops::cuda::attn::cuda_attention_bwd); }
