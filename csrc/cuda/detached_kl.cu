// CUDA kernel of ugd_ops::detached_kl_fwd, with the semantics of the CPU kernel
// (csrc/cpu/detached_kl.cpp): per row r of p, q ([N, C] after flattening the leading dims),
//
//   loss_r           = sum_c P_c (log P_c - log Q_c)            (0 * log 0 = 0: skipped when P_c = 0)
//   d loss_r / d p_c = P_c (log P_c - log Q_c - loss_r) / T
//   d loss_r / d q_c = (Q_c - P_c) / T                           (only when asked: detach=False)
//
// with P = softmax(p / T), Q = softmax(q / T), log-softmax computed as (x - max) - log(sum exp(x - max)),
// the max and the log-sum kept apart (folding them into one log-sum-exp would round it at the
// magnitude of the logits). Accumulation in fp32 for bf16 / fp16 / fp32 logits, fp64 for fp64.
//
// Work split (one kernel launch, no host synchronisation, the current stream):
//   C <= 32      a group of 4, 8, 16 or 32 lanes per row (several rows per warp), one class per lane;
//   C <= 512     a warp per row, up to 16 classes per lane;
//   C <= 4096    a block of 256 threads per row, up to 16 classes per thread.
//   In these three the row is read from global memory once into registers: max, log-sum, the loss
//   and both gradients are computed from there, and the gradients written once.
//   C > 4096     a block per row that streams the row: an online max / sum sweep, a KL sweep and a
//                gradient sweep (three reads of the row, the last two mostly from L2).
#define TORCH_ASSERT_ONLY_METHOD_OPERATORS
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <tuple>

#include "../common/kl_checks.h"

