// The bf16 path of the CPU partitioned-attention kernels: the same tiles, skips and passes as the
// fp32 loop (partitioned_attention_fwd.cpp / _bwd.cpp), with the tile products on the CPU's bf16
// units (bf16_gemm.h). Products are exact in fp32 and summed in fp32; the softmax statistics (m, l,
// lse, delta) and P / dS are computed in fp32 and rounded to bf16 only as operands of the next
// product, as PyTorch's own CPU flash attention does.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <vector>

#include "attention_tiles.h"
#include "bf16_gemm.h"

namespace ugd_ops::cpu {

void forward_bf16(const Bf16Gemm& g, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                  const at::Tensor& kv_start, const at::Tensor& kv_end, const TilePlan& plan, double softmax_scale,
                  at::Tensor& out, at::Tensor& lse);

// The whole backward: delta (pass 1), the fused pass and passes 2 and 3.
void backward_bf16(const Bf16Gemm& g, const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k,
                   const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse,
                   const std::optional<at::Tensor>& dlse, const at::Tensor& kv_start, const at::Tensor& kv_end,
                   const TilePlan& plan, double softmax_scale, at::Tensor& dq, at::Tensor& dk, at::Tensor& dv);

}  // namespace ugd_ops::cpu
