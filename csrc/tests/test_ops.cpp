// C++ tests of the ugd_ops operators, built and run by CMake/ctest (see CMakeLists.txt).
//
// The ops are called the way a C++ user of the library calls them: through the dispatcher, by
// schema name, with the library linked (not dlopen'ed) so that its static TORCH_LIBRARY
// registrations run at load time. The results are compared with naive references written here.
//
//   test_ops            run every test
//   test_ops NAME...    run the named tests (ctest runs one per process)
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/util/Exception.h>
#include <c10/util/StringUtil.h>

#include <array>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <functional>
#include <limits>
#include <optional>
#include <string>
#include <string_view>
#include <tuple>
#include <utility>
#include <vector>

#include "test_harness.h"

namespace {

constexpr double kInf = std::numeric_limits<double>::infinity();

// Element-wise |actual - expected| <= atol + rtol * |expected|; equal infinities match.
void expect_close(const at::Tensor& actual_in, const at::Tensor& expected_in, double atol, double rtol,
                  const std::string& what) {
  EXPECT(actual_in.sizes() == expected_in.sizes(), what, ": shape ", actual_in.sizes(), " != expected ",
         expected_in.sizes());
  if (actual_in.sizes() != expected_in.sizes()) return;
  const at::Tensor a = actual_in.to(at::kDouble).contiguous(), e = expected_in.to(at::kDouble).contiguous();
  const double* pa = a.data_ptr<double>();
  const double* pe = e.data_ptr<double>();
  int64_t bad = 0, first_bad = -1;
  double worst = 0;
  for (int64_t i = 0; i < a.numel(); ++i) {
    bool ok;
    if (std::isinf(pe[i]) || std::isinf(pa[i])) {
      ok = pa[i] == pe[i];
    } else {
      const double err = std::abs(pa[i] - pe[i]);
      ok = err <= atol + rtol * std::abs(pe[i]);  // false for NaN
      worst = std::max(worst, err);
    }
    if (!ok && bad++ == 0) first_bad = i;
  }
  EXPECT(bad == 0, what, ": ", bad, " of ", a.numel(), " elements differ (atol ", atol, ", rtol ", rtol,
         "); first at flat index ", first_bad, ": got ", first_bad >= 0 ? pa[first_bad] : 0.0, ", expected ",
         first_bad >= 0 ? pe[first_bad] : 0.0, "; largest finite error ", worst);
}

// ---------------------------------------------------------------------------------------------
// The operators, through the dispatcher. The C++ signatures are those of the registered kernels.
// ---------------------------------------------------------------------------------------------
using Tensor = at::Tensor;
using FwdFn = std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                                         const Tensor&, std::optional<int64_t>, double);
using BwdFn = std::tuple<Tensor, Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                                                 const Tensor&, const Tensor&, const std::optional<Tensor>&,
                                                 const Tensor&, const Tensor&, const Tensor&,
                                                 std::optional<int64_t>, double);
using KlFn = std::tuple<Tensor, Tensor, Tensor>(const Tensor&, const Tensor&, double, bool, bool);
using RowIntervalsFn = std::tuple<Tensor, Tensor, Tensor>(const Tensor&, c10::string_view);
using DenseMaskFn = Tensor(const Tensor&, const Tensor&, const Tensor&);
using BuildInfoFn = std::string();

template <typename Fn>
c10::TypedOperatorHandle<Fn> op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Fn>();
}

std::tuple<Tensor, Tensor> attention_fwd(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& cu,
                                         const Tensor& ks, const Tensor& ke, std::optional<int64_t> max_seqlen,
                                         double scale) {
  static const auto handle = op<FwdFn>("ugd_ops::partitioned_attention_fwd");
  return handle.call(q, k, v, cu, ks, ke, max_seqlen, scale);
}

