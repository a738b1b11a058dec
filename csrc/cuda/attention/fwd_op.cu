// ugd_ops::_cuda_attention_fwd: the internal operator that runs the sm_80 forward kernel
// (fwd_kernel.cuh, launched through launch.h) on CUDA tensors; bwd_op.cu is its backward twin.
// Same schema as partitioned_attention_fwd; the public operator routes here when
// ugd_ops/cuda_attention.py says the kernel serves the call (bf16 / fp16, head dim 64 or 128, q, k,
// v of one dtype) -- anything else is an error here, not a fallback.
//
// No host synchronisation: the layout's values are not checked here (the public operator's checks
// decide that); a broken layout cannot make the kernel read or write out of bounds (cu_seqlens and
// the intervals are clamped in the kernel), it only gives meaningless values. max_seqlen is not
// needed (the schedule is built on the device) and is ignored.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <climits>
#include <cmath>
#include <cstdint>
#include <limits>
#include <optional>
#include <tuple>

#include "../../common/checks.h"
#include "launch.h"
#include "params.h"
#include "schedule.h"

namespace ugd_ops::cuda::attn {
namespace {

// 16-byte loads need a 16-byte aligned base and token / head strides that are multiples of 8
// elements; a view that is not gets copied (contiguous, freshly allocated: aligned).
at::Tensor aligned_for_16b_loads(const at::Tensor& x) {
  const bool ok = reinterpret_cast<uintptr_t>(x.data_ptr()) % 16 == 0 && (x.size(0) <= 1 || x.stride(0) % 8 == 0) &&
                  (x.size(1) <= 1 || x.stride(1) % 8 == 0);
  return ok ? x : x.clone(at::MemoryFormat::Contiguous);
}

int64_t stride_or_zero(const at::Tensor& x, int dim) { return x.size(dim) <= 1 ? 0 : x.stride(dim); }

std::tuple<at::Tensor, at::Tensor> cuda_attention_fwd(const at::Tensor& q_in, const at::Tensor& k_in,
                                                      const at::Tensor& v_in, const at::Tensor& cu_seqlens,
                                                      const at::Tensor& kv_start, const at::Tensor& kv_end,
                                                      std::optional<int64_t> /*max_seqlen*/, double softmax_scale) {
  check_attention_meta(q_in, k_in, v_in, cu_seqlens, kv_start, kv_end, 128);
  TORCH_CHECK_VALUE(q_in.is_cuda(), "ugd_ops::_cuda_attention_fwd: q must be a CUDA tensor, got ", q_in.device(),
                    "; call ugd_ops.partitioned_attention_fwd, which picks the backend");
  const at::ScalarType dtype = q_in.scalar_type();
  const int64_t D = q_in.size(2);
  TORCH_CHECK_VALUE((dtype == at::kBFloat16 || dtype == at::kHalf) && (D == 64 || D == 128),
                    "ugd_ops::_cuda_attention_fwd serves bfloat16 / float16 with head dim 64 or 128, got ", dtype,
                    " and head dim ", D, "; call ugd_ops.partitioned_attention_fwd, which routes other inputs");
  // The kernel works in fp32 with scale * log2(e): a double that is finite can still overflow there
  // (every score would become inf or NaN).
  const double scale_log2 = softmax_scale * 1.4426950408889634;
  TORCH_CHECK_VALUE(std::isfinite(softmax_scale) && std::abs(scale_log2) <= std::numeric_limits<float>::max(),
                    "ugd_ops: softmax_scale must be finite (below ~2.3e38 for this fp32 kernel), got ",
                    softmax_scale);
  const c10::cuda::CUDAGuard guard(q_in.device());
  const int64_t T = q_in.size(0), Hq = q_in.size(1), Hkv = k_in.size(1), B = cu_seqlens.size(0) - 1;
  // int32 row / key indices in the kernel reach T + kFwdBlockM - 1 (the last tile's end): keep headroom.
  TORCH_CHECK_VALUE(T <= INT_MAX - 2 * kFwdBlockM && B < INT_MAX, "ugd_ops::_cuda_attention_fwd: at most 2^31 - ",
                    2 * kFwdBlockM + 1, " tokens and 2^31 - 2 sequences, got T = ", T, " and B = ", B,
                    "; split the batch");
  at::Tensor out = at::empty(q_in.sizes(), q_in.options());
  at::Tensor lse = at::empty({Hq, T}, q_in.options().dtype(at::kFloat));
  if (T == 0) return {out, lse};
  if (B == 0) {  // no sequence holds the tokens (a broken layout): rows attend to nothing
    out.zero_();
    lse.fill_(-std::numeric_limits<float>::infinity());
    return {out, lse};
  }
  const at::Tensor q = aligned_for_16b_loads(q_in), k = aligned_for_16b_loads(k_in), v = aligned_for_16b_loads(v_in);
  const at::Tensor cu = cu_seqlens.contiguous(), ks = kv_start.contiguous(), ke = kv_end.contiguous();
  at::Tensor tile_offsets = at::empty({B + 1}, cu.options());
  const int64_t slots = max_work_slots(T, B, kFwdBlockM);
  TORCH_CHECK_VALUE(slots * Hq <= INT_MAX, "ugd_ops::_cuda_attention_fwd: too many (query tile, head) work items (",
                    slots * Hq, "); split the batch");
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  launch_tile_offsets(cu.data_ptr<int32_t>(), static_cast<int32_t>(B), static_cast<int32_t>(T), kFwdBlockM,
                      tile_offsets.data_ptr<int32_t>(), stream);
  FwdParams p{};
  p.q = static_cast<const uint16_t*>(q.const_data_ptr());
  p.k = static_cast<const uint16_t*>(k.const_data_ptr());
  p.v = static_cast<const uint16_t*>(v.const_data_ptr());
  p.out = static_cast<uint16_t*>(out.mutable_data_ptr());
  p.lse = lse.data_ptr<float>();
  p.q_st = stride_or_zero(q, 0);
  p.q_sh = stride_or_zero(q, 1);
  p.k_st = stride_or_zero(k, 0);
  p.k_sh = stride_or_zero(k, 1);
  p.v_st = stride_or_zero(v, 0);
  p.v_sh = stride_or_zero(v, 1);
  p.o_st = out.stride(0);
  p.o_sh = out.stride(1);
  p.cu_seqlens = cu.data_ptr<int32_t>();
  p.kv_start = ks.data_ptr<int32_t>();
  p.kv_end = ke.data_ptr<int32_t>();
  p.tile_offsets = tile_offsets.data_ptr<int32_t>();
  p.B = static_cast<int32_t>(B);
  p.T = T;
  p.Hq = static_cast<int32_t>(Hq);
  p.Hkv = static_cast<int32_t>(Hkv);
  p.group = static_cast<int32_t>(Hq / Hkv);
  p.D = static_cast<int32_t>(D);
  p.scale = static_cast<float>(softmax_scale);
  p.scale_log2 = static_cast<float>(scale_log2);
  const bool bf16 = dtype == at::kBFloat16;
  if (bf16 && D == 64) launch_fwd<true, 64>(p, slots, stream);
  else if (bf16) launch_fwd<true, 128>(p, slots, stream);
  else if (D == 64) launch_fwd<false, 64>(p, slots, stream);
  else launch_fwd<false, 128>(p, slots, stream);
  return {out, lse};
}

}  // namespace

}  // namespace ugd_ops::cuda::attn

TORCH_LIBRARY_FRAGMENT(ugd_ops, m) {
  m.def(
      "_cuda_attention_fwd(Tensor q, Tensor k, Tensor v, Tensor cu_seqlens, Tensor kv_start, "
      "Tensor kv_end, int? max_seqlen, float softmax_scale) -> (Tensor out, Tensor lse)");
}

TORCH_LIBRARY_IMPL(ugd_ops, CUDA, m) { m.impl("_cuda_attention_fwd", &ugd_ops::cuda::attn::cuda_attention_fwd); }
