// Fused (ReLU →) template mask (SPEC §3): one read of each map, one write of the output, and the peak index
// per (image, filter) for the backward pass, which recomputes the mask from it instead of saving one.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <string>
#include <type_traits>
#include <vector>

namespace fastexplain {
namespace {

std::string op_name(bool relu) { return relu ? "relu_template_mask" : "template_mask"; }

struct MaskGeometry {
  int64_t B, C, H, W, HW;
  double inverse_n, scale;
  int64_t sB, sC, sH, sW;
  bool dense_maps;                     // each map is one contiguous row-major block
  std::vector<int32_t> row_of, col_of;  // the grid coordinates of every row-major position

  MaskGeometry(const at::Tensor& x, bool tau_scale)
      : B(x.size(0)), C(x.size(1)), H(x.size(2)), W(x.size(3)), HW(H * W),
        inverse_n(1.0 / static_cast<double>(std::max(H, W))),
        scale(tau_scale ? 0.5 / static_cast<double>(H * W) : 1.0),
        sB(x.stride(0)), sC(x.stride(1)), sH(x.stride(2)), sW(x.stride(3)),
        dense_maps((W == 1 || sW == 1) && (H == 1 || sH == W)), row_of(H * W), col_of(H * W) {
    for (int64_t i = 0; i < H * W; ++i) {
      row_of[i] = static_cast<int32_t>(i / W);
      col_of[i] = static_cast<int32_t>(i % W);
    }
  }
};

// Copies one map into a row-major buffer in the compute type (one pass, any strides).
template <typename scalar_t, typename F>
inline void load_map(const scalar_t* image, const MaskGeometry& g, F* map) {
  if (g.dense_maps) {
    for (int64_t i = 0; i < g.HW; ++i) map[i] = static_cast<F>(image[i]);
    return;
  }
  for (int64_t r = 0; r < g.H; ++r)
    for (int64_t c = 0; c < g.W; ++c) map[r * g.W + c] = static_cast<F>(image[r * g.sH + c * g.sW]);
}

// Lane-wise reductions that the compiler turns into vector code (no reassociation flags needed).
constexpr int kLanes = 16;

template <typename F>
inline bool any_nonfinite(const F* values, int64_t n) {
  F poison[kLanes] = {};  // x·0 is NaN exactly for NaN and ±Inf
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes)
    for (int l = 0; l < kLanes; ++l) poison[l] += values[i + l] * F(0);
  F total = F(0);
  for (; i < n; ++i) total += values[i] * F(0);
  for (int l = 0; l < kLanes; ++l) total += poison[l];
  return total != total;
}

template <typename F>
inline F max_value(const F* values, int64_t n) {
  F best[kLanes];
  for (int l = 0; l < kLanes; ++l) best[l] = values[0];
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes)
    for (int l = 0; l < kLanes; ++l) best[l] = values[i + l] > best[l] ? values[i + l] : best[l];
  F result = values[0];
  for (; i < n; ++i) result = values[i] > result ? values[i] : result;
  for (int l = 0; l < kLanes; ++l) result = best[l] > result ? best[l] : result;
  return result;
}

// μ̂ of one (ReLU'd) map: first maximum in row-major order, or the activation-weighted centroid rounded half up
// and clamped to the grid (all-zero or non-positive total → 0), as in reference.peak_indices.
template <typename F>
int64_t peak_index(const F* map, const MaskGeometry& g, bool centroid) {
  if (!centroid) {
    const F best_value = max_value(map, g.HW);
    int64_t best = 0;
    while (map[best] != best_value) ++best;  // the first maximum in row-major order
    return best;
  }
  double total = 0.0, row_moment = 0.0, col_moment = 0.0;
  for (int64_t r = 0; r < g.H; ++r) {
    double row_total = 0.0;
#pragma omp simd reduction(+ : row_total, col_moment)
    for (int64_t c = 0; c < g.W; ++c) {
      const double value = static_cast<double>(map[r * g.W + c]);
      row_total += value;
      col_moment += value * static_cast<double>(c);
    }
    total += row_total;
    row_moment += row_total * static_cast<double>(r);
  }
  if (!(total > 0.0)) return 0;
  const double r = std::clamp(std::floor(row_moment / total + 0.5), 0.0, static_cast<double>(g.H - 1));
  const double c = std::clamp(std::floor(col_moment / total + 0.5), 0.0, static_cast<double>(g.W - 1));
  return static_cast<int64_t>(r) * g.W + static_cast<int64_t>(c);
}

// The mask at every position times its scale: m(i) = max(1 − β‖i − μ̂‖₁ / n, −1) (templates.mask_profile).
template <typename F>
inline void mask_at(F* mask, int64_t peak, double beta, const MaskGeometry& g) {
  const F slope = static_cast<F>(beta * g.inverse_n), scale = static_cast<F>(g.scale);
  const int32_t peak_r = static_cast<int32_t>(peak / g.W), peak_c = static_cast<int32_t>(peak % g.W);
  const int32_t* __restrict rows = g.row_of.data();
  const int32_t* __restrict cols = g.col_of.data();
  for (int64_t i = 0; i < g.HW; ++i) {
    const F d = static_cast<F>(std::abs(rows[i] - peak_r) + std::abs(cols[i] - peak_c));
    mask[i] = std::max(F(1) - slope * d, F(-1)) * scale;
  }
}

