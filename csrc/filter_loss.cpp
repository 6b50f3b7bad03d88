// Fused filter loss −MI per filter (SPEC §2) and its exact gradient, without materialising the
// B×C×(HW+1) logits: filters run in parallel (at::parallel_for), each with a thread-local O(B·HW) workspace.
// The numerics follow fastexplain/ops/reference.py: batch-centred maps, centred log-mean-exp,
// u = log(B·q), v = log(B·P), MI = Σ_t p_t mean_b f(u) − mean_b f(v).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <memory>
#include <string>
#include <type_traits>
#include <vector>

#include "filter_loss_forward.h"
#include "filter_loss_gradient.h"
#include "kernel_math.h"

namespace fastexplain {
namespace {

using namespace filter_loss_detail;

const char* kNonfinite =
    "filter_loss: the input contains NaN or Inf; check the layer that produced it (or lower the learning rate)";
const char* kNegative =
    "filter_loss: the input has negative values, but the filter loss is defined on post-ReLU feature maps "
    "(x ≥ 0); apply torch.relu first";

// The loop of the forward drivers: every filter's maps are gathered, centred and checked, a thread-local workspace
// per at::parallel_for chunk. A filter whose logits can exceed kWideLogitBound goes to on_wide(c, double workspace)
// with its maps gathered again in double, the others to on_float(c, workspace). NaN/Inf and negative values
// raise after the loop (NaN first, as in the reference).
template <typename F, typename scalar_t, typename OnFloat, typename OnWide>
void for_each_checked_filter(const scalar_t* x_data, const LossGeometry& g, const PyramidPlan& plan,
                             OnFloat on_float, OnWide on_wide) {
  std::atomic<bool> any_nonfinite{false}, any_negative{false};
  const double wide_bound = wide_logit_bound();
  at::parallel_for(0, g.C, 1, [&](int64_t begin, int64_t end) {
    Workspace<F> ws(g, plan);
    WideFilter wide;
    for (int64_t c = begin; c < end; ++c) {
      bool nonfinite = false, negative = false;
      if (c + 1 < end) prefetch_maps(x_data, g, c + 1);
      gather_centred_maps(x_data, g, c, ws.pyramid.data(), ws.image_rows.data(), ws.maps.data(), true, nonfinite,
                          negative);
      if (nonfinite || negative) {
        if (nonfinite) any_nonfinite = true;
        if (negative) any_negative = true;
        continue;
      }
      if constexpr (!std::is_same_v<F, double>) {
        if (logit_bound(g, ws.maps.data()) > wide_bound) {
          on_wide(c, wide.gather(x_data, g, plan, c, nonfinite, negative));
          continue;
        }
      }
      on_float(c, ws);
    }
  });
  TORCH_CHECK_VALUE(!any_nonfinite.load(), kNonfinite);
  TORCH_CHECK_VALUE(!any_negative.load(), kNegative);
}

template <typename scalar_t>
std::tuple<at::Tensor, at::Tensor, at::Tensor> forward_typed(const at::Tensor& x, double beta) {
  using F = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
  const LossGeometry g(x, beta);
  const auto options = x.options().dtype(c10::CppTypeToScalarType<F>::value);
  at::Tensor loss = at::empty({g.C}, options);
  at::Tensor lme = at::empty({g.C, 2, g.T}, options);
  at::Tensor v = at::empty({g.C, g.B}, options);
  const PyramidPlan plan(g.H, g.W, beta, pyramid_method());
  const scalar_t* x_data = x.const_data_ptr<scalar_t>();
  F* loss_data = loss.data_ptr<F>();
  F* lme_data = lme.data_ptr<F>();
  F* v_data = v.data_ptr<F>();
  for_each_checked_filter<F>(
      x_data, g, plan, [&](int64_t c, Workspace<F>& ws) {
        loss_data[c] = filter_forward(g, ws, lme_data + c * 2 * g.T, v_data + c * g.B);
      },
      [&](int64_t c, Workspace<double>& wide) {
        loss_data[c] = static_cast<F>(filter_forward(g, wide, wide.lme.data(), wide.v.data()));
        // lme_t = centre + log_mean is saved as two floats: the rounded centre, and log_mean plus the centre's
        // rounding residue, so that the backward pass rebuilds u = (s − lme0) − lme1 in double to ~1e-7 of |lme1|.
        for (int64_t t = 0; t < g.T; ++t) {
          const F high = static_cast<F>(wide.lme[t]);
          lme_data[c * 2 * g.T + t] = high;
          lme_data[c * 2 * g.T + g.T + t] =
              static_cast<F>(wide.lme[g.T + t] + (wide.lme[t] - static_cast<double>(high)));
        }
        for (int64_t b = 0; b < g.B; ++b) v_data[c * g.B + b] = static_cast<F>(wide.v[b]);
      });
  return {loss, lme, v};
}

template <typename scalar_t>
at::Tensor backward_typed(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& lme,
                          const at::Tensor& v, double beta) {
  using F = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
  const LossGeometry g(x, beta);
  const auto compute = c10::CppTypeToScalarType<F>::value;
  const at::Tensor grad_c = grad.to(compute).contiguous();
  const at::Tensor lme_c = lme.to(compute).contiguous();
  const at::Tensor v_c = v.to(compute).contiguous();
  at::Tensor dx = at::empty(x.sizes(), x.options().memory_format(at::MemoryFormat::Contiguous));
  const PyramidPlan plan(g.H, g.W, beta, pyramid_method());
  const scalar_t* x_data = x.const_data_ptr<scalar_t>();
  scalar_t* dx_data = dx.data_ptr<scalar_t>();
  const F* grad_data = grad_c.const_data_ptr<F>();
  const F* lme_data = lme_c.const_data_ptr<F>();
  const F* v_data = v_c.const_data_ptr<F>();
  const double wide_bound = wide_logit_bound();
  at::parallel_for(0, g.C, 1, [&](int64_t begin, int64_t end) {
    Workspace<F> ws(g, plan);
    WideFilter wide;  // filters the forward pass computed in double are differentiated in double
    for (int64_t c = begin; c < end; ++c) {
      bool nonfinite = false, negative = false;  // checked by the forward pass
      if (c + 1 < end) prefetch_maps(x_data, g, c + 1);
      gather_centred_maps(x_data, g, c, ws.pyramid.data(), ws.image_rows.data(), ws.maps.data(), false, nonfinite,
                          negative);
      if constexpr (!std::is_same_v<F, double>) {
        if (logit_bound(g, ws.maps.data()) > wide_bound) {  // the forward pass's decision, from the same values
          Workspace<double>& wide_ws = wide.gather(x_data, g, plan, c, nonfinite, negative);
          for (int64_t t = 0; t < 2 * g.T; ++t) wide_ws.lme[t] = static_cast<double>(lme_data[c * 2 * g.T + t]);
          for (int64_t b = 0; b < g.B; ++b) wide_ws.v[b] = static_cast<double>(v_data[c * g.B + b]);
          filter_gradient<false>(g, wide_ws, static_cast<double>(grad_data[c]), wide_ws.lme.data(), wide_ws.v.data(),
                                 dx_data, c);
          continue;
        }
      }
      filter_gradient<false>(g, ws, grad_data[c], lme_data + c * 2 * g.T, v_data + c * g.B, dx_data, c);
    }
  });
  return dx;
}

// The loss and its gradient in one pass over the data (issue 12), for training, where a backward pass always
// follows: per filter, the maps are gathered and the logits correlated once, and the gradient's q = (1 + w)/B
// reuses the forward's w = expm1(u), so the backward op's second read of x, its second logit correlation and its
// second expm1 per (image, template) disappear. Returns the loss [C] and dloss_c/dx (grad 1 for every filter) in
// the compute type, contiguous [B, C, H, W]; filter_loss_backward_from_grad scales it by the incoming gradient.
template <typename scalar_t>
std::tuple<at::Tensor, at::Tensor> forward_grad_typed(const at::Tensor& x, double beta) {
  using F = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
  const LossGeometry g(x, beta);
  const auto options = x.options().dtype(c10::CppTypeToScalarType<F>::value);
  at::Tensor loss = at::empty({g.C}, options);
  at::Tensor dloss_dx = at::empty(x.sizes(), options.memory_format(at::MemoryFormat::Contiguous));
  const PyramidPlan plan(g.H, g.W, beta, pyramid_method());
  const scalar_t* x_data = x.const_data_ptr<scalar_t>();
  F* loss_data = loss.data_ptr<F>();
  F* dx_data = dloss_dx.data_ptr<F>();
  for_each_checked_filter<F>(
      x_data, g, plan, [&](int64_t c, Workspace<F>& ws) {
        loss_data[c] = filter_forward(g, ws, ws.lme.data(), ws.v.data());
        filter_gradient<true>(g, ws, F(1), ws.lme.data(), ws.v.data(), dx_data, c);
      },
      [&](int64_t c, Workspace<double>& wide) {
        loss_data[c] = static_cast<F>(filter_forward(g, wide, wide.lme.data(), wide.v.data()));
        filter_gradient<true>(g, wide, 1.0, wide.lme.data(), wide.v.data(), dx_data, c);
      });
  return {loss, dloss_dx};
}

void check_loss_input(const at::Tensor& x, const char* op) {
  TORCH_CHECK_VALUE(x.dim() == 4, op, ": expected a 4-D tensor [B, C, H, W], got ", x.dim(), " dimensions");
  TORCH_CHECK_VALUE(x.numel() > 0, op, ": got an empty tensor; B, C, H and W must all be ≥ 1");
  TORCH_CHECK_TYPE(x.is_floating_point(), op, ": expected a floating-point tensor, got ", x.scalar_type());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> filter_loss_forward(const at::Tensor& x, double beta) {
  check_loss_input(x, "filter_loss");
  TORCH_CHECK_VALUE(beta > 0 && std::isfinite(beta), "filter_loss: beta must be a finite positive number, got ", beta);
  return AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "filter_loss_forward",
                                         [&] { return forward_typed<scalar_t>(x, beta); });
}

at::Tensor filter_loss_backward(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& lme,
                                const at::Tensor& v, double beta) {
  check_loss_input(x, "filter_loss");
  const int64_t C = x.size(1), B = x.size(0), T = x.size(2) * x.size(3) + 1;
  TORCH_CHECK_VALUE(grad.numel() == C && lme.numel() == 2 * C * T && v.numel() == C * B,
                    "filter_loss_backward: grad/lme/v do not match x; pass the outputs of filter_loss_forward(x)");
  return AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "filter_loss_backward",
                                         [&] { return backward_typed<scalar_t>(grad, x, lme, v, beta); });
}

std::tuple<at::Tensor, at::Tensor> filter_loss_forward_grad(const at::Tensor& x, double beta) {
  check_loss_input(x, "filter_loss");
  TORCH_CHECK_VALUE(beta > 0 && std::isfinite(beta), "filter_loss: beta must be a finite positive number, got ", beta);
  return AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "filter_loss_forward_grad",
                                         [&] { return forward_grad_typed<scalar_t>(x, beta); });
}

// dx[b, c] = grad[c] · dloss_dx[b, c] in the input's dtype: the backward pass of filter_loss_forward_grad.
at::Tensor filter_loss_backward_from_grad(const at::Tensor& grad, const at::Tensor& dloss_dx, at::ScalarType dtype) {
  TORCH_CHECK_VALUE(dloss_dx.dim() == 4 && grad.numel() == dloss_dx.size(1),
                    "filter_loss_backward_from_grad: grad must hold one value per filter of dloss_dx [B, C, H, W]; "
                    "pass the outputs of filter_loss_forward_grad(x)");
  const at::Tensor scale = grad.to(dloss_dx.scalar_type()).reshape({1, dloss_dx.size(1), 1, 1});
  return at::mul(dloss_dx, scale).to(dtype);
}

}  // namespace
}  // namespace fastexplain

TORCH_LIBRARY_IMPL(fastexplain, CPU, m) {
  m.impl("filter_loss_forward_grad", &fastexplain::filter_loss_forward_grad);
  m.impl("filter_loss_backward_from_grad", &fastexplain::filter_loss_backward_from_grad);
  m.impl("filter_loss_forward", &fastexplain::filter_loss_forward);
  m.impl("filter_loss_backward", &fastexplain::filter_loss_backward);
}