namespace ugd_ops::cuda {
namespace {

constexpr int kThreads = 256;        // threads per block, for every variant
constexpr int64_t kMaxBlocks = 1 << 18;  // rows beyond blocks * rows-per-block are reached by a grid-stride loop

template <typename acc_t>
__device__ __forceinline__ acc_t neg_inf() {
  return -std::numeric_limits<acc_t>::infinity();
}

// max that ignores a NaN second argument, as std::max(mx, x) of the CPU kernel does.
template <typename acc_t>
__device__ __forceinline__ acc_t max_of(acc_t a, acc_t b) {
  return a < b ? b : a;
}

// exp and log. The build passes --use_fast_math, which turns expf into __expf, whose error grows
// with |x| (about |x| * 6e-8 relative): exp(x) = 2^(x log2 e) is evaluated here with the product
// x * log2(e) carried to about 48 bits (an FMA for the rounding error of the product plus the low
// part of log2 e), so that only the ~2 ulp of the hardware 2^t remain. fp64 uses the exact exp.
__device__ __forceinline__ float kl_exp(float x) {
  constexpr float kLog2eHi = 1.44269502162933349609375f;  // float(log2 e)
  constexpr float kLog2eLo = 1.925963033500e-8f;          // log2 e - kLog2eHi
  constexpr float kLn2 = 0.69314718055994530942f;
  const float t = x * kLog2eHi;
  if (!isfinite(t)) return exp2f(t);  // +-inf (and NaN) pass through: exp(-inf) = 0, exp(inf) = inf
  const float lo = fmaf(x, kLog2eHi, -t) + x * kLog2eLo;
  return exp2f(t) * fmaf(lo, kLn2, 1.0f);
}
__device__ __forceinline__ double kl_exp(double x) { return ::exp(x); }
__device__ __forceinline__ float kl_log(float x) { return ::logf(x); }
__device__ __forceinline__ double kl_log(double x) { return ::log(x); }

struct MaxOp {
  template <typename T>
  __device__ __forceinline__ T operator()(T a, T b) const { return max_of(a, b); }
};
struct SumOp {
  template <typename T>
  __device__ __forceinline__ T operator()(T a, T b) const { return a + b; }
};

// Reduction over the GROUP threads that share a row; every one of them gets the result (the same
// bits in all of them: the order of the operations does not depend on the thread). GROUP <= 32 is a
// power of two and the groups are aligned inside the warp, so xor shuffles stay within a group;
// GROUP > 32 (a whole block) goes through shared memory. Every thread of the block must call it.
template <int GROUP, typename T, typename Op>
__device__ __forceinline__ T group_reduce(T v, Op op, T* smem) {
#pragma unroll
  for (int offset = (GROUP < 32 ? GROUP : 32) / 2; offset > 0; offset >>= 1)
    v = op(v, __shfl_xor_sync(0xffffffffu, v, offset));
  if constexpr (GROUP > 32) {
    constexpr int kWarps = GROUP / 32;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    __syncthreads();  // the previous reduction's reads of smem are done
    if (lane == 0) smem[warp] = v;
    __syncthreads();
    v = smem[0];
#pragma unroll
    for (int w = 1; w < kWarps; ++w) v = op(v, smem[w]);
  }
  return v;
}

// Rows held in registers: GROUP threads per row, ITEMS classes per thread (class c = lane + i * GROUP),
// GROUP * ITEMS >= C. kThreads / GROUP rows per block and iteration.
template <typename scalar_t, typename acc_t, int GROUP, int ITEMS>
__global__ void __launch_bounds__(kThreads)
    kl_rows_kernel(const scalar_t* __restrict__ p, const scalar_t* __restrict__ q, int64_t N, int C, acc_t inv_t,
                   acc_t* __restrict__ loss, scalar_t* __restrict__ grad_p, scalar_t* __restrict__ grad_q) {
  static_assert(kThreads % GROUP == 0 && (GROUP <= 32 || GROUP == kThreads), "GROUP: a warp part or the block");
  constexpr int kRows = kThreads / GROUP;
  __shared__ acc_t smem[GROUP > 32 ? GROUP / 32 : 1];
  const int lane = threadIdx.x % GROUP;
  const int group = threadIdx.x / GROUP;
  // The loop bound is the same for the whole block, so every thread takes part in every reduction;
  // a group past the last row computes on -inf padding and writes nothing.
  for (int64_t base = static_cast<int64_t>(blockIdx.x) * kRows; base < N;
       base += static_cast<int64_t>(gridDim.x) * kRows) {
    const int64_t row = base + group;
    const bool active = row < N;
    const int64_t offset = (active ? row : 0) * static_cast<int64_t>(C);
    const scalar_t* a = p + offset;
    const scalar_t* b = q + offset;

    acc_t x[ITEMS], y[ITEMS];  // p / T and q / T, later log P and log Q
    acc_t mx_a = neg_inf<acc_t>(), mx_b = neg_inf<acc_t>();
#pragma unroll
    for (int i = 0; i < ITEMS; ++i) {
      const int c = lane + i * GROUP;
      const bool ok = active && c < C;
      x[i] = ok ? static_cast<acc_t>(a[c]) * inv_t : neg_inf<acc_t>();
      y[i] = ok ? static_cast<acc_t>(b[c]) * inv_t : neg_inf<acc_t>();
      mx_a = max_of(mx_a, x[i]);
      mx_b = max_of(mx_b, y[i]);
    }
    mx_a = group_reduce<GROUP>(mx_a, MaxOp(), smem);
    mx_b = group_reduce<GROUP>(mx_b, MaxOp(), smem);
    acc_t s_a = 0, s_b = 0;
#pragma unroll
    for (int i = 0; i < ITEMS; ++i) {  // padding is -inf: exp(-inf - max) = 0
      s_a += kl_exp(x[i] - mx_a);
      s_b += kl_exp(y[i] - mx_b);
    }
    s_a = group_reduce<GROUP>(s_a, SumOp(), smem);
    s_b = group_reduce<GROUP>(s_b, SumOp(), smem);
    // As the CPU kernel: a row whose max is not finite keeps log-sum 0 (its loss is then inf or NaN).
    const acc_t ls_a = isfinite(mx_a) ? kl_log(s_a) : acc_t(0);
    const acc_t ls_b = isfinite(mx_b) ? kl_log(s_b) : acc_t(0);

    acc_t kl = 0;
#pragma unroll
    for (int i = 0; i < ITEMS; ++i) {
      const int c = lane + i * GROUP;
      if (c < C) {
        const acc_t log_p = (x[i] - mx_a) - ls_a;
        const acc_t log_q = (y[i] - mx_b) - ls_b;
        const acc_t prob = kl_exp(log_p);
        if (prob > 0) kl += prob * (log_p - log_q);  // 0 * log 0 = 0
        x[i] = log_p;
        y[i] = log_q;
      }
    }
    kl = group_reduce<GROUP>(kl, SumOp(), smem);

    if (active) {
      if (lane == 0) loss[row] = kl;
      if (grad_p != nullptr) {
#pragma unroll
        for (int i = 0; i < ITEMS; ++i) {
          const int c = lane + i * GROUP;
          if (c < C) {
            const acc_t prob = kl_exp(x[i]);
            grad_p[offset + c] = static_cast<scalar_t>(prob > 0 ? prob * ((x[i] - y[i]) - kl) * inv_t : acc_t(0));
          }
        }
      }
      if (grad_q != nullptr) {
#pragma unroll
        for (int i = 0; i < ITEMS; ++i) {
          const int c = lane + i * GROUP;
          if (c < C) grad_q[offset + c] = static_cast<scalar_t>((kl_exp(y[i]) - kl_exp(x[i])) * inv_t);
        }
      }
    }
  }
}

// One step of an online max / sum-of-exp: (m, s) with s = sum exp(v - m) over the values seen.
template <typename acc_t>
__device__ __forceinline__ void online_add(acc_t& m, acc_t& s, acc_t v) {
  if (v == neg_inf<acc_t>()) return;  // exp(-inf) adds nothing (and -inf - -inf would be NaN)
  if (v > m) {
    s = s * kl_exp(m - v) + acc_t(1);
    m = v;
  } else {
    s += kl_exp(v - m);  // a NaN v makes s NaN, as it makes the CPU kernel's sum NaN
  }
}

// Rows longer than the register variants take: a block per row, streaming it three times.
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads)
    kl_rows_streaming_kernel(const scalar_t* __restrict__ p, const scalar_t* __restrict__ q, int64_t N, int C,
                             acc_t inv_t, acc_t* __restrict__ loss, scalar_t* __restrict__ grad_p,
                             scalar_t* __restrict__ grad_q) {
  __shared__ acc_t smem[kThreads / 32];
  for (int64_t row = blockIdx.x; row < N; row += gridDim.x) {
    const int64_t offset = row * static_cast<int64_t>(C);
    const scalar_t* a = p + offset;
    const scalar_t* b = q + offset;
    // Sweep 1: online max and sum per thread, then merged over the block.
    acc_t m_a = neg_inf<acc_t>(), s_a = 0, m_b = neg_inf<acc_t>(), s_b = 0;
    for (int c = threadIdx.x; c < C; c += kThreads) {
      online_add(m_a, s_a, static_cast<acc_t>(a[c]) * inv_t);
      online_add(m_b, s_b, static_cast<acc_t>(b[c]) * inv_t);
    }
    const acc_t mx_a = group_reduce<kThreads>(m_a, MaxOp(), smem);
    const acc_t mx_b = group_reduce<kThreads>(m_b, MaxOp(), smem);
    s_a = s_a == 0 ? acc_t(0) : s_a * kl_exp(m_a - mx_a);
    s_b = s_b == 0 ? acc_t(0) : s_b * kl_exp(m_b - mx_b);
    s_a = group_reduce<kThreads>(s_a, SumOp(), smem);
    s_b = group_reduce<kThreads>(s_b, SumOp(), smem);
    const acc_t ls_a = isfinite(mx_a) ? kl_log(s_a) : acc_t(0);
    const acc_t ls_b = isfinite(mx_b) ? kl_log(s_b) : acc_t(0);
    // Sweep 2: the loss.
    acc_t kl = 0;
    for (int c = threadIdx.x; c < C; c += kThreads) {
      const acc_t log_p = (static_cast<acc_t>(a[c]) * inv_t - mx_a) - ls_a;
      const acc_t log_q = (static_cast<acc_t>(b[c]) * inv_t - mx_b) - ls_b;
      const acc_t prob = kl_exp(log_p);
      if (prob > 0) kl += prob * (log_p - log_q);
    }
    kl = group_reduce<kThreads>(kl, SumOp(), smem);
    if (threadIdx.x == 0) loss[row] = kl;
    // Sweep 3: the gradients.
    if (grad_p != nullptr || grad_q != nullptr) {
      for (int c = threadIdx.x; c < C; c += kThreads) {
        const acc_t log_p = (static_cast<acc_t>(a[c]) * inv_t - mx_a) - ls_a;
        const acc_t log_q = (static_cast<acc_t>(b[c]) * inv_t - mx_b) - ls_b;
        const acc_t prob = kl_exp(log_p);
        if (grad_p != nullptr)
          grad_p[offset + c] = static_cast<scalar_t>(prob > 0 ? prob * ((log_p - log_q) - kl) * inv_t : acc_t(0));
        if (grad_q != nullptr) grad_q[offset + c] = static_cast<scalar_t>((kl_exp(log_q) - prob) * inv_t);
      }
    }
  }
}

struct Launch {
  int64_t N;
  int C;
  cudaStream_t stream;
};

template <typename scalar_t, typename acc_t, int GROUP, int ITEMS>
void launch_rows(const Launch& l, const scalar_t* p, const scalar_t* q, acc_t inv_t, acc_t* loss, scalar_t* gp,
                 scalar_t* gq) {
  constexpr int kRows = kThreads / GROUP;
  const int64_t blocks = std::min<int64_t>((l.N + kRows - 1) / kRows, kMaxBlocks);
  kl_rows_kernel<scalar_t, acc_t, GROUP, ITEMS><<<static_cast<unsigned>(blocks), kThreads, 0, l.stream>>>(
      p, q, l.N, l.C, inv_t, loss, gp, gq);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename scalar_t>
void launch_detached_kl(const at::Tensor& p, const at::Tensor& q, double temperature, at::Tensor& loss,
                        at::Tensor* grad_p, at::Tensor* grad_q) {
  using acc_t = at::opmath_type<scalar_t>;  // float for bf16 / fp16 / fp32, double for fp64
  const int64_t C = p.size(-1);
  const int64_t N = p.numel() / C;
  const Launch l{N, static_cast<int>(C), c10::cuda::getCurrentCUDAStream(p.device().index()).stream()};
  const acc_t inv_t = acc_t(1) / static_cast<acc_t>(temperature);  // as the CPU kernel rounds it
  const scalar_t* pp = p.const_data_ptr<scalar_t>();
  const scalar_t* qp = q.const_data_ptr<scalar_t>();
  acc_t* lp = loss.mutable_data_ptr<acc_t>();
  scalar_t* gp = grad_p ? grad_p->mutable_data_ptr<scalar_t>() : nullptr;
  scalar_t* gq = grad_q ? grad_q->mutable_data_ptr<scalar_t>() : nullptr;
  if (C <= 4) {
    launch_rows<scalar_t, acc_t, 4, 1>(l, pp, qp, inv_t, lp, gp, gq);
  } else if (C <= 8) {
    launch_rows<scalar_t, acc_t, 8, 1>(l, pp, qp, inv_t, lp, gp, gq);
  } else if (C <= 16) {
    launch_rows<scalar_t, acc_t, 16, 1>(l, pp, qp, inv_t, lp, gp, gq);
  } else if (C <= 32) {
    launch_rows<scalar_t, acc_t, 32, 1>(l, pp, qp, inv_t, lp, gp, gq);
  } else if (C <= 64) {
    launch_rows<scalar_t, acc_t, 32, 2>(l, pp, qp, inv_t, lp, gp, gq);
  } else if (C <= 128) {
    launch_rows<scalar_t, acc_t, 32, 4>(l, pp, qp, inv_t, lp, gp, gq);
  } else if (C <= 256) {
    launch_rows<scalar_t, acc_t, 32, 8>(l, pp, qp, inv_t, lp, gp, gq);
  } else if (C <= 512) {
    launch_rows<scalar_t, acc_t, 32, 16>(l, pp, qp, inv_t, lp, gp, gq);
  } else if (C <= 1024) {  // a block, not a warp with 32 classes per lane (200 registers: low occupancy)
    launch_rows<scalar_t, acc_t, kThreads, 4>(l, pp, qp, inv_t, lp, gp, gq);
  } else if (C <= 2048) {
    launch_rows<scalar_t, acc_t, kThreads, 8>(l, pp, qp, inv_t, lp, gp, gq);
  } else if (C <= 4096) {
    launch_rows<scalar_t, acc_t, kThreads, 16>(l, pp, qp, inv_t, lp, gp, gq);
  } else {
    const int64_t blocks = std::min<int64_t>(N, kMaxBlocks);
    kl_rows_streaming_kernel<scalar_t, acc_t><<<static_cast<unsigned>(blocks), kThreads, 0, l.stream>>>(
        pp, qp, N, l.C, inv_t, lp, gp, gq);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> detached_kl_fwd_cuda(const at::Tensor& p_logits,
                                                                    const at::Tensor& q_logits, double temperature,
                                                                    bool want_grad_p, bool want_grad_q) {
  // Every argument check runs before anything else: no guard, no copy, no allocation and no data access
  // happens for arguments that fail one (a CPU tensor beside a CUDA one reaches this kernel too, since
  // the dispatcher picks CUDA for the mix).
  check_kl_args(p_logits, q_logits, temperature);
  TORCH_CHECK_VALUE(p_logits.is_cuda() && q_logits.is_cuda(), "ugd_ops: q_logits must be on the device of p_logits (",
                    p_logits.device(), "), got ", q_logits.device());
  TORCH_CHECK_VALUE(p_logits.size(-1) <= std::numeric_limits<int32_t>::max(),
                    "ugd_ops: detached_kl on CUDA takes at most 2^31 - 1 classes, got ", p_logits.size(-1));
  const c10::cuda::CUDAGuard guard(p_logits.device());
  const at::Tensor p = p_logits.contiguous(), q = q_logits.contiguous();
  // Gradients nobody asked for are returned as empty tensors (shape [0]).
  at::Tensor loss, grad_p, grad_q;
  std::tie(loss, grad_p, grad_q) = make_kl_outputs(p, q, want_grad_p, want_grad_q);
  const int64_t C = p.size(-1);
  if (C == 0 || p.numel() == 0) return {loss, grad_p, grad_q};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, p.scalar_type(), "detached_kl_fwd_cuda", [&] {
    launch_detached_kl<scalar_t>(p, q, temperature, loss, want_grad_p ? &grad_p : nullptr,
                                 want_grad_q ? &grad_q : nullptr);
  });
  return {loss, grad_p, grad_q};
}

}  // namespace

TORCH_LIBRARY_IMPL(ugd_ops, CUDA, m) { m.impl("detached_kl_fwd", &detached_kl_fwd_cuda); }

}  // namespace ugd_ops::cuda
