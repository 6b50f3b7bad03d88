// The local passes of the exact global-batch filter loss across processes (docs/method.md §2, docs/distributed.md),
// fused: one rank's share of the work between the all-reduces of fastexplain/distributed.py.
//
// Per filter c (at::parallel_for over filters), on this rank's B images, with x̄ the *global* batch mean
// (all-reduced by the caller), T the HW+1 templates, p_t their priors and N the global batch size:
//
//   map_sums      Σ_b x_b [C, HW] and the numbers of non-finite and negative elements (one read of x).
//   logits        s[c, t, b] = Σ_i (x_b(i) − x̄(i))·T_t(i) by the L1-pyramid correlation of kernel_math.h
//                 (no [HW+1, HW] template product); returns s and max_b s [C, T].
//   expm1_sums    w[c, t, b] = expm1(s − shift_t); returns w and Σ_b w [C, T].
//   entropy_sums  given M_t = (Σ over all ranks of Σ_b w) / N, so that lme_t = shift_t + log1p(M_t):
//                 in place u = s − lme = log(N·q) and w ← expm1(u) = (w − M)/(1 + M) (no second exp);
//                 v_b = log Σ_t p_t e^u = log(N·P_b); returns (Σ_t p_t Σ_b f(u), Σ_b f(v), v),
//                 f(u) = u·e^u − expm1(u) (kernel_math.h's entropy_term).
//   backward_sums Σ_b e^u (u − v) = Σ_b (1 + w)(u − v) [C, T].
//   input_grad    dx_b(i) = Σ_t ds[b, t]·T_t(i), ds = −grad_c·p_t e^u (u − v − W_t/N)/N with W the
//                 all-reduced backward sums; the template product is the same pyramid correlation.
//
// s/u and w are stored template-major with the batch innermost ([C, T, B], the single-process kernel's
// workspace layout): two tensors of this rank's B·C·(HW+1) values in the compute dtype (float32, float64
// for float64 inputs). One expm1 per (image, template) in the whole forward + backward; the pyramid
// correlation runs twice (logits, input gradient), as in the single-process fused op.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <type_traits>
#include <vector>

#include "kernel_math.h"

