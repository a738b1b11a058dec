// The UGD sequence layout (docs/spec.md sections 2 and 3), shared by the CPU and CUDA layout kernels:
// span lengths (Lq, Ld, Lp, Lg) -> one key interval [lo, hi) per row, relative to the sequence.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>

#include <climits>
#include <cstdint>
#include <string>

#include "checks.h"

#if defined(__CUDACC__)
#define UGD_HOST_DEVICE __host__ __device__
#else
#define UGD_HOST_DEVICE
#endif

namespace ugd_ops {

enum class Mask : int32_t { kTtm = 0, kStm = 1, kCausal = 2, kBidirectional = 3 };

inline Mask parse_mask(const std::string& name) {
  if (name == "ttm") return Mask::kTtm;
  if (name == "stm") return Mask::kStm;
  if (name == "causal") return Mask::kCausal;
  if (name == "bidirectional") return Mask::kBidirectional;
  TORCH_CHECK_VALUE(false, "ugd_ops: unknown mask '", name,
              "'; expected one of 'ttm', 'stm', 'causal', 'bidirectional'");
}

// Row i of a sequence of length L whose spans are (Lq, Ld, Lp, .), A = Lq + Ld + Lp:
//            ttm               stm
//   Q rows   [0, Lq)           [0, A)
//   D rows   [Lq, Lq + Ld)     [0, A)
//   P rows   [0, A)            [0, A)
//   G rows   [0, i + 1)        [0, i + 1)
// causal: [0, i + 1); bidirectional: [0, L).
UGD_HOST_DEVICE inline void row_interval(Mask mask, int32_t Lq, int32_t Ld, int32_t Lp, int32_t L, int32_t i,
                                         int32_t& lo, int32_t& hi) {
  const int32_t A = Lq + Ld + Lp;
  lo = 0;
  hi = i + 1;
  if (mask == Mask::kBidirectional) {
    hi = L;
  } else if (mask != Mask::kCausal && i < A) {
    hi = A;
    if (mask == Mask::kTtm && i < Lq) {
      hi = Lq;
    } else if (mask == Mask::kTtm && i < Lq + Ld) {
      lo = Lq;
      hi = Lq + Ld;
    }
  }
}

// Checks int32 [B, 4] span lengths held on the CPU and returns cu_seqlens [B + 1] (CPU, int32).
inline at::Tensor cu_seqlens_from_spans(const at::Tensor& spans, Mask mask, const std::string& name) {
  TORCH_CHECK(spans.is_contiguous() && spans.device().is_cpu(), "ugd_ops: internal: spans must be contiguous on CPU");
  const int32_t* sp = spans.data_ptr<int32_t>();
  const int64_t B = spans.size(0);
  at::Tensor cu = at::empty({B + 1}, spans.options());
  int32_t* c = cu.data_ptr<int32_t>();
  c[0] = 0;
  for (int64_t b = 0; b < B; ++b) {
    const int32_t* s = sp + 4 * b;
    TORCH_CHECK_VALUE(s[0] >= 0 && s[1] >= 0 && s[2] >= 0 && s[3] >= 0, "ugd_ops: span lengths must be >= 0, sample ", b,
                " has (Lq, Ld, Lp, Lg) = (", s[0], ", ", s[1], ", ", s[2], ", ", s[3], ")");
    if (mask == Mask::kTtm || mask == Mask::kStm) {
      TORCH_CHECK_VALUE(s[0] >= 1 && s[1] >= 1, "ugd_ops: mask '", name,
                  "' needs Lq >= 1 and Ld >= 1 (each span ends with its [CLS]); sample ", b, " has Lq = ", s[0],
                  ", Ld = ", s[1]);
    }
    const int64_t len = static_cast<int64_t>(s[0]) + s[1] + s[2] + s[3];
    TORCH_CHECK_VALUE(c[b] + len <= INT_MAX, "ugd_ops: the packed batch exceeds 2^31 - 1 tokens");
    c[b + 1] = static_cast<int32_t>(c[b] + len);
  }
  return cu;
}

inline void check_spans_meta(const at::Tensor& spans) {
  TORCH_CHECK_VALUE(spans.scalar_type() == at::kInt, "ugd_ops: spans must be int32, got ", spans.scalar_type());
  TORCH_CHECK_VALUE(spans.dim() == 2 && spans.size(1) == 4,
              "ugd_ops: spans must be [B, 4] span lengths (Lq, Ld, Lp, Lg), got shape ", spans.sizes());
}

inline void check_mask_meta(const at::Tensor& cu_seqlens, const at::Tensor& kv_start, const at::Tensor& kv_end) {
  check_index_tensor(cu_seqlens, "cu_seqlens", cu_seqlens);
  check_index_tensor(kv_start, "kv_start", cu_seqlens);
  check_index_tensor(kv_end, "kv_end", cu_seqlens);
  TORCH_CHECK_VALUE(cu_seqlens.size(0) >= 1, "ugd_ops: cu_seqlens must have B + 1 >= 1 entries");
  TORCH_CHECK_VALUE(kv_end.size(0) == kv_start.size(0), "ugd_ops: kv_start and kv_end must have the same length, got ",
              kv_start.size(0), " and ", kv_end.size(0));
}

}  // namespace ugd_ops