template <typename scalar_t>
std::tuple<at::Tensor, at::Tensor> forward_typed(const at::Tensor& x, double beta, bool centroid, bool tau_scale,
                                                 bool relu) {
  using F = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
  const MaskGeometry g(x, tau_scale);
  at::Tensor y = at::empty(x.sizes(), x.options().memory_format(at::MemoryFormat::Contiguous));
  at::Tensor peaks = at::empty({g.B, g.C}, x.options().dtype(at::kLong));
  const scalar_t* x_data = x.const_data_ptr<scalar_t>();
  scalar_t* y_data = y.data_ptr<scalar_t>();
  int64_t* peak_data = peaks.data_ptr<int64_t>();
  std::atomic<bool> found_nonfinite{false};
  at::parallel_for(0, g.B * g.C, 16, [&](int64_t begin, int64_t end) {
    std::vector<F> map_buffer(g.HW), mask_buffer(g.HW);
    F* __restrict map = map_buffer.data();
    F* __restrict mask = mask_buffer.data();
    for (int64_t bc = begin; bc < end; ++bc) {
      const int64_t b = bc / g.C, c = bc % g.C;
      load_map(x_data + b * g.sB + c * g.sC, g, map);
      if (any_nonfinite(map, g.HW)) {
        found_nonfinite = true;
        continue;
      }
      if (relu)
        for (int64_t i = 0; i < g.HW; ++i) map[i] = map[i] > F(0) ? map[i] : F(0);
      const int64_t peak = peak_index(map, g, centroid);
      peak_data[bc] = peak;
      mask_at(mask, peak, beta, g);
      scalar_t* __restrict out = y_data + bc * g.HW;
      for (int64_t i = 0; i < g.HW; ++i) out[i] = static_cast<scalar_t>(std::max(map[i] * mask[i], F(0)));
    }
  });
  TORCH_CHECK_VALUE(!found_nonfinite.load(), op_name(relu),
                    ": the input contains NaN or Inf; check the layer that produced it (or lower the learning rate)");
  return {y, peaks};
}

// dx = grad_y · m · 1[relu?(x)·m > 0] (· τ): the mask is a constant for autograd (SPEC §3).
template <typename scalar_t>
at::Tensor backward_typed(const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& peaks, double beta,
                          bool tau_scale, bool relu) {
  using F = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
  const MaskGeometry g(x, tau_scale);
  const at::Tensor grad = grad_y.to(x.scalar_type()).contiguous();
  const at::Tensor peak_index = peaks.to(at::kLong).contiguous();
  at::Tensor dx = at::empty(x.sizes(), x.options().memory_format(at::MemoryFormat::Contiguous));
  const scalar_t* x_data = x.const_data_ptr<scalar_t>();
  const scalar_t* grad_data = grad.const_data_ptr<scalar_t>();
  const int64_t* peak_data = peak_index.const_data_ptr<int64_t>();
  scalar_t* dx_data = dx.data_ptr<scalar_t>();
  at::parallel_for(0, g.B * g.C, 16, [&](int64_t begin, int64_t end) {
    std::vector<F> map_buffer(g.HW), mask_buffer(g.HW);
    F* __restrict map = map_buffer.data();
    F* __restrict mask = mask_buffer.data();
    for (int64_t bc = begin; bc < end; ++bc) {
      const int64_t b = bc / g.C, c = bc % g.C;
      load_map(x_data + b * g.sB + c * g.sC, g, map);
      mask_at(mask, peak_data[bc], beta, g);
      const scalar_t* __restrict grad_map = grad_data + bc * g.HW;
      scalar_t* __restrict dx_map = dx_data + bc * g.HW;
      for (int64_t i = 0; i < g.HW; ++i) {
        const F value = relu ? std::max(map[i], F(0)) : map[i];
        dx_map[i] = static_cast<scalar_t>(value * mask[i] > F(0) ? static_cast<F>(grad_map[i]) * mask[i] : F(0));
      }
    }
  });
  return dx;
}

void check_mask_input(const at::Tensor& x, bool relu) {
  const std::string op = op_name(relu);
  TORCH_CHECK_VALUE(x.dim() == 4, op, ": expected a 4-D tensor [B, C, H, W], got ", x.dim(), " dimensions");
  TORCH_CHECK_VALUE(x.numel() > 0, op, ": got an empty tensor; B, C, H and W must all be ≥ 1");
  TORCH_CHECK_TYPE(x.is_floating_point(), op, ": expected a floating-point tensor, got ", x.scalar_type());
}

std::tuple<at::Tensor, at::Tensor> template_mask_forward(const at::Tensor& x, double beta, c10::string_view center,
                                                         bool tau_scale, bool relu) {
  check_mask_input(x, relu);
  TORCH_CHECK_VALUE(center == "argmax" || center == "centroid", op_name(relu),
                    ": center must be 'argmax' or 'centroid', got '", std::string(center), "'");
  const bool centroid = center == "centroid";
  return AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "template_mask_forward",
                                         [&] { return forward_typed<scalar_t>(x, beta, centroid, tau_scale, relu); });
}

at::Tensor template_mask_backward(const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& peaks,
                                  double beta, bool tau_scale, bool relu) {
  check_mask_input(x, relu);
  TORCH_CHECK_VALUE(grad_y.sizes() == x.sizes() && peaks.numel() == x.size(0) * x.size(1), op_name(relu),
                    ": grad_y/peaks do not match x; pass the outputs of template_mask_forward(x)");
  return AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "template_mask_backward",
                                         [&] { return backward_typed<scalar_t>(grad_y, x, peaks, beta, tau_scale, relu); });
}

}  // namespace
}  // namespace fastexplain

TORCH_LIBRARY_IMPL(fastexplain, CPU, m) {
  m.impl("template_mask_forward", &fastexplain::template_mask_forward);
  m.impl("template_mask_backward", &fastexplain::template_mask_backward);
}