namespace fastexplain {
namespace {

struct LocalGeometry {
  int64_t B, C, H, W, HW, T;
  double tau, kappa, prior_negative, prior_positive;
  LocalGeometry(int64_t B_, int64_t C_, int64_t H_, int64_t W_, double beta)
      : B(B_), C(C_), H(H_), W(W_), HW(H_ * W_), T(H_ * W_ + 1), tau(0.5 / static_cast<double>(H_ * W_)),
        kappa(beta / static_cast<double>(std::max(H_, W_))),
        prior_negative(1.0 - static_cast<double>(H_ * W_) / (1.0 + static_cast<double>(H_ * W_))),
        prior_positive(1.0 / (1.0 + static_cast<double>(H_ * W_))) {}
  double prior(int64_t t) const { return t == 0 ? prior_negative : prior_positive; }
};

void check_state(const at::Tensor& t, const char* name, at::ScalarType dtype, at::IntArrayRef sizes) {
  TORCH_CHECK_VALUE(t.scalar_type() == dtype && t.is_contiguous() && t.sizes() == sizes && t.device().is_cpu(),
                    "filter_loss (distributed local pass): ", name, " must be a contiguous CPU ", dtype,
                    " tensor of shape ", sizes, ", got ", t.scalar_type(), " ", t.sizes(),
                    "; pass the tensors of the previous local pass unchanged");
}

at::ScalarType compute_type(const at::Tensor& x) {
  return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// -------------------------------------------------------------------------------------------- map sums
// Σ_b x_b [C, HW] in the compute dtype and the numbers of non-finite and of negative elements, in one read.
template <typename scalar_t>
std::tuple<at::Tensor, at::Tensor> map_sums_typed(const at::Tensor& x) {
  using F = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
  const int64_t B = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3), HW = H * W;
  at::Tensor sums = at::empty({C, HW}, x.options().dtype(c10::CppTypeToScalarType<F>::value));
  std::vector<int64_t> nonfinite(C, 0), negative(C, 0);
  const scalar_t* x_data = x.const_data_ptr<scalar_t>();
  F* sum_data = sums.data_ptr<F>();
  const int64_t sB = x.stride(0), sC = x.stride(1), sH = x.stride(2), sW = x.stride(3);
  const bool dense = (W == 1 || sW == 1) && (H == 1 || sH == W);
  at::parallel_for(0, C, 1, [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) {
      F* __restrict total = sum_data + c * HW;
      std::fill(total, total + HW, F(0));
      int64_t bad = 0, below = 0;
      for (int64_t b = 0; b < B; ++b) {
        const scalar_t* image = x_data + b * sB + c * sC;
        if (dense) {
          for (int64_t i = 0; i < HW; ++i) {
            const F v = static_cast<F>(image[i]);
            total[i] += v;
            bad += (v - v != F(0)) ? 1 : 0;  // NaN or ±Inf
            below += v < F(0) ? 1 : 0;
          }
        } else {
          for (int64_t h = 0; h < H; ++h)
            for (int64_t w = 0; w < W; ++w) {
              const F v = static_cast<F>(image[h * sH + w * sW]);
              total[h * W + w] += v;
              bad += (v - v != F(0)) ? 1 : 0;
              below += v < F(0) ? 1 : 0;
            }
        }
      }
      nonfinite[c] = bad;
      negative[c] = below;
    }
  });
  int64_t bad = 0, below = 0;
  for (int64_t c = 0; c < C; ++c) {
    bad += nonfinite[c];
    below += negative[c];
  }
  return {sums, at::tensor({bad, below}, at::kLong)};
}

std::tuple<at::Tensor, at::Tensor> local_map_sums(const at::Tensor& x) {
  TORCH_CHECK_VALUE(x.dim() == 4 && x.numel() > 0 && x.is_floating_point() && x.device().is_cpu(),
                    "filter_loss (distributed local pass): expected a non-empty floating-point CPU tensor "
                    "[B, C, H, W], got ", x.scalar_type(), " ", x.sizes());
  return AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "filter_loss_local_map_sums",
                                         [&] { return map_sums_typed<scalar_t>(x); });
}

// ---------------------------------------------------------------------------------------------- logits
template <typename scalar_t>
std::tuple<at::Tensor, at::Tensor> logits_typed(const at::Tensor& x, const at::Tensor& mean_maps, double beta) {
  using F = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
  const LocalGeometry g(x.size(0), x.size(1), x.size(2), x.size(3), beta);
  const auto options = x.options().dtype(c10::CppTypeToScalarType<F>::value);
  check_state(mean_maps, "mean_maps", c10::CppTypeToScalarType<F>::value, {g.C, g.HW});
  at::Tensor s = at::empty({g.C, g.T, g.B}, options);
  at::Tensor maxima = at::empty({g.C, g.T}, options);
  const PyramidPlan plan(g.H, g.W, beta, 0);
  const scalar_t* x_data = x.const_data_ptr<scalar_t>();
  const F* mean_data = mean_maps.const_data_ptr<F>();
  F* s_data = s.data_ptr<F>();
  F* max_data = maxima.data_ptr<F>();
  const int64_t sB = x.stride(0), sC = x.stride(1), sH = x.stride(2), sW = x.stride(3);
  at::parallel_for(0, g.C, 1, [&](int64_t begin, int64_t end) {
    std::vector<F> maps(g.HW * g.B), pyramid(g.HW * g.B), totals(g.B);
    PyramidCorrelator<F> correlate(plan, g.B);
    for (int64_t c = begin; c < end; ++c) {
      const F* mean = mean_data + c * g.HW;
      // maps[i][b] = x_b(i) − x̄(i), position-major (the batch innermost) for the correlation
      for (int64_t b = 0; b < g.B; ++b) {
        const scalar_t* image = x_data + b * sB + c * sC;
        for (int64_t h = 0; h < g.H; ++h)
          for (int64_t w = 0; w < g.W; ++w) {
            const int64_t i = h * g.W + w;
            maps[i * g.B + b] = static_cast<F>(image[h * sH + w * sW]) - mean[i];
          }
      }
      std::fill(totals.begin(), totals.end(), F(0));
      for (int64_t i = 0; i < g.HW; ++i) {
        const F* __restrict column = maps.data() + i * g.B;
        F* __restrict total = totals.data();
        for (int64_t b = 0; b < g.B; ++b) total[b] += column[b];
      }
      correlate(maps.data(), pyramid.data(), g.B);
      const F tau = static_cast<F>(g.tau), tau_kappa = static_cast<F>(g.tau * g.kappa);
      F* out = s_data + c * g.T * g.B;
      F* best = max_data + c * g.T;
      for (int64_t t = 0; t < g.T; ++t) {
        F* __restrict row = out + t * g.B;
        const F* __restrict total = totals.data();
        F largest = -INFINITY;
        if (t == 0) {
          for (int64_t b = 0; b < g.B; ++b) row[b] = -tau * total[b];
        } else {
          const F* __restrict p = pyramid.data() + (t - 1) * g.B;
          for (int64_t b = 0; b < g.B; ++b) row[b] = tau_kappa * p[b] - tau * total[b];
        }
#pragma omp simd reduction(max : largest)
        for (int64_t b = 0; b < g.B; ++b) largest = std::max(largest, row[b]);
        best[t] = largest;
      }
    }
  });
  return {s, maxima};
}

