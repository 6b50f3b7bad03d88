// One filter's forward pass of the fused filter loss (SPEC §2), for filter_loss.cpp: the call's geometry and the
// per-thread workspace, gathering and centring the maps, the logits by the L1-pyramid correlation, the centred
// log-mean-exp per template, the mixture per image and −MI; the double-precision path of large-scale float filters.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <memory>
#include <string>
#include <type_traits>
#include <vector>

#include "kernel_math.h"

namespace fastexplain {
namespace filter_loss_detail {

// FASTEXPLAIN_CPU_PYRAMID picks the pyramid correlation: "auto" (default: the one with fewer operations for
// this map size), "direct" (sparse stencil, O(r²) per position) or "prefix" (prefix sums, O(1) per position).
inline int64_t pyramid_method() {
  const char* value = std::getenv("FASTEXPLAIN_CPU_PYRAMID");
  const std::string name = value ? value : "";
  if (name.empty() || name == "auto") return 0;
  if (name == "direct") return 1;
  if (name == "prefix") return 2;
  TORCH_CHECK_VALUE(false, "FASTEXPLAIN_CPU_PYRAMID must be 'auto', 'direct' or 'prefix', got '", name, "'");
  return 0;
}

// Shape and template constants of one call (SPEC §1).
struct LossGeometry {
  int64_t B, C, H, W, HW, T;
  double tau, kappa, prior_negative, prior_positive;
  int64_t sB, sC, sH, sW;