std::tuple<Tensor, Tensor, Tensor> attention_bwd(const Tensor& dout, const Tensor& q, const Tensor& k,
                                                 const Tensor& v, const Tensor& out, const Tensor& lse,
                                                 const std::optional<Tensor>& dlse, const Tensor& cu,
                                                 const Tensor& ks, const Tensor& ke, double scale) {
  static const auto handle = op<BwdFn>("ugd_ops::partitioned_attention_bwd");
  return handle.call(dout, q, k, v, out, lse, dlse, cu, ks, ke, std::nullopt, scale);
}

std::tuple<Tensor, Tensor, Tensor> detached_kl_fwd(const Tensor& p, const Tensor& q, double temperature,
                                                   bool grad_p, bool grad_q) {
  static const auto handle = op<KlFn>("ugd_ops::detached_kl_fwd");
  return handle.call(p, q, temperature, grad_p, grad_q);
}

using Spans = std::vector<std::array<int32_t, 4>>;

struct Layout {
  Tensor cu, ks, ke;
  int64_t T() const { return ks.size(0); }
};

Layout row_intervals(const Spans& spans, const std::string& mask) {
  static const auto handle = op<RowIntervalsFn>("ugd_ops::row_intervals");
  Tensor s = at::empty({static_cast<int64_t>(spans.size()), 4}, at::kInt);
  int32_t* ps = s.data_ptr<int32_t>();
  for (size_t b = 0; b < spans.size(); ++b)
    for (int x = 0; x < 4; ++x) ps[4 * b + x] = spans[b][x];
  auto [cu, ks, ke] = handle.call(s, mask);
  return {cu, ks, ke};
}

// ---------------------------------------------------------------------------------------------
// Naive references, in float64.
// ---------------------------------------------------------------------------------------------

// Loops over rows: row i of sequence b attends to keys [cu[b] + kv_start[i], cu[b] + kv_end[i]) of
// kv head h / (Hq / Hkv) with a softmax over that interval. Empty interval: out 0, lse -inf.
std::pair<Tensor, Tensor> reference_fwd(const Tensor& q_in, const Tensor& k_in, const Tensor& v_in,
                                        const Layout& layout, double scale) {
  const Tensor q = q_in.to(at::kDouble).contiguous(), k = k_in.to(at::kDouble).contiguous(),
               v = v_in.to(at::kDouble).contiguous();
  const int64_t T = q.size(0), Hq = q.size(1), D = q.size(2), group = Hq / k.size(1);
  const auto Q = q.accessor<double, 3>(), K = k.accessor<double, 3>(), V = v.accessor<double, 3>();
  const auto cu = layout.cu.accessor<int32_t, 1>(), ks = layout.ks.accessor<int32_t, 1>(),
             ke = layout.ke.accessor<int32_t, 1>();
  Tensor out = at::zeros({T, Hq, D}, at::kDouble);
  Tensor lse = at::full({Hq, T}, -kInf, at::kDouble);
  auto O = out.accessor<double, 3>();
  auto LSE = lse.accessor<double, 2>();
  for (int64_t b = 0; b + 1 < cu.size(0); ++b) {
    for (int64_t i = cu[b]; i < cu[b + 1]; ++i) {
      const int64_t lo = cu[b] + ks[i], hi = cu[b] + ke[i];
      if (lo >= hi) continue;
      for (int64_t h = 0; h < Hq; ++h) {
        const int64_t g = h / group;
        std::vector<double> s(hi - lo);
        double m = -kInf;
        for (int64_t j = lo; j < hi; ++j) {
          double dot = 0;
          for (int64_t x = 0; x < D; ++x) dot += Q[i][h][x] * K[j][g][x];
          s[j - lo] = scale * dot;
          m = std::max(m, s[j - lo]);
        }
        double sum = 0;
        for (double sj : s) sum += std::exp(sj - m);
        const double l = m + std::log(sum);
        LSE[h][i] = l;
        for (int64_t j = lo; j < hi; ++j) {
          const double p = std::exp(s[j - lo] - l);
          for (int64_t x = 0; x < D; ++x) O[i][h][x] += p * V[j][g][x];
        }
      }
    }
  }
  return {out, lse};
}

