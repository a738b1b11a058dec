// CPU kernel of ugd_ops::detached_kl_fwd: per row, KL(softmax(p / T) || softmax(q / T)) and, when
// asked, its gradients, in one sweep over the row, so that the backward only scales them.
//
//   loss_r   = sum_c P_c (log P_c - log Q_c)
//   d loss_r / d p_c = P_c (log P_c - log Q_c - loss_r) / T
//   d loss_r / d q_c = (Q_c - P_c) / T                       (only for detach=False)
#define TORCH_ASSERT_ONLY_METHOD_OPERATORS
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <tuple>
#include <utility>
#include <vector>

#include "../common/kl_checks.h"

namespace ugd_ops::cpu {
namespace {

// Row sums (the exp-sum and the KL itself) are accumulated in double: a sequential fp32 sum over a
// vocabulary-sized row (151 936 classes) loses ~3e-4 relatively, 20x more than PyTorch's own fp32 KL
// (which sums pairwise); in double the summation error vanishes and only the per-element fp32
// rounding remains, the same as PyTorch's. Elementwise work stays in acc_t (fp32 for fp32/bf16/fp16).
using sum_t = double;

// Row maximum and log of the shifted exp-sum, kept apart: log_softmax = (x - max) - log_sum. Folding
// them into one log-sum-exp first would round it at the magnitude of the logits (1e4 -> 1e-3 in fp32).
template <typename acc_t, typename scalar_t>
std::pair<acc_t, acc_t> max_and_log_sum(const scalar_t* x, int64_t C, acc_t inv_t) {
  acc_t mx = -std::numeric_limits<acc_t>::infinity();
  for (int64_t c = 0; c < C; ++c) mx = std::max(mx, static_cast<acc_t>(x[c]) * inv_t);
  if (!std::isfinite(mx)) return {mx, acc_t(0)};
  sum_t s = 0;
  for (int64_t c = 0; c < C; ++c) s += static_cast<sum_t>(std::exp(static_cast<acc_t>(x[c]) * inv_t - mx));
  return {mx, static_cast<acc_t>(std::log(s))};
}

template <typename scalar_t>
void detached_kl_kernel(const at::Tensor& p, const at::Tensor& q, double temperature, at::Tensor& loss,
                        at::Tensor* grad_p, at::Tensor* grad_q) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t C = p.size(-1), N = C == 0 ? 0 : p.numel() / C;
  const scalar_t* pp = p.data_ptr<scalar_t>();
  const scalar_t* qp = q.data_ptr<scalar_t>();
  acc_t* lp = loss.data_ptr<acc_t>();
  scalar_t* gp = grad_p ? grad_p->data_ptr<scalar_t>() : nullptr;
  scalar_t* gq = grad_q ? grad_q->data_ptr<scalar_t>() : nullptr;
  const acc_t inv_t = acc_t(1) / static_cast<acc_t>(temperature);
  at::parallel_for(0, N, std::max<int64_t>(1, 4096 / std::max<int64_t>(C, 1)), [&](int64_t begin, int64_t end) {
    std::vector<acc_t> prob(C), log_ratio(C);  // per row: P and log P - log Q, reused by the gradients
    for (int64_t r = begin; r < end; ++r) {
      const scalar_t* a = pp + r * C;
      const scalar_t* b = qp + r * C;
      const auto [mx_a, ls_a] = max_and_log_sum<acc_t>(a, C, inv_t);
      const auto [mx_b, ls_b] = max_and_log_sum<acc_t>(b, C, inv_t);
      sum_t kl_sum = 0;
      for (int64_t c = 0; c < C; ++c) {
        const acc_t log_p = (static_cast<acc_t>(a[c]) * inv_t - mx_a) - ls_a;
        const acc_t log_q = (static_cast<acc_t>(b[c]) * inv_t - mx_b) - ls_b;
        prob[c] = std::exp(log_p);
        log_ratio[c] = log_p - log_q;
        // 0 * log 0 = 0: a class P gives no mass to adds nothing, whatever Q says.
        if (prob[c] > 0) kl_sum += static_cast<sum_t>(prob[c] * log_ratio[c]);
      }
      const acc_t kl = static_cast<acc_t>(kl_sum);
      lp[r] = kl;
      if (gp != nullptr) {
        for (int64_t c = 0; c < C; ++c)
          gp[r * C + c] = static_cast<scalar_t>(prob[c] > 0 ? prob[c] * (log_ratio[c] - kl) * inv_t : acc_t(0));
      }
      if (gq != nullptr) {  // Q = P / exp(log P - log Q), computed from log Q for accuracy
        for (int64_t c = 0; c < C; ++c) {
          const acc_t log_q = (static_cast<acc_t>(b[c]) * inv_t - mx_b) - ls_b;
          gq[r * C + c] = static_cast<scalar_t>((std::exp(log_q) - prob[c]) * inv_t);
        }
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> detached_kl_fwd_cpu(const at::Tensor& p_logits,
                                                                   const at::Tensor& q_logits, double temperature,
                                                                   bool want_grad_p, bool want_grad_q) {
  check_kl_args(p_logits, q_logits, temperature);
  const at::Tensor p = p_logits.contiguous(), q = q_logits.contiguous();
  // Gradients nobody asked for are returned as empty tensors (shape [0]).
  at::Tensor loss, grad_p, grad_q;
  std::tie(loss, grad_p, grad_q) = make_kl_outputs(p, q, want_grad_p, want_grad_q);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, p.scalar_type(), "detached_kl_fwd_cpu", [&] {
    detached_kl_kernel<scalar_t>(p, q, temperature, loss, want_grad_p ? &grad_p : nullptr,
                                 want_grad_q ? &grad_q : nullptr);
  });
  return {loss, grad_p, grad_q};
}

}  // namespace

TORCH_LIBRARY_IMPL(ugd_ops, CPU, m) { m.impl("detached_kl_fwd", &detached_kl_fwd_cpu); }

}  // namespace ugd_ops::cpu
