// CPU kernels of the layout ops: row_intervals (span lengths -> one key interval per row, docs/spec.md
// section 3) and dense_mask (the intervals as a [T, T] boolean mask, for references and peers).
#define TORCH_ASSERT_ONLY_METHOD_OPERATORS
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <string>
#include <tuple>

#include "../common/checks.h"
#include "../common/layout.h"

namespace ugd_ops::cpu {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor> row_intervals_cpu(const at::Tensor& spans_in,
                                                                 c10::string_view mask_name) {
  const std::string name(mask_name);
  const Mask mask = parse_mask(name);
  check_spans_meta(spans_in);
  const at::Tensor spans = spans_in.contiguous();
  at::Tensor cu = cu_seqlens_from_spans(spans, mask, name);
  const int32_t* sp = spans.data_ptr<int32_t>();
  const int32_t* c = cu.data_ptr<int32_t>();
  const int64_t B = spans.size(0), T = c[B];
  at::Tensor kv_start = at::empty({T}, spans.options());
  at::Tensor kv_end = at::empty({T}, spans.options());
  int32_t* ks = kv_start.data_ptr<int32_t>();
  int32_t* ke = kv_end.data_ptr<int32_t>();
  at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      const int32_t L = c[b + 1] - c[b];
      for (int32_t i = 0; i < L; ++i)
        row_interval(mask, sp[4 * b], sp[4 * b + 1], sp[4 * b + 2], L, i, ks[c[b] + i], ke[c[b] + i]);
    }
  });
  return {cu, kv_start, kv_end};
}

at::Tensor dense_mask_cpu(const at::Tensor& cu_seqlens, const at::Tensor& kv_start, const at::Tensor& kv_end) {
  check_mask_meta(cu_seqlens, kv_start, kv_end);
  const int64_t T = kv_start.size(0);
  check_layout_values_cpu(cu_seqlens, kv_start, kv_end, T);
  const at::Tensor cu = cu_seqlens.contiguous(), s = kv_start.contiguous(), e = kv_end.contiguous();
  const int32_t* c = cu.data_ptr<int32_t>();
  const int32_t* ks = s.data_ptr<int32_t>();
  const int32_t* ke = e.data_ptr<int32_t>();
  at::Tensor mask = at::zeros({T, T}, cu_seqlens.options().dtype(at::kBool));
  bool* m = mask.data_ptr<bool>();
  const int64_t B = cu.size(0) - 1;
  at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b)
      for (int64_t i = c[b]; i < c[b + 1]; ++i)
        for (int64_t j = ks[i]; j < ke[i]; ++j) m[i * T + c[b] + j] = true;
  });
  return mask;
}

}  // namespace

TORCH_LIBRARY_IMPL(ugd_ops, CPU, m) {
  m.impl("row_intervals", &row_intervals_cpu);
  m.impl("dense_mask", &dense_mask_cpu);
}

}  // namespace ugd_ops::cpu