// Per row r: KL(softmax(p_r / t) || softmax(q_r / t)) = sum_c P_c (log P_c - log Q_c).
Tensor reference_kl(const Tensor& p_in, const Tensor& q_in, double t) {
  const int64_t C = p_in.size(-1);
  const Tensor p = p_in.to(at::kDouble).reshape({-1, C}), q = q_in.to(at::kDouble).reshape({-1, C});
  const auto P = p.accessor<double, 2>(), Q = q.accessor<double, 2>();
  Tensor loss = at::empty({p.size(0)}, at::kDouble);
  auto L = loss.accessor<double, 1>();
  for (int64_t r = 0; r < p.size(0); ++r) {
    std::vector<double> lp(C), lq(C);
    double mp = -kInf, mq = -kInf, sp = 0, sq = 0;
    for (int64_t c = 0; c < C; ++c) {
      mp = std::max(mp, P[r][c] / t);
      mq = std::max(mq, Q[r][c] / t);
    }
    for (int64_t c = 0; c < C; ++c) {
      sp += std::exp(P[r][c] / t - mp);
      sq += std::exp(Q[r][c] / t - mq);
    }
    double kl = 0;
    for (int64_t c = 0; c < C; ++c) {
      const double log_p = P[r][c] / t - mp - std::log(sp), log_q = Q[r][c] / t - mq - std::log(sq);
      kl += std::exp(log_p) * (log_p - log_q);
    }
    L[r] = kl;
  }
  return loss.reshape(p_in.sizes().slice(0, p_in.dim() - 1));
}

// Central finite differences of f at x, element by element (x is float64).
Tensor finite_differences(const std::function<double(const Tensor&)>& f, const Tensor& x, double eps) {
  Tensor xc = x.clone().contiguous();
  Tensor grad = at::empty_like(xc);
  double* px = xc.data_ptr<double>();
  double* pg = grad.data_ptr<double>();
  for (int64_t i = 0; i < xc.numel(); ++i) {
    const double x0 = px[i];
    px[i] = x0 + eps;
    const double fp = f(xc);
    px[i] = x0 - eps;
    const double fm = f(xc);
    px[i] = x0;
    pg[i] = (fp - fm) / (2 * eps);
  }
  return grad;
}

template <typename Fn>
void expect_value_error(Fn&& fn, const std::string& substring, const std::string& what) {
  try {
    fn();
    EXPECT(false, what, ": no exception was thrown");
  } catch (const c10::ValueError& e) {
    const std::string msg = e.what_without_backtrace();
    EXPECT(msg.find(substring) != std::string::npos, what, ": the message does not mention '", substring,
           "': ", msg);
  } catch (const c10::Error& e) {
    EXPECT(false, what, ": threw a c10::Error that is not a c10::ValueError: ", e.what_without_backtrace());
  }
}

// ---------------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------------
const Spans kSpans = {{3, 5, 2, 4}, {1, 1, 0, 0}, {17, 9, 8, 3}};