  LossGeometry(const at::Tensor& x, double beta)
      : B(x.size(0)), C(x.size(1)), H(x.size(2)), W(x.size(3)), HW(H * W), T(H * W + 1),
        tau(0.5 / static_cast<double>(H * W)), kappa(beta / static_cast<double>(std::max(H, W))),
        prior_negative(1.0 - static_cast<double>(HW) / (1.0 + HW)), prior_positive(1.0 / (1.0 + HW)),
        sB(x.stride(0)), sC(x.stride(1)), sH(x.stride(2)), sW(x.stride(3)) {}
};

// Per-thread buffers, all position-major with the batch innermost.
template <typename F>
struct Workspace {
  std::vector<F> maps, pyramid, u, w, row;
  std::vector<F> lme, v;  // one filter's statistics, for passes that do not keep them in an output
  std::vector<const F*> image_rows;
  PyramidCorrelator<F> correlate;
  Workspace(const LossGeometry& g, const PyramidPlan& plan)
      : maps(g.HW * g.B), pyramid(g.HW * g.B), u(g.T * g.B), w(g.T * g.B), row(g.B), lme(2 * g.T), v(g.B),
        image_rows(g.B), correlate(plan, g.B) {}
};

// maps[i][b] = x[b, c, i] − mean_b x[b, c, i] in the compute type; with check, flags NaN/Inf and negative values.
// Each image's map is read in place when it is dense and already in the compute type, otherwise copied contiguously
// into staging; then it is transposed in 16×16 tiles and centred, a block of 16 positions at a time.
// Asks the memory system for filter c's B maps ahead of their use: they lie C·HW elements apart, one short run per
// image, which the hardware prefetchers pick up late (a cache miss per map and per run of lines).
template <typename scalar_t>
inline void prefetch_maps(const scalar_t* x, const LossGeometry& g, int64_t c) {
  if (c >= g.C) return;
  const bool dense = (g.W == 1 || g.sW == 1) && (g.H == 1 || g.sH == g.W);
  if (!dense) return;
  const int64_t bytes = g.HW * static_cast<int64_t>(sizeof(scalar_t));
  for (int64_t b = 0; b < g.B; ++b) {
    const char* image = reinterpret_cast<const char*>(x + b * g.sB + c * g.sC);
    for (int64_t offset = 0; offset < bytes; offset += 64) __builtin_prefetch(image + offset, 0, 1);
  }
}

template <typename scalar_t, typename F>
void gather_centred_maps(const scalar_t* x, const LossGeometry& g, int64_t c, F* staging, const F** image_rows,
                         F* maps, bool check, bool& nonfinite, bool& negative) {
  const bool dense = (g.W == 1 || g.sW == 1) && (g.H == 1 || g.sH == g.W);
  for (int64_t b = 0; b < g.B; ++b) {
    const scalar_t* image = x + b * g.sB + c * g.sC;
    F* __restrict row = staging + b * g.HW;
    if constexpr (std::is_same_v<scalar_t, F>) {
      if (dense) row = const_cast<F*>(image);
    }
    if (static_cast<const void*>(row) != static_cast<const void*>(image)) {
      if (dense) {
        for (int64_t i = 0; i < g.HW; ++i) row[i] = static_cast<F>(image[i]);
      } else {
        for (int64_t h = 0; h < g.H; ++h)
          for (int64_t w = 0; w < g.W; ++w) row[h * g.W + w] = static_cast<F>(image[h * g.sH + w * g.sW]);
      }
    }
    image_rows[b] = row;
    if (!check) continue;
    // Lane-wise reductions (vectorised without reassociation flags): poison is NaN when some value is NaN
    // or ±Inf (x·0), lowest is negative when some value is.
    constexpr int64_t lanes = 16;
    F poison[lanes] = {}, low[lanes] = {};
    int64_t i = 0;
    for (; i + lanes <= g.HW; i += lanes)
      for (int64_t l = 0; l < lanes; ++l) {
        poison[l] += row[i + l] * F(0);
        low[l] = row[i + l] < low[l] ? row[i + l] : low[l];
      }
    F lowest = F(0), poison_total = F(0);
    for (; i < g.HW; ++i) {
      poison_total += row[i] * F(0);
      lowest = row[i] < lowest ? row[i] : lowest;
    }
    for (int64_t l = 0; l < lanes; ++l) {
      poison_total += poison[l];
      lowest = low[l] < lowest ? low[l] : lowest;
    }
    nonfinite |= poison_total != poison_total;
    negative |= lowest < F(0);
  }
  constexpr int64_t tile = 16;
  const F inv_B = F(1) / static_cast<F>(g.B);
  for (int64_t i0 = 0; i0 < g.HW; i0 += tile) {
    const int64_t i_end = std::min(i0 + tile, g.HW);
    for (int64_t b0 = 0; b0 < g.B; b0 += tile) {
      const int64_t b_end = std::min(b0 + tile, g.B);
      if (i_end - i0 == tile && b_end - b0 == tile) {  // full tile: constant trip counts
#if defined(__AVX512F__)
        if constexpr (std::is_same_v<F, float>) {
          const float* rows[tile];
          for (int64_t b = 0; b < tile; ++b) rows[b] = image_rows[b0 + b] + i0;
          transpose16x16(rows, maps + i0 * g.B + b0, g.B);
          continue;
        }
#endif
        for (int64_t b = 0; b < tile; ++b) {
          const F* __restrict src = image_rows[b0 + b] + i0;
          for (int64_t i = 0; i < tile; ++i) maps[(i0 + i) * g.B + b0 + b] = src[i];
        }
      } else {
        for (int64_t b = b0; b < b_end; ++b)
          for (int64_t i = i0; i < i_end; ++i) maps[i * g.B + b] = image_rows[b][i];
      }
    }
    for (int64_t i = i0; i < i_end; ++i) {
      F* __restrict column = maps + i * g.B;
      F total = F(0);
      #pragma omp simd reduction(+ : total)
      for (int64_t b = 0; b < g.B; ++b) total += column[b];
      const F mean = total * inv_B;
      for (int64_t b = 0; b < g.B; ++b) column[b] -= mean;
    }
  }
}

// Logits s[t][b] = Σ_i x_b(i)·T_t(i) = τ·(−S_b + (β/n)·pyramid[t−1][b]) (0 for t = 0 … τ·(−S_b)), into s.
// The double-precision workspace of float filters whose logits are too large for float32 (made on first use, one
// per thread): the filter's maps gathered again in double, with its per-template and per-image statistics.
// Its statistics go to the workspace's lme and v.
struct WideFilter {
  std::unique_ptr<Workspace<double>> ws;

