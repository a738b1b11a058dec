// Argument checks shared by every backend of the ugd_ops operators.
//
// The messages name the argument and say what was expected; the Python reference
// (ugd_ops/_checks.py) raises the same messages so that a user sees the same error
// whichever backend runs. Keep the two in step: tests/ops/test_errors.py runs both.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <optional>

namespace ugd_ops {

// Largest head dimension the CPU kernels accept (their tile buffers are heap-allocated,
// so this is a sanity bound, not a hardware limit).
constexpr int64_t kCpuMaxHeadDim = 1024;

inline bool is_supported_float(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
}

inline void check_index_tensor(const at::Tensor& t, const char* name, const at::Tensor& q) {
  TORCH_CHECK_VALUE(t.scalar_type() == at::kInt, "ugd_ops: ", name, " must be int32, got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.dim() == 1, "ugd_ops: ", name, " must be 1-D, got shape ", t.sizes());
  TORCH_CHECK_VALUE(t.device() == q.device(), "ugd_ops: ", name, " must be on the same device as q (", q.device(),
              "), got ", t.device());
}

inline void check_qkv_tensor(const at::Tensor& t, const char* name, const at::Tensor& q) {
  TORCH_CHECK_VALUE(t.dim() == 3, "ugd_ops: ", name, " must be 3-D [T, H, D], got shape ", t.sizes());
  TORCH_CHECK_VALUE(t.scalar_type() == q.scalar_type(), "ugd_ops: ", name, " must have the dtype of q (",
              q.scalar_type(), "), got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.device() == q.device(), "ugd_ops: ", name, " must be on the same device as q (", q.device(),
              "), got ", t.device());
  TORCH_CHECK_VALUE(t.size(2) <= 1 || t.stride(2) == 1, "ugd_ops: ", name,
              " must be contiguous in its last (head) dimension, got strides ", t.strides(),
              "; call .contiguous() or pass a view whose last stride is 1");
}

// Shape, dtype, device and stride checks: everything that needs no data read.
inline void check_attention_meta(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                 const at::Tensor& cu_seqlens, const at::Tensor& kv_start,
                                 const at::Tensor& kv_end, int64_t max_head_dim) {
  TORCH_CHECK_VALUE(is_supported_float(q.scalar_type()),
              "ugd_ops: q must be float32, float64, bfloat16 or float16, got ", q.scalar_type());
  check_qkv_tensor(q, "q", q);
  check_qkv_tensor(k, "k", q);
  check_qkv_tensor(v, "v", q);
  const int64_t T = q.size(0), Hq = q.size(1), D = q.size(2);
  TORCH_CHECK_VALUE(k.size(0) == T && v.size(0) == T, "ugd_ops: k and v must have T = ", T,
              " tokens like q, got ", k.size(0), " and ", v.size(0));
  TORCH_CHECK_VALUE(k.size(1) == v.size(1), "ugd_ops: k and v must have the same number of heads, got ",
              k.size(1), " and ", v.size(1));
  const int64_t Hkv = k.size(1);
  TORCH_CHECK_VALUE(Hkv >= 1 && Hq >= 1 && Hq % Hkv == 0, "ugd_ops: the number of query heads (", Hq,
              ") must be a positive multiple of the number of key/value heads (", Hkv, ")");
  TORCH_CHECK_VALUE(k.size(2) == D && v.size(2) == D, "ugd_ops: q, k and v must share the head dim, got ", D,
              ", ", k.size(2), ", ", v.size(2));
  TORCH_CHECK_VALUE(D >= 1 && D <= max_head_dim, "ugd_ops: unsupported head dim ", D, " (this kernel takes 1 to ",
              max_head_dim, ")");
  check_index_tensor(cu_seqlens, "cu_seqlens", q);
  check_index_tensor(kv_start, "kv_start", q);
  check_index_tensor(kv_end, "kv_end", q);
  TORCH_CHECK_VALUE(cu_seqlens.size(0) >= 1, "ugd_ops: cu_seqlens must have B + 1 >= 1 entries");
  TORCH_CHECK_VALUE(kv_start.size(0) == T && kv_end.size(0) == T, "ugd_ops: kv_start and kv_end must have T = ", T,
              " entries, got ", kv_start.size(0), " and ", kv_end.size(0));
}

// Value checks on host-readable (CPU) layout tensors. Returns the longest sequence.
// Intervals are relative to the start of their sequence: 0 <= kv_start <= kv_end <= L.
inline int64_t check_layout_values_cpu(const at::Tensor& cu_seqlens, const at::Tensor& kv_start,
                                       const at::Tensor& kv_end, int64_t T) {
  const at::Tensor cu = cu_seqlens.contiguous();
  const at::Tensor ks = kv_start.contiguous();
  const at::Tensor ke = kv_end.contiguous();
  const int32_t* c = cu.data_ptr<int32_t>();
  const int32_t* s = ks.data_ptr<int32_t>();
  const int32_t* e = ke.data_ptr<int32_t>();
  const int64_t B = cu.size(0) - 1;
  TORCH_CHECK_VALUE(c[0] == 0, "ugd_ops: cu_seqlens must start at 0, got ", c[0]);
  TORCH_CHECK_VALUE(c[B] == T, "ugd_ops: cu_seqlens must end at T = ", T, " (the number of tokens), got ", c[B]);
  int64_t max_len = 0;
  for (int64_t b = 0; b < B; ++b) {
    TORCH_CHECK_VALUE(c[b + 1] >= c[b], "ugd_ops: cu_seqlens must be non-decreasing, but cu_seqlens[", b + 1,
                "] = ", c[b + 1], " < cu_seqlens[", b, "] = ", c[b]);
    const int32_t L = c[b + 1] - c[b];
    max_len = L > max_len ? L : max_len;
    for (int32_t i = c[b]; i < c[b + 1]; ++i) {
      TORCH_CHECK_VALUE(s[i] <= e[i], "ugd_ops: kv_start[", i, "] = ", s[i], " > kv_end[", i, "] = ", e[i],
                  " (start > end)");
      TORCH_CHECK_VALUE(s[i] >= 0 && e[i] <= L, "ugd_ops: the interval [kv_start, kv_end) = [", s[i], ", ", e[i],
                  ") of row ", i, " lies outside its sequence ", b, " of length ", L,
                  " (intervals are relative to the sequence start)");
    }
  }
  return max_len;
}

inline void check_max_seqlen(std::optional<int64_t> max_seqlen, int64_t actual) {
  if (max_seqlen.has_value()) {
    TORCH_CHECK_VALUE(*max_seqlen >= actual, "ugd_ops: max_seqlen = ", *max_seqlen,
                " is smaller than the longest sequence in cu_seqlens (", actual, ")");
  }
}

}  // namespace ugd_ops