void test_registration() {
  auto& d = c10::Dispatcher::singleton();
  for (const char* name : {"ugd_ops::partitioned_attention_fwd", "ugd_ops::partitioned_attention_bwd",
                           "ugd_ops::detached_kl_fwd", "ugd_ops::row_intervals", "ugd_ops::dense_mask"}) {
    const auto handle = d.findSchemaOrThrow(name, "");
    EXPECT(handle.hasKernelForDispatchKey(c10::DispatchKey::CPU), name, " has no CPU kernel");
  }
  const std::string info = op<BuildInfoFn>("ugd_ops::build_info").call();
  std::printf("build_info: %s\n", info.c_str());
  EXPECT(info.find("\"cpu\": {") != std::string::npos, "build_info has no cpu section: ", info);
  EXPECT(info.find("partitioned_attention_fwd") != std::string::npos, "build_info: ", info);

  // row_intervals and dense_mask on the spans used below (ttm: docs/spec.md section 3).
  const Layout l = row_intervals(kSpans, "ttm");
  EXPECT(l.T() == 14 + 2 + 37, "T = ", l.T());
  const auto cu = l.cu.accessor<int32_t, 1>();
  EXPECT(cu.size(0) == 4 && cu[0] == 0 && cu[1] == 14 && cu[2] == 16 && cu[3] == 53, "cu_seqlens ", l.cu);
  const auto ks = l.ks.accessor<int32_t, 1>(), ke = l.ke.accessor<int32_t, 1>();
  // sequence 0 (Lq, Ld, Lp, Lg) = (3, 5, 2, 4): Q rows [0, 3), D rows [3, 8), P rows [0, 10), G causal.
  const int32_t want_lo[14] = {0, 0, 0, 3, 3, 3, 3, 3, 0, 0, 0, 0, 0, 0};
  const int32_t want_hi[14] = {3, 3, 3, 8, 8, 8, 8, 8, 10, 10, 11, 12, 13, 14};
  for (int i = 0; i < 14; ++i)
    EXPECT(ks[i] == want_lo[i] && ke[i] == want_hi[i], "ttm row ", i, ": [", ks[i], ", ", ke[i], "), expected [",
           want_lo[i], ", ", want_hi[i], ")");
  const Tensor mask = op<DenseMaskFn>("ugd_ops::dense_mask").call(l.cu, l.ks, l.ke);
  EXPECT(mask.scalar_type() == at::kBool && mask.size(0) == 53 && mask.size(1) == 53, "dense_mask ", mask.sizes());
  EXPECT(mask.sum().item<int64_t>() == (l.ke - l.ks).sum().item<int64_t>(), "dense_mask count");
}

// partitioned_attention_fwd, float32, against reference_fwd within 1e-5.
void check_fwd(const Spans& spans, const std::string& mask, int64_t Hq, int64_t Hkv, int64_t D,
               bool strided, std::optional<int64_t> max_seqlen) {
  const std::string what = c10::str("fwd ", mask, " Hq=", Hq, " Hkv=", Hkv, " D=", D);
  const Layout l = row_intervals(spans, mask);
  const int64_t T = l.T();
  Tensor q = at::randn({T, Hq, D}, at::kFloat), k = at::randn({T, Hkv, D}, at::kFloat),
         v = at::randn({T, Hkv, D}, at::kFloat);
  if (strided) {  // q as a view with a head stride of 2 * D, k and v with a token stride of 3 * Hkv * D
    q = at::randn({T, 2 * Hq, D}, at::kFloat).slice(1, 0, 2 * Hq, 2);
    k = at::randn({T, 3 * Hkv, D}, at::kFloat).slice(1, 0, Hkv);
    v = at::randn({T, 3 * Hkv, D}, at::kFloat).slice(1, Hkv, 2 * Hkv);
  }
  const double scale = 1.0 / std::sqrt(static_cast<double>(D));
  const auto [out, lse] = attention_fwd(q, k, v, l.cu, l.ks, l.ke, max_seqlen, scale);
  EXPECT(out.scalar_type() == at::kFloat && lse.scalar_type() == at::kFloat, what, ": dtypes ", out.scalar_type(),
         " ", lse.scalar_type());
  EXPECT(lse.dim() == 2 && lse.size(0) == Hq && lse.size(1) == T, what, ": lse shape ", lse.sizes());
  const auto [ref_out, ref_lse] = reference_fwd(q, k, v, l, scale);
  expect_close(out, ref_out, 1e-5, 0, what + " out");
  expect_close(lse, ref_lse, 1e-5, 0, what + " lse");
}

void test_fwd_ttm() {
  at::manual_seed(1);
  check_fwd(kSpans, "ttm", 4, 2, 16, false, std::nullopt);
}

void test_fwd_stm() {
  at::manual_seed(2);
  check_fwd(kSpans, "stm", 4, 2, 16, false, std::nullopt);
}

void test_fwd_causal() {
  at::manual_seed(3);
  check_fwd(kSpans, "causal", 4, 2, 16, false, std::nullopt);
}

