// Argument checks and output allocation of ugd_ops::detached_kl_fwd, shared by the CPU kernel
// (csrc/cpu/detached_kl.cpp) and the CUDA kernel (csrc/cuda/detached_kl.cu).
//
// The messages equal those of check_kl_args in ugd_ops/_checks.py (the reference and the fake
// kernel), so that every backend raises the same error; tests/ops/test_errors.py runs both.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <tuple>

#include "checks.h"

namespace ugd_ops {

// Shapes, dtypes, devices and the temperature: everything that needs no data read.
inline void check_kl_args(const at::Tensor& p_logits, const at::Tensor& q_logits, double temperature) {
  TORCH_CHECK_VALUE(is_supported_float(p_logits.scalar_type()),
                    "ugd_ops: p_logits must be float32, float64, bfloat16 or float16, got ", p_logits.scalar_type());
  TORCH_CHECK_VALUE(q_logits.scalar_type() == p_logits.scalar_type(),
                    "ugd_ops: q_logits must have the dtype of p_logits (", p_logits.scalar_type(), "), got ",
                    q_logits.scalar_type());
  TORCH_CHECK_VALUE(q_logits.device() == p_logits.device(), "ugd_ops: q_logits must be on the device of p_logits (",
                    p_logits.device(), "), got ", q_logits.device());
  TORCH_CHECK_VALUE(p_logits.dim() >= 2, "ugd_ops: p_logits must be [N, C] (or [..., C]), got shape ",
                    p_logits.sizes());
  TORCH_CHECK_VALUE(q_logits.sizes() == p_logits.sizes(), "ugd_ops: q_logits must have the shape of p_logits ",
                    p_logits.sizes(), ", got ", q_logits.sizes());
  TORCH_CHECK_VALUE(temperature > 0 && std::isfinite(temperature),
                    "ugd_ops: temperature must be a positive number, got ", temperature);
}

// The outputs of detached_kl_fwd for (contiguous) logits p and q:
//   loss   [...] (p's shape without its last dim), fp32 (fp64 for fp64 logits);
//   grad_p, grad_q in the logits' dtype, or empty [0] tensors when not asked for.
// A row of C = 0 classes has a KL of 0 (an empty sum): the kernels skip such rows, so the loss is
// zero-filled then.
inline std::tuple<at::Tensor, at::Tensor, at::Tensor> make_kl_outputs(const at::Tensor& p, const at::Tensor& q,
                                                                      bool want_grad_p, bool want_grad_q) {
  const auto acc_dtype = p.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const auto rows = p.sizes().slice(0, p.dim() - 1);
  at::Tensor loss = p.size(-1) == 0 ? at::zeros(rows, p.options().dtype(acc_dtype))
                                    : at::empty(rows, p.options().dtype(acc_dtype));
  at::Tensor grad_p = want_grad_p ? at::empty(p.sizes(), p.options()) : at::empty({0}, p.options());
  at::Tensor grad_q = want_grad_q ? at::empty(q.sizes(), q.options()) : at::empty({0}, q.options());
  return {loss, grad_p, grad_q};
}

}  // namespace ugd_ops