  template <typename scalar_t>
  Workspace<double>& gather(const scalar_t* x_data, const LossGeometry& g, const PyramidPlan& plan, int64_t c,
                            bool& nonfinite, bool& negative) {
    if (!ws) ws = std::make_unique<Workspace<double>>(g, plan);
    gather_centred_maps(x_data, g, c, ws->pyramid.data(), ws->image_rows.data(), ws->maps.data(), false, nonfinite,
                        negative);
    return *ws;
  }
};

template <typename F>
void template_logits(const LossGeometry& g, Workspace<F>& ws, F* s) {
  F* __restrict totals = ws.row.data();
  std::fill(totals, totals + g.B, F(0));
  for (int64_t i = 0; i < g.HW; ++i) {
    const F* __restrict column = ws.maps.data() + i * g.B;
    for (int64_t b = 0; b < g.B; ++b) totals[b] += column[b];
  }
  ws.correlate(ws.maps.data(), ws.pyramid.data(), g.B);
  const F tau = static_cast<F>(g.tau), tau_kappa = static_cast<F>(g.tau * g.kappa);
  for (int64_t b = 0; b < g.B; ++b) s[b] = -tau * totals[b];
  for (int64_t k = 0; k < g.HW; ++k) {
    const F* __restrict p = ws.pyramid.data() + k * g.B;
    F* __restrict out = s + (k + 1) * g.B;
    for (int64_t b = 0; b < g.B; ++b) out[b] = tau_kappa * p[b] - tau * totals[b];
  }
}

template <typename F>
F entropy_term_scalar(F u) {
  return entropy_term(u, static_cast<F>(std::expm1(u)));
}

// Up to 16 templates' statistics for float32 rows (the loop body of filter_forward, on 16-float vectors with the
// same operations per lane as the generic loop): per template, centre = mean_b s (+ shift) and the mean of
// E = expm1(s − centre); then the block's 16 log1p(mean E) in one vector (log1p16); then per template
// u = (s − centre) − log1p(M), w = expm1(u) = (E − M)/(1 + M) and Σ_b f(u) into entropy[j]; in the same pass the
// per-image mixture Σ_t p_t w and max_t u accumulate (priors[j] is template j's prior).
inline void forward_block_float(float* __restrict u_rows, float* __restrict w_rows, int64_t B, int64_t count,
                                float inv_B, const float* priors, float* centre_out, float* log_mean_out,
                                float* entropy, float* __restrict mixture, float* __restrict max_u) {
  const int64_t full = B / 16 * 16;
  alignas(64) float mean_expm1[16] = {};  // lanes past count stay 0: log1p(0) = 0
  for (int64_t j = 0; j < count; ++j) {
    float* __restrict u = u_rows + j * B;  // holds s on entry
    float* __restrict w = w_rows + j * B;
    Float16 sums = Float16{}, maxima = splat16(-INFINITY);
    for (int64_t b = 0; b < full; b += 16) {
      const Float16 x = load16(u + b);
      sums += x;
      maxima = x > maxima ? x : maxima;
    }
    float total = full ? sum16(sums) : 0.0f, largest = full ? max16(maxima) : -INFINITY;
    for (int64_t b = full; b < B; ++b) {
      total += u[b];
      largest = std::max(largest, u[b]);
    }
    const float mean = total * inv_B;
    const float shift = std::max((largest - mean) - static_cast<float>(kSafeSpread), 0.0f);
    const float centre = mean + shift;
    Float16 expm1_sums = Float16{};
    for (int64_t b = 0; b < full; b += 16) {
      const Float16 a = load16(u + b) - centre;
      const Float16 e = expm1_16(a);
      store16(u + b, a);
      store16(w + b, e);
      expm1_sums += e;
    }
    float sum_expm1 = full ? sum16(expm1_sums) : 0.0f;
    for (int64_t b = full; b < B; ++b) {
      u[b] -= centre;
      w[b] = expm1_vec(u[b]);
      sum_expm1 += w[b];
    }
    centre_out[j] = centre;
    mean_expm1[j] = sum_expm1 * inv_B;
  }
  const Float16 means = load16(mean_expm1);
  alignas(64) float log_means[16], inv_norms[16];
  store16(log_means, log1p16(means));
  store16(inv_norms, 1.0f / (1.0f + means));
  for (int64_t j = 0; j < count; ++j) {
    float* __restrict u = u_rows + j * B;
    float* __restrict w = w_rows + j * B;
    const float log_mean = log_means[j], inv_norm = inv_norms[j], mean = mean_expm1[j], prior = priors[j];
    log_mean_out[j] = log_mean;
    Float16 entropies = Float16{};
    for (int64_t b = 0; b < full; b += 16) {
      const Float16 uu = load16(u + b) - log_mean;
      const Float16 ww = (load16(w + b) - mean) * inv_norm;
      store16(u + b, uu);
      store16(w + b, ww);
      entropies += entropy_term16(uu, ww);
      store16(mixture + b, load16(mixture + b) + prior * ww);
      const Float16 largest = load16(max_u + b);
      store16(max_u + b, uu > largest ? uu : largest);
    }
    float total = full ? sum16(entropies) : 0.0f;
    for (int64_t b = full; b < B; ++b) {
      u[b] -= log_mean;
      w[b] = (w[b] - mean) * inv_norm;
      total += entropy_term(u[b], w[b]);
      mixture[b] += prior * w[b];
      max_u[b] = std::max(max_u[b], u[b]);
    }
    entropy[j] = total;
  }
}

// One filter's −MI; leaves u = log(B·q) and w = expm1(u) in the workspace, the two parts of lme_t
// (centre_t = mean_b s + shift, log1p(mean_b expm1(s − centre_t))) in lme [2, T] and v [B] in the outputs.
template <typename F>
F filter_forward(const LossGeometry& g, Workspace<F>& ws, F* lme, F* v) {
  const int64_t B = g.B;
  const F inv_B = F(1) / static_cast<F>(B);
  template_logits(g, ws, ws.u.data());
  double conditional = 0.0;
  // v[b] = log Σ_t p_t e^u = log1p(Σ_t p_t w), shifted by max_t u when that is below −1 (reference.log_mixture).
  F* __restrict mixture = ws.row.data();
  std::vector<F> max_u(B, -INFINITY);
  for (int64_t b = 0; b < B; ++b) mixture[b] = F(0);
  if constexpr (std::is_same_v<F, float>) {
    for (int64_t t0 = 0; t0 < g.T; t0 += 16) {
      const int64_t count = std::min<int64_t>(16, g.T - t0);
      float entropy[16], priors[16];
      for (int64_t j = 0; j < count; ++j)
        priors[j] = static_cast<float>(t0 + j == 0 ? g.prior_negative : g.prior_positive);
      forward_block_float(ws.u.data() + t0 * B, ws.w.data() + t0 * B, B, count, inv_B, priors, lme + t0,
                          lme + g.T + t0, entropy, mixture, max_u.data());
      for (int64_t j = 0; j < count; ++j) {
        const double prior = t0 + j == 0 ? g.prior_negative : g.prior_positive;
        conditional += prior * static_cast<double>(entropy[j] * inv_B);
      }
    }
  } else {
    for (int64_t t = 0; t < g.T; ++t) {
      F* __restrict u = ws.u.data() + t * B;  // holds s on entry
      F* __restrict w = ws.w.data() + t * B;
      F total = F(0);
      #pragma omp simd reduction(+ : total)
      for (int64_t b = 0; b < B; ++b) total += u[b];
      const F mean = total * inv_B;
      F spread = -INFINITY;
      #pragma omp simd reduction(max : spread)
      for (int64_t b = 0; b < B; ++b) spread = std::max(spread, u[b] - mean);
      const F shift = std::max(spread - static_cast<F>(kSafeSpread), F(0));
      const F centre = mean + shift;
      F sum_expm1 = F(0);
      #pragma omp simd reduction(+ : sum_expm1)
      for (int64_t b = 0; b < B; ++b) {
        u[b] -= centre;  // a = s − mean − shift
        w[b] = expm1_vec(u[b]);
        sum_expm1 += w[b];
      }
      const F mean_expm1 = sum_expm1 * inv_B;
      const F log_mean = std::log1p(mean_expm1);
      const F inv_norm = F(1) / (F(1) + mean_expm1);
      lme[t] = centre;  // lme_t = centre + log_mean, kept in two parts so the backward pass rebuilds u bit for bit
      lme[g.T + t] = log_mean;
      F entropy = F(0);
      #pragma omp simd reduction(+ : entropy)
      for (int64_t b = 0; b < B; ++b) {
        u[b] -= log_mean;                            // u = s − lme
        w[b] = (w[b] - mean_expm1) * inv_norm;       // expm1(u) = (e^a − 1 − M) / (1 + M)
        entropy += entropy_term(u[b], w[b]);
      }
      const double prior = t == 0 ? g.prior_negative : g.prior_positive;
      conditional += prior * static_cast<double>(entropy * inv_B);
      const F prior_f = static_cast<F>(prior);
      for (int64_t b = 0; b < B; ++b) {
        mixture[b] += prior_f * w[b];
        max_u[b] = std::max(max_u[b], u[b]);
      }
    }
  }
  double marginal = 0.0;
  int64_t b0 = 0;
  if constexpr (std::is_same_v<F, float>) {  // 16 images at a time; an image no template finds likely goes below
    for (; b0 + 16 <= B; b0 += 16) {
      if (any_lanes16(load16(max_u.data() + b0) < -1.0f)) break;
      const Float16 vv = log1p16(load16(mixture + b0));
      store16(v + b0, vv);
      float terms[16];
      store16(terms, entropy_term16(vv, expm1_16(vv)));
      for (int l = 0; l < 16; ++l) marginal += static_cast<double>(terms[l]);
    }
  }
  for (int64_t b = b0; b < B; ++b) {
    if (max_u[b] < F(-1)) {
      F shifted = F(0);
      for (int64_t t = 0; t < g.T; ++t)
        shifted += static_cast<F>(t == 0 ? g.prior_negative : g.prior_positive) *
                   static_cast<F>(std::expm1(ws.u[t * B + b] - max_u[b]));
      v[b] = max_u[b] + static_cast<F>(std::log1p(shifted));
    } else {
      v[b] = static_cast<F>(std::log1p(mixture[b]));
    }
    marginal += static_cast<double>(entropy_term_scalar(v[b]));
  }
  return static_cast<F>(-(conditional - marginal / static_cast<double>(B)));
}

// A float32 filter whose logits can reach |s| ≳ kWideLogitBound is computed in double (issue 12): float32 rounds
// each logit to ~6e-8·|s| absolute, and the loss (at most log B, often ~0.1 at large scale) inherits that error,
// about 2e-3 relative at activation scale 1e4. The bound is τ·max_b Σ_i |x_b(i) − mean_b x(i)| ≥ max |s − mean_b s|,
// computed from the centred maps the float pass already holds; unit-scale maps give ~0.2, so the float path
// runs for them.
// FASTEXPLAIN_CPU_WIDE_BOUND overrides it (0 computes every float32 filter in double; for tests and measurements).
constexpr double kWideLogitBound = 8.0;

inline double wide_logit_bound() {
  const char* value = std::getenv("FASTEXPLAIN_CPU_WIDE_BOUND");
  if (value == nullptr || *value == '\0') return kWideLogitBound;
  char* end = nullptr;
  const double bound = std::strtod(value, &end);
  TORCH_CHECK_VALUE(end != value && *end == '\0' && bound >= 0, "FASTEXPLAIN_CPU_WIDE_BOUND must be a number ≥ 0, got '",
                    value, "'");
  return bound;
}

template <typename F>
double logit_bound(const LossGeometry& g, const F* maps) {
  F largest = F(0);
  std::vector<F> totals(g.B, F(0));
  for (int64_t i = 0; i < g.HW; ++i) {
    const F* __restrict column = maps + i * g.B;
    for (int64_t b = 0; b < g.B; ++b) totals[b] += std::abs(column[b]);
  }
  for (int64_t b = 0; b < g.B; ++b) largest = std::max(largest, totals[b]);
  return g.tau * static_cast<double>(largest);
}

}  // namespace filter_loss_detail
}  // namespace fastexplain