void test_fwd_bidirectional() {
  at::manual_seed(4);
  check_fwd(kSpans, "bidirectional", 4, 4, 16, false, std::nullopt);
}

// Sequences longer than a key tile (64) and a query tile (32), strided inputs, max_seqlen given.
void test_fwd_long() {
  at::manual_seed(5);
  const Spans spans = {{40, 30, 10, 5}, {2, 3, 70, 12}, {1, 1, 1, 1}};
  check_fwd(spans, "ttm", 4, 2, 16, true, 87);
  check_fwd(spans, "causal", 6, 3, 24, true, std::nullopt);
  check_fwd(spans, "stm", 2, 1, 80, false, 100);
}

// Rows whose interval is empty give out 0 and lse -inf; the other rows are unaffected.
void test_fwd_empty_rows() {
  at::manual_seed(6);
  Layout l = row_intervals(kSpans, "ttm");
  l.ks = l.ks.clone();
  l.ke = l.ke.clone();
  const int64_t T = l.T(), Hq = 4, Hkv = 2, D = 16;
  // Row 0, row 5 ([5, 5)), both rows of sequence 1 (a query tile with no key at all), rows 20 and 52.
  const std::vector<int64_t> empty_rows = {0, 5, 14, 15, 20, 52};
  auto ks = l.ks.accessor<int32_t, 1>(), ke = l.ke.accessor<int32_t, 1>();
  for (int64_t i : empty_rows) ke[i] = ks[i];
  ks[5] = 5;
  ke[5] = 5;
  const Tensor q = at::randn({T, Hq, D}), k = at::randn({T, Hkv, D}), v = at::randn({T, Hkv, D});
  const auto [out, lse] = attention_fwd(q, k, v, l.cu, l.ks, l.ke, std::nullopt, 0.25);
  const auto [ref_out, ref_lse] = reference_fwd(q, k, v, l, 0.25);
  expect_close(out, ref_out, 1e-5, 0, "fwd empty rows: out");
  expect_close(lse, ref_lse, 1e-5, 0, "fwd empty rows: lse");
  for (int64_t i : empty_rows) {
    EXPECT(out[i].abs().max().item<float>() == 0.0f, "row ", i, " has an empty interval but out = ", out[i]);
    for (int64_t h = 0; h < Hq; ++h) {
      const float x = lse[h][i].item<float>();
      EXPECT(std::isinf(x) && x < 0, "row ", i, " head ", h, " has an empty interval but lse = ", x);
    }
  }
}

