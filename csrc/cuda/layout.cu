// CUDA kernels of the layout ops (see csrc/cpu/layout.cpp). The span lengths ([B, 4]) are read on
// the host once, to check them and to size the output; the per-row work runs on the GPU.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <string>
#include <tuple>

#include "../common/checks.h"
#include "../common/layout.h"

namespace ugd_ops::cuda {
namespace {

// Index b of the sequence holding token t: the last b with cu[b] <= t.
__device__ __forceinline__ int32_t sequence_of(const int32_t* __restrict__ cu, int32_t B, int32_t t) {
  int32_t lo = 0, hi = B - 1;
  while (lo < hi) {
    const int32_t mid = (lo + hi + 1) / 2;
    if (cu[mid] <= t) lo = mid; else hi = mid - 1;
  }
  return lo;
}

__global__ void row_intervals_kernel(const int32_t* __restrict__ spans, const int32_t* __restrict__ cu, int32_t B,
                                     int32_t T, Mask mask, int32_t* __restrict__ ks, int32_t* __restrict__ ke) {
  const int32_t t = blockIdx.x * blockDim.x + threadIdx.x;
  if (t >= T) return;
  const int32_t b = sequence_of(cu, B, t);
  const int32_t* s = spans + 4 * b;
  int32_t lo, hi;
  row_interval(mask, s[0], s[1], s[2], cu[b + 1] - cu[b], t - cu[b], lo, hi);
  ks[t] = lo;
  ke[t] = hi;
}

__global__ void dense_mask_kernel(const int32_t* __restrict__ cu, int32_t B, int32_t T, const int32_t* __restrict__ ks,
                                  const int32_t* __restrict__ ke, bool* __restrict__ mask) {
  const int32_t i = blockIdx.y;
  const int32_t start = cu[sequence_of(cu, B, i)];
  const int32_t lo = start + ks[i], hi = start + ke[i];
  for (int32_t j = blockIdx.x * blockDim.x + threadIdx.x; j < T; j += gridDim.x * blockDim.x)
    mask[static_cast<int64_t>(i) * T + j] = j >= lo && j < hi;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> row_intervals_cuda(const at::Tensor& spans,
                                                                  c10::string_view mask_name) {
  const std::string name(mask_name);
  const Mask mask = parse_mask(name);
  check_spans_meta(spans);
  const c10::cuda::CUDAGuard guard(spans.device());
  const at::Tensor spans_d = spans.contiguous();
  const at::Tensor cu_h = cu_seqlens_from_spans(spans_d.cpu(), mask, name);
  const int64_t B = spans.size(0);
  const int32_t T = cu_h.data_ptr<int32_t>()[B];
  const at::Tensor cu = cu_h.to(spans.device());
  at::Tensor kv_start = at::empty({T}, spans.options());
  at::Tensor kv_end = at::empty({T}, spans.options());
  if (T > 0) {
    const int threads = 256;
    row_intervals_kernel<<<(T + threads - 1) / threads, threads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        spans_d.data_ptr<int32_t>(), cu.data_ptr<int32_t>(), static_cast<int32_t>(B), T, mask,
        kv_start.data_ptr<int32_t>(), kv_end.data_ptr<int32_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return {cu, kv_start, kv_end};
}

at::Tensor dense_mask_cuda(const at::Tensor& cu_seqlens, const at::Tensor& kv_start, const at::Tensor& kv_end) {
  check_mask_meta(cu_seqlens, kv_start, kv_end);
  const int64_t T = kv_start.size(0);
  TORCH_CHECK(T <= 65535, "ugd_ops: dense_mask on CUDA takes at most 65535 tokens, got ", T);
  // A reference op: reading the layout on the host to check it costs nothing that matters here.
  check_layout_values_cpu(cu_seqlens.cpu(), kv_start.cpu(), kv_end.cpu(), T);
  const c10::cuda::CUDAGuard guard(cu_seqlens.device());
  const at::Tensor cu = cu_seqlens.contiguous(), ks = kv_start.contiguous(), ke = kv_end.contiguous();
  at::Tensor mask = at::empty({T, T}, cu_seqlens.options().dtype(at::kBool));
  if (T > 0) {
    const int threads = 256;
    const dim3 grid(static_cast<unsigned>(std::min<int64_t>((T + threads - 1) / threads, 64)), static_cast<unsigned>(T));
    dense_mask_kernel<<<grid, threads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        cu.data_ptr<int32_t>(), static_cast<int32_t>(cu.size(0) - 1), static_cast<int32_t>(T), ks.data_ptr<int32_t>(),
        ke.data_ptr<int32_t>(), mask.data_ptr<bool>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return mask;
}

}  // namespace

TORCH_LIBRARY_IMPL(ugd_ops, CUDA, m) {
  m.impl("row_intervals", &row_intervals_cuda);
  m.impl("dense_mask", &dense_mask_cuda);
}

}  // namespace ugd_ops::cuda