std::tuple<at::Tensor, at::Tensor> local_logits(const at::Tensor& x, const at::Tensor& mean_maps, double beta) {
  TORCH_CHECK_VALUE(x.dim() == 4 && x.numel() > 0 && x.is_floating_point() && x.device().is_cpu(),
                    "filter_loss (distributed local pass): expected a non-empty floating-point CPU tensor "
                    "[B, C, H, W], got ", x.scalar_type(), " ", x.sizes());
  TORCH_CHECK_VALUE(beta > 0 && std::isfinite(beta), "filter_loss: beta must be a finite positive number, got ", beta);
  return AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "filter_loss_local_logits",
                                         [&] { return logits_typed<scalar_t>(x, mean_maps, beta); });
}

// -------------------------------------------------------------------------------------------- expm1 sums
template <typename F>
std::tuple<at::Tensor, at::Tensor> expm1_sums_typed(const at::Tensor& s, const at::Tensor& shift) {
  const int64_t C = s.size(0), T = s.size(1), B = s.size(2);
  check_state(shift, "shift", s.scalar_type(), {C, T});
  at::Tensor w = at::empty_like(s);
  at::Tensor sums = at::empty({C, T}, s.options());
  const F* s_data = s.const_data_ptr<F>();
  const F* shift_data = shift.const_data_ptr<F>();
  F* w_data = w.data_ptr<F>();
  F* sum_data = sums.data_ptr<F>();
  at::parallel_for(0, C * T, 64, [&](int64_t begin, int64_t end) {
    for (int64_t ct = begin; ct < end; ++ct) {
      const F* __restrict row = s_data + ct * B;
      F* __restrict out = w_data + ct * B;
      const F shift_t = shift_data[ct];
      F total = F(0);
#pragma omp simd reduction(+ : total)
      for (int64_t b = 0; b < B; ++b) {
        out[b] = expm1_vec(row[b] - shift_t);
        total += out[b];
      }
      sum_data[ct] = total;
    }
  });
  return {w, sums};
}

std::tuple<at::Tensor, at::Tensor> local_expm1_sums(const at::Tensor& s, const at::Tensor& shift) {
  TORCH_CHECK_VALUE(s.dim() == 3, "filter_loss (distributed local pass): s must be [C, T, B]");
  check_state(s, "s", compute_type(s), s.sizes());
  return AT_DISPATCH_FLOATING_TYPES(s.scalar_type(), "filter_loss_local_expm1_sums",
                                    [&] { return expm1_sums_typed<scalar_t>(s, shift); });
}