// partitioned_attention_bwd, float64, against central finite differences of
//   loss = sum(out * W) + sum over rows with a key of (lse * Wl)
// so dout = W and dlse = Wl. A row with an empty interval is in the layout; its dlse is non-zero
// and must reach no input.
void check_bwd(bool with_dlse) {
  at::manual_seed(with_dlse ? 7 : 8);
  Layout l = row_intervals({{2, 2, 1, 2}, {1, 1, 1, 0}}, "ttm");
  l.ks = l.ks.clone();
  l.ke = l.ke.clone();
  const int64_t empty_row = 8;
  l.ke.accessor<int32_t, 1>()[empty_row] = l.ks.accessor<int32_t, 1>()[empty_row];
  const int64_t T = l.T(), Hq = 2, Hkv = 1, D = 4;
  const double scale = 0.7;
  const auto f64 = at::TensorOptions().dtype(at::kDouble);
  const Tensor q = at::randn({T, Hq, D}, f64), k = at::randn({T, Hkv, D}, f64), v = at::randn({T, Hkv, D}, f64);
  const Tensor W = at::randn({T, Hq, D}, f64), Wl = at::randn({Hq, T}, f64);
  Tensor lse_mask = at::ones({Hq, T}, f64);
  lse_mask.select(1, empty_row).zero_();

  auto loss = [&](const Tensor& qq, const Tensor& kk, const Tensor& vv) {
    const auto [out, lse] = attention_fwd(qq, kk, vv, l.cu, l.ks, l.ke, std::nullopt, scale);
    double s = (out * W).sum().item<double>();
    if (with_dlse) s += (at::where(lse_mask > 0, lse, at::zeros_like(lse)) * Wl).sum().item<double>();
    return s;
  };
  const auto [out, lse] = attention_fwd(q, k, v, l.cu, l.ks, l.ke, std::nullopt, scale);
  const std::optional<Tensor> dlse = with_dlse ? std::optional<Tensor>(Wl) : std::nullopt;
  const auto [dq, dk, dv] = attention_bwd(W, q, k, v, out, lse, dlse, l.cu, l.ks, l.ke, scale);
  EXPECT(dq.scalar_type() == at::kDouble && dk.sizes() == k.sizes() && dv.sizes() == v.sizes(), "bwd outputs");

  const double eps = 1e-6;
  const Tensor fd_q = finite_differences([&](const Tensor& x) { return loss(x, k, v); }, q, eps);
  const Tensor fd_k = finite_differences([&](const Tensor& x) { return loss(q, x, v); }, k, eps);
  const Tensor fd_v = finite_differences([&](const Tensor& x) { return loss(q, k, x); }, v, eps);
  const std::string what = with_dlse ? "bwd (with dlse)" : "bwd (dlse = None)";
  expect_close(dq, fd_q, 1e-7, 1e-6, what + " dq");
  expect_close(dk, fd_k, 1e-7, 1e-6, what + " dk");
  expect_close(dv, fd_v, 1e-7, 1e-6, what + " dv");
  EXPECT(dq[empty_row].abs().max().item<double>() == 0.0, what, ": the empty row has dq ", dq[empty_row]);
}

void test_bwd() { check_bwd(true); }
void test_bwd_no_dlse() { check_bwd(false); }

// detached_kl_fwd: the loss against reference_kl; the gradients against finite differences of the
// summed loss (in float64); gradients not asked for are empty.
void test_detached_kl() {
  at::manual_seed(9);
  const double t = 1.7;
  // float32, 2-D, logits of a few units and one row shifted by 20 (softmax is shift invariant).
  // Larger shifts would make the test measure float32 rounding of the inputs: the kernel computes
  // in float32 for float32 inputs, and at |x / T| ~ 600 one ulp is already 6e-5.
  Tensor p = at::randn({6, 11}) * 3, q = at::randn({6, 11}) * 3;
  p.select(0, 2).add_(20);
  q.select(0, 2).sub_(20);
  {
    const auto [loss, gp, gq] = detached_kl_fwd(p, q, t, false, false);
    EXPECT(loss.scalar_type() == at::kFloat && loss.dim() == 1 && loss.size(0) == 6, "loss ", loss.sizes());
    EXPECT(gp.numel() == 0 && gq.numel() == 0, "gradients not asked for: ", gp.sizes(), " ", gq.sizes());
    expect_close(loss, reference_kl(p, q, t), 1e-5, 0, "detached_kl float32 loss");
  }
  // float32, 3-D, with gradients.
  {
    const Tensor p3 = at::randn({2, 3, 7}), q3 = at::randn({2, 3, 7});
    const auto [loss, gp, gq] = detached_kl_fwd(p3, q3, 1.0, true, true);
    EXPECT(loss.sizes() == at::IntArrayRef({2, 3}), "loss shape ", loss.sizes());
    EXPECT(gp.sizes() == p3.sizes() && gq.sizes() == q3.sizes(), "gradient shapes");
    expect_close(loss, reference_kl(p3, q3, 1.0), 1e-5, 0, "detached_kl float32 3-D loss");
  }
  // float64 gradients against finite differences.
  {
    const Tensor pd = at::randn({4, 5}, at::kDouble), qd = at::randn({4, 5}, at::kDouble);
    const auto [loss, gp, gq] = detached_kl_fwd(pd, qd, t, true, true);
    expect_close(loss, reference_kl(pd, qd, t), 1e-12, 0, "detached_kl float64 loss");
    auto total = [&](const Tensor& a, const Tensor& b) {
      return std::get<0>(detached_kl_fwd(a, b, t, false, false)).sum().item<double>();
    };
    const Tensor fd_p = finite_differences([&](const Tensor& x) { return total(x, qd); }, pd, 1e-6);
    const Tensor fd_q = finite_differences([&](const Tensor& x) { return total(pd, x); }, qd, 1e-6);
    expect_close(gp, fd_p, 1e-8, 1e-6, "detached_kl grad_p");
    expect_close(gq, fd_q, 1e-8, 1e-6, "detached_kl grad_q");
  }
}