// ------------------------------------------------------------------------------------------ entropy sums
template <typename F>
std::tuple<at::Tensor, at::Tensor, at::Tensor> entropy_sums_typed(at::Tensor& s, at::Tensor& w, const at::Tensor& shift,
                                                                   const at::Tensor& mean_expm1, int64_t HW) {
  const int64_t C = s.size(0), T = s.size(1), B = s.size(2);
  TORCH_CHECK_VALUE(T == HW + 1, "filter_loss (distributed local pass): s has ", T, " templates, expected ", HW + 1);
  check_state(w, "w", s.scalar_type(), s.sizes());
  check_state(shift, "shift", s.scalar_type(), {C, T});
  check_state(mean_expm1, "mean_expm1", s.scalar_type(), {C, T});
  const LocalGeometry g(B, C, 1, HW, 1.0);  // only the priors are used
  at::Tensor conditional = at::empty({C}, s.options());
  at::Tensor marginal = at::empty({C}, s.options());
  at::Tensor v = at::empty({C, B}, s.options());
  F* s_data = s.data_ptr<F>();
  F* w_data = w.data_ptr<F>();
  const F* shift_data = shift.const_data_ptr<F>();
  const F* m_data = mean_expm1.const_data_ptr<F>();
  F* cond_data = conditional.data_ptr<F>();
  F* marg_data = marginal.data_ptr<F>();
  F* v_data = v.data_ptr<F>();
  at::parallel_for(0, C, 1, [&](int64_t begin, int64_t end) {
    std::vector<F> mixture(B), max_u(B);
    for (int64_t c = begin; c < end; ++c) {
      F* u_all = s_data + c * T * B;
      F* w_all = w_data + c * T * B;
      std::fill(mixture.begin(), mixture.end(), F(0));
      std::fill(max_u.begin(), max_u.end(), -INFINITY);
      double conditional_c = 0.0;
      for (int64_t t = 0; t < T; ++t) {
        F* __restrict u = u_all + t * B;
        F* __restrict wt = w_all + t * B;
        const F M = m_data[c * T + t];
        const F log_mean = static_cast<F>(std::log1p(M));
        const F inv_norm = F(1) / (F(1) + M);
        const F shift_t = shift_data[c * T + t];
        const F prior = static_cast<F>(g.prior(t));
        F* __restrict mix = mixture.data();
        F* __restrict top = max_u.data();
        F entropy = F(0);
#pragma omp simd reduction(+ : entropy)
        for (int64_t b = 0; b < B; ++b) {
          u[b] = (u[b] - shift_t) - log_mean;  // u = s − lme = log(N·q)
          wt[b] = (wt[b] - M) * inv_norm;      // expm1(u) = (e^{s−shift} − 1 − M) / (1 + M)
          entropy += entropy_term(u[b], wt[b]);
          mix[b] += prior * wt[b];
          top[b] = std::max(top[b], u[b]);
        }
        conditional_c += g.prior(t) * static_cast<double>(entropy);
      }
      // v_b = log1p(Σ_t p_t w), or max_t u + log1p(Σ_t p_t expm1(u − max_t u)) when every template finds
      // image b unlikely (max_t u < −1), as reference.log_mixture
      double marginal_c = 0.0;
      for (int64_t b = 0; b < B; ++b) {
        F vb;
        if (max_u[b] < F(-1)) {
          F shifted = F(0);
          for (int64_t t = 0; t < T; ++t)
            shifted += static_cast<F>(g.prior(t)) * static_cast<F>(std::expm1(u_all[t * B + b] - max_u[b]));
          vb = max_u[b] + static_cast<F>(std::log1p(shifted));
        } else {
          vb = static_cast<F>(std::log1p(mixture[b]));
        }
        v_data[c * B + b] = vb;
        marginal_c += static_cast<double>(entropy_term(vb, static_cast<F>(std::expm1(vb))));
      }
      cond_data[c] = static_cast<F>(conditional_c);
      marg_data[c] = static_cast<F>(marginal_c);
    }
  });
  return {conditional, marginal, v};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> local_entropy_sums(at::Tensor s, at::Tensor w, const at::Tensor& shift,
                                                                  const at::Tensor& mean_expm1, int64_t HW) {
  TORCH_CHECK_VALUE(s.dim() == 3, "filter_loss (distributed local pass): s must be [C, T, B]");
  check_state(s, "s", compute_type(s), s.sizes());
  return AT_DISPATCH_FLOATING_TYPES(s.scalar_type(), "filter_loss_local_entropy_sums",
                                    [&] { return entropy_sums_typed<scalar_t>(s, w, shift, mean_expm1, HW); });
}

// ----------------------------------------------------------------------------------------- backward sums
template <typename F>
at::Tensor backward_sums_typed(const at::Tensor& u, const at::Tensor& w, const at::Tensor& v) {
  const int64_t C = u.size(0), T = u.size(1), B = u.size(2);
  check_state(w, "w", u.scalar_type(), u.sizes());
  check_state(v, "v", u.scalar_type(), {C, B});
  at::Tensor sums = at::empty({C, T}, u.options());
  const F* u_data = u.const_data_ptr<F>();
  const F* w_data = w.const_data_ptr<F>();
  const F* v_data = v.const_data_ptr<F>();
  F* sum_data = sums.data_ptr<F>();
  at::parallel_for(0, C * T, 64, [&](int64_t begin, int64_t end) {
    for (int64_t ct = begin; ct < end; ++ct) {
      const F* __restrict ur = u_data + ct * B;
      const F* __restrict wr = w_data + ct * B;
      const F* __restrict vr = v_data + (ct / T) * B;
      F total = F(0);
#pragma omp simd reduction(+ : total)
      for (int64_t b = 0; b < B; ++b) total += (F(1) + wr[b]) * (ur[b] - vr[b]);
      sum_data[ct] = total;
    }
  });
  return sums;
}

at::Tensor local_backward_sums(const at::Tensor& u, const at::Tensor& w, const at::Tensor& v) {
  TORCH_CHECK_VALUE(u.dim() == 3, "filter_loss (distributed local pass): u must be [C, T, B]");
  check_state(u, "u", compute_type(u), u.sizes());
  return AT_DISPATCH_FLOATING_TYPES(u.scalar_type(), "filter_loss_local_backward_sums",
                                    [&] { return backward_sums_typed<scalar_t>(u, w, v); });
}

// ------------------------------------------------------------------------------------------- input grad
template <typename F>
at::Tensor input_grad_typed(const at::Tensor& u, const at::Tensor& w, const at::Tensor& v, const at::Tensor& sums,
                            const at::Tensor& grad, int64_t n_total, int64_t H, int64_t W, double beta) {
  const int64_t C = u.size(0), T = u.size(1), B = u.size(2);
  TORCH_CHECK_VALUE(T == H * W + 1, "filter_loss (distributed local pass): u has ", T, " templates, expected ",
                    H * W + 1);
  TORCH_CHECK_VALUE(n_total >= B, "filter_loss (distributed local pass): n_total ", n_total, " < local batch ", B);
  check_state(w, "w", u.scalar_type(), u.sizes());
  check_state(v, "v", u.scalar_type(), {C, B});
  check_state(sums, "global_sums", u.scalar_type(), {C, T});
  check_state(grad, "grad", u.scalar_type(), {C});
  const LocalGeometry g(B, C, H, W, beta);
  at::Tensor dx = at::empty({B, C, H, W}, u.options());
  const PyramidPlan plan(H, W, beta, 0);
  const F* u_data = u.const_data_ptr<F>();
  const F* w_data = w.const_data_ptr<F>();
  const F* v_data = v.const_data_ptr<F>();
  const F* sum_data = sums.const_data_ptr<F>();
  const F* grad_data = grad.const_data_ptr<F>();
  F* dx_data = dx.data_ptr<F>();
  const F inv_n = F(1) / static_cast<F>(n_total);
  at::parallel_for(0, C, 1, [&](int64_t begin, int64_t end) {
    std::vector<F> ds(T * B), pyramid(g.HW * B), totals(B);
    PyramidCorrelator<F> correlate(plan, B);
    for (int64_t c = begin; c < end; ++c) {
      const F scale = -grad_data[c] * inv_n;
      const F* v_c = v_data + c * B;
      std::fill(totals.begin(), totals.end(), F(0));
      for (int64_t t = 0; t < T; ++t) {
        const F* __restrict ur = u_data + (c * T + t) * B;
        const F* __restrict wr = w_data + (c * T + t) * B;
        const F centre = sum_data[c * T + t] * inv_n;
        const F factor = scale * static_cast<F>(g.prior(t));
        F* __restrict d = ds.data() + t * B;
        F* __restrict total = totals.data();
        for (int64_t b = 0; b < B; ++b) {
          d[b] = factor * (F(1) + wr[b]) * (ur[b] - v_c[b] - centre);
          total[b] += d[b];
        }
      }
      correlate(ds.data() + B, pyramid.data(), B);  // Σ_μ ds[b, 1+μ]·pyramid(i, μ) (the pyramid is symmetric)
      const F tau = static_cast<F>(g.tau), tau_kappa = static_cast<F>(g.tau * g.kappa);
      for (int64_t b = 0; b < B; ++b) {
        F* __restrict out = dx_data + (b * C + c) * g.HW;
        const F minus = tau * totals[b];
        for (int64_t i = 0; i < g.HW; ++i) out[i] = tau_kappa * pyramid[i * B + b] - minus;
      }
    }
  });
  return dx;
}

at::Tensor local_input_grad(const at::Tensor& u, const at::Tensor& w, const at::Tensor& v, const at::Tensor& sums,
                            const at::Tensor& grad, int64_t n_total, int64_t H, int64_t W, double beta) {
  TORCH_CHECK_VALUE(u.dim() == 3, "filter_loss (distributed local pass): u must be [C, T, B]");
  check_state(u, "u", compute_type(u), u.sizes());
  return AT_DISPATCH_FLOATING_TYPES(u.scalar_type(), "filter_loss_local_input_grad", [&] {
    return input_grad_typed<scalar_t>(u, w, v, sums, grad, n_total, H, W, beta);
  });
}

}  // namespace
}  // namespace fastexplain

TORCH_LIBRARY_FRAGMENT(fastexplain, m) {
  m.def("filter_loss_local_map_sums(Tensor x) -> (Tensor, Tensor)");
  m.def("filter_loss_local_logits(Tensor x, Tensor mean_maps, float beta) -> (Tensor, Tensor)");
  m.def("filter_loss_local_expm1_sums(Tensor s, Tensor shift) -> (Tensor, Tensor)");
  m.def("filter_loss_local_entropy_sums(Tensor(a!) s, Tensor(b!) w, Tensor shift, Tensor mean_expm1, int hw) "
        "-> (Tensor, Tensor, Tensor)");
  m.def("filter_loss_local_backward_sums(Tensor u, Tensor w, Tensor v) -> Tensor");
  m.def("filter_loss_local_input_grad(Tensor u, Tensor w, Tensor v, Tensor global_sums, Tensor grad, int n_total, "
        "int h, int w, float beta) -> Tensor");
}

TORCH_LIBRARY_IMPL(fastexplain, CPU, m) {
  m.impl("filter_loss_local_map_sums", &fastexplain::local_map_sums);
  m.impl("filter_loss_local_logits", &fastexplain::local_logits);
  m.impl("filter_loss_local_expm1_sums", &fastexplain::local_expm1_sums);
  m.impl("filter_loss_local_entropy_sums", &fastexplain::local_entropy_sums);
  m.impl("filter_loss_local_backward_sums", &fastexplain::local_backward_sums);
  m.impl("filter_loss_local_input_grad", &fastexplain::local_input_grad);
}