// Invalid arguments raise c10::ValueError (Python: ValueError).
void test_invalid_args() {
  at::manual_seed(10);
  const Layout l = row_intervals(kSpans, "ttm");
  const int64_t T = l.T();
  const Tensor q = at::randn({T, 4, 16}), k = at::randn({T, 2, 16}), v = at::randn({T, 2, 16});

  Tensor ke_beyond = l.ke.clone();
  ke_beyond.accessor<int32_t, 1>()[20] = 38;  // row 20 lies in sequence 2, of length 37
  expect_value_error([&] { attention_fwd(q, k, v, l.cu, l.ks, ke_beyond, std::nullopt, 0.25); }, "outside",
                     "kv_end beyond the sequence (fwd)");
  expect_value_error(
      [&] {
        const auto [out, lse] = attention_fwd(q, k, v, l.cu, l.ks, l.ke, std::nullopt, 0.25);
        attention_bwd(out, q, k, v, out, lse, std::nullopt, l.cu, l.ks, ke_beyond, 0.25);
      },
      "outside", "kv_end beyond the sequence (bwd)");

  Tensor ks_after_end = l.ks.clone();
  ks_after_end.accessor<int32_t, 1>()[3] = l.ke.accessor<int32_t, 1>()[3] + 1;
  expect_value_error([&] { attention_fwd(q, k, v, l.cu, ks_after_end, l.ke, std::nullopt, 0.25); }, "kv_start",
                     "kv_start > kv_end");
  expect_value_error([&] { attention_fwd(q, k, v, l.cu, l.ks, l.ke, 36, 0.25); }, "max_seqlen",
                     "max_seqlen below the longest sequence");
  expect_value_error([&] { attention_fwd(q, at::randn({T, 3, 16}), at::randn({T, 3, 16}), l.cu, l.ks, l.ke,
                                         std::nullopt, 0.25); },
                     "multiple", "Hq not a multiple of Hkv");
  expect_value_error([&] { attention_fwd(q, k, v, l.cu.to(at::kLong), l.ks, l.ke, std::nullopt, 0.25); }, "int32",
                     "int64 cu_seqlens");
  expect_value_error([&] { row_intervals(kSpans, "sideways"); }, "mask", "unknown mask");
  expect_value_error([&] { detached_kl_fwd(at::randn({2, 3}), at::randn({2, 4}), 1.0, false, false); }, "shape",
                     "detached_kl shape mismatch");
  expect_value_error([&] { detached_kl_fwd(at::randn({2, 3}), at::randn({2, 3}), 0.0, false, false); },
                     "temperature", "detached_kl temperature 0");
}

const std::vector<ugd_ops_tests::TestCase> kTests = {
    {"registration", test_registration},
    {"fwd_ttm", test_fwd_ttm},
    {"fwd_stm", test_fwd_stm},
    {"fwd_causal", test_fwd_causal},
    {"fwd_bidirectional", test_fwd_bidirectional},
    {"fwd_long", test_fwd_long},
    {"fwd_empty_rows", test_fwd_empty_rows},
    {"bwd", test_bwd},
    {"bwd_no_dlse", test_bwd_no_dlse},
    {"detached_kl", test_detached_kl},
    {"invalid_args", test_invalid_args},
};

}  // namespace

int main(int argc, char** argv) { return ugd_ops_tests::run_tests(argc, argv, kTests); }
