// One filter's gradient of the fused filter loss (SPEC §2, docs/method.md §2), for filter_loss.cpp: from the
// recomputed logits (the backward op) or from the forward pass's workspace (the fused forward + gradient).
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <memory>
#include <string>
#include <type_traits>
#include <vector>

#include "filter_loss_forward.h"
#include "kernel_math.h"

namespace fastexplain {
namespace filter_loss_detail {

// One template's gradient for float32 rows (the loop body of filter_gradient on 16-float vectors, three passes):
// u = (s − lme0) − lme1, q·B = 1 + expm1(u), g = p_t (u − v); the first image of largest u is tracked per lane in
// the same pass (its g is the reference subtracted before the batch sum); then Σ_b qB (g − g_ref); then
// ds = scale · qB · ((g − g_ref) − centre), added to the per-image totals.
// kSaved (the fused forward + gradient): ds holds u and qB holds w = expm1(u) on entry, as filter_forward left them,
// so no logit is rebuilt and no exponential is evaluated again.
template <bool kSaved>
inline void backward_template_float(float* __restrict ds, float* __restrict weighted, float* __restrict qB,
                                    const float* __restrict v, int64_t B, float lme0, float lme1, float prior,
                                    float inv_B, float scale, float* __restrict totals) {
  const int64_t full = B / 16 * 16;
  Float16 best = splat16(-INFINITY);
  Int16 best_index = Int16{}, index = Int16{0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};
  for (int64_t b = 0; b < full; b += 16) {
    const Float16 u = kSaved ? load16(ds + b) : (load16(ds + b) - lme0) - lme1;
    store16(qB + b, 1.0f + (kSaved ? load16(qB + b) : expm1_16(u)));
    store16(weighted + b, prior * (u - load16(v + b)));
    const auto better = u > best;  // strict: every lane keeps its first maximum
    best = better ? u : best;
    best_index = better ? index : best_index;
    index += 16;
  }
  float u_max = -INFINITY;
  int64_t ref = B - 1;
  if (full) {
    u_max = max16(best);
    float lanes[16];
    int32_t lane_index[16];
    std::memcpy(lanes, &best, sizeof(best));
    std::memcpy(lane_index, &best_index, sizeof(best_index));
    for (int l = 0; l < 16; ++l)
      if (lanes[l] == u_max && lane_index[l] < ref) ref = lane_index[l];
  }
  for (int64_t b = full; b < B; ++b) {
    const float u = kSaved ? ds[b] : (ds[b] - lme0) - lme1;
    qB[b] = 1.0f + (kSaved ? qB[b] : expm1_vec(u));
    weighted[b] = prior * (u - v[b]);
    if (u > u_max) {
      u_max = u;
      ref = b;
    }
  }
  const float g_ref = weighted[ref];
  Float16 sums = Float16{};
  for (int64_t b = 0; b < full; b += 16) {
    const Float16 centred = load16(weighted + b) - g_ref;
    store16(weighted + b, centred);
    sums += load16(qB + b) * centred;
  }
  float qg_total = full ? sum16(sums) : 0.0f;
  for (int64_t b = full; b < B; ++b) {
    weighted[b] -= g_ref;
    qg_total += qB[b] * weighted[b];
  }
  const float centre = qg_total * inv_B;
  for (int64_t b = 0; b < full; b += 16) {
    const Float16 d = scale * load16(qB + b) * (load16(weighted + b) - centre);
    store16(ds + b, d);
    store16(totals + b, load16(totals + b) + d);
  }
  for (int64_t b = full; b < B; ++b) {
    ds[b] = scale * qB[b] * (weighted[b] - centre);
    totals[b] += ds[b];
  }
}

// backward_template_float for B = 16·NV images (NV ≤ 4, the common batches 16 … 64): the template's row is at most
// four vectors, so u, q·B and g stay in registers and the three passes become one read of the row and one write of
// ds, with the same operations per element in the same order (the same results as the general loop).
template <bool kSaved, int NV>
inline void backward_template_float_regs(float* __restrict ds, float* __restrict qB_row, const float* __restrict v,
                                         float lme0, float lme1, float prior, float inv_B, float scale,
                                         float* __restrict totals) {
  Float16 u[NV], q[NV], weighted[NV];
  for (int k = 0; k < NV; ++k) {
    u[k] = kSaved ? load16(ds + 16 * k) : (load16(ds + 16 * k) - lme0) - lme1;
    q[k] = 1.0f + (kSaved ? load16(qB_row + 16 * k) : expm1_16(u[k]));
    weighted[k] = prior * (u[k] - load16(v + 16 * k));
  }
  // The first image of largest u: per lane the first maximum (strict >), then the smallest index among the lanes
  // that hold the overall maximum.
  Float16 best = u[0];
  Int16 best_index = Int16{0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15}, index = best_index;
  for (int k = 1; k < NV; ++k) {
    index += 16;
    const auto better = u[k] > best;
    best = better ? u[k] : best;
    best_index = better ? index : best_index;
  }
  const float u_max = max16(best);
  float lanes[16];
  int32_t lane_index[16];
  std::memcpy(lanes, &best, sizeof(best));
  std::memcpy(lane_index, &best_index, sizeof(best_index));
  int32_t ref = 16 * NV - 1;
  for (int l = 0; l < 16; ++l)
    if (lanes[l] == u_max && lane_index[l] < ref) ref = lane_index[l];
  alignas(64) float row[16 * NV];
  for (int k = 0; k < NV; ++k) store16(row + 16 * k, weighted[k]);
  const float g_ref = row[ref];
  Float16 sums = Float16{};
  for (int k = 0; k < NV; ++k) {
    weighted[k] = weighted[k] - g_ref;
    sums += q[k] * weighted[k];
  }
  const float centre = sum16(sums) * inv_B;
  for (int k = 0; k < NV; ++k) {
    const Float16 d = scale * q[k] * (weighted[k] - centre);
    store16(ds + 16 * k, d);
    store16(totals + 16 * k, load16(totals + 16 * k) + d);
  }
}

// dloss/dx for one filter: g = p_t (u − v), dMI/ds = q (g − Σ_b q g), dloss/ds = −grad·dMI/ds,
// dx_b(i) = Σ_t dloss/ds[b,t]·T_t(i), then the centring's Jacobian (subtract the batch mean).
// kSaved = false (the backward op): ws.maps holds the gathered maps; the logits are recomputed and u rebuilt from lme.
// kSaved = true (the fused forward + gradient): ws.u and ws.w hold u and expm1(u) as filter_forward left them.
template <bool kSaved, typename scalar_t, typename F>
void filter_gradient(const LossGeometry& g, Workspace<F>& ws, F grad,
                     const F* lme, const F* v, scalar_t* dx, int64_t c) {
  const int64_t B = g.B;
  const F inv_B = F(1) / static_cast<F>(B);
  F* s_all = ws.u.data();
  if constexpr (!kSaved) template_logits(g, ws, s_all);
  F* __restrict template_totals = ws.row.data();  // Σ_t dloss/ds[b,t]
  std::fill(template_totals, template_totals + B, F(0));
  for (int64_t t = 0; t < g.T; ++t) {
    const F prior = static_cast<F>(t == 0 ? g.prior_negative : g.prior_positive);
    const F lme0 = kSaved ? F(0) : lme[t], lme1 = kSaved ? F(0) : lme[g.T + t];
    F* __restrict ds = s_all + t * B;  // s (u when kSaved) on entry, dloss/ds on exit
    // Two scratch rows: g and q·B; the pyramid buffer is free until the correlation below. When kSaved, q·B
    // overwrites w in place.
    F* __restrict weighted = kSaved ? ws.pyramid.data() : ws.w.data() + t * B;
    F* __restrict qB = kSaved ? ws.w.data() + t * B : ws.pyramid.data();
    if constexpr (std::is_same_v<F, float>) {
      const float scale = -grad * inv_B;
      switch (B) {  // the row in registers (kSaved: qB is w's row; otherwise the expm1 is evaluated here)
        case 16: backward_template_float_regs<kSaved, 1>(ds, qB, v, lme0, lme1, prior, inv_B, scale, template_totals); continue;
        case 32: backward_template_float_regs<kSaved, 2>(ds, qB, v, lme0, lme1, prior, inv_B, scale, template_totals); continue;
        case 48: backward_template_float_regs<kSaved, 3>(ds, qB, v, lme0, lme1, prior, inv_B, scale, template_totals); continue;
        case 64: backward_template_float_regs<kSaved, 4>(ds, qB, v, lme0, lme1, prior, inv_B, scale, template_totals); continue;
        default: break;
      }
      backward_template_float<kSaved>(ds, weighted, qB, v, B, lme0, lme1, prior, inv_B, scale, template_totals);
      continue;
    }
    F u_max = -INFINITY;
    #pragma omp simd reduction(max : u_max)
    for (int64_t b = 0; b < B; ++b) {
      const F u = kSaved ? ds[b] : (ds[b] - lme0) - lme1;
      qB[b] = F(1) + (kSaved ? qB[b] : expm1_vec(u));
      weighted[b] = prior * (u - v[b]);  // g
      u_max = std::max(u_max, u);
    }
    // g − Σ_b q g is computed as (g − g_ref) − Σ_b q (g − g_ref), with ref the image of largest q: exact
    // where one image owns the template (q ≈ 1), where the plain form would cancel O(1) terms to ~0.
    int64_t ref = B - 1;  // the first image with u = u_max (a lane-wise min-reduction; the last if none matches)
#pragma omp simd reduction(min : ref)
    for (int64_t b = 0; b < B; ++b)
      if ((kSaved ? ds[b] : (ds[b] - lme0) - lme1) == u_max) ref = b < ref ? b : ref;
    const F g_ref = weighted[ref];
    F qg_total = F(0);
    #pragma omp simd reduction(+ : qg_total)
    for (int64_t b = 0; b < B; ++b) {
      weighted[b] -= g_ref;
      qg_total += qB[b] * weighted[b];
    }
    const F centre = qg_total * inv_B;
    const F scale = -grad * inv_B;
    for (int64_t b = 0; b < B; ++b) {
      ds[b] = scale * qB[b] * (weighted[b] - centre);
      template_totals[b] += ds[b];
    }
  }
  ws.correlate(s_all + B, ws.pyramid.data(), B);
  const F tau = static_cast<F>(g.tau), tau_kappa = static_cast<F>(g.tau * g.kappa);
  for (int64_t i = 0; i < g.HW; ++i) {
    F* __restrict column = ws.pyramid.data() + i * B;
    F total = F(0);
#pragma omp simd reduction(+ : total)
    for (int64_t b = 0; b < B; ++b) {
      column[b] = tau_kappa * column[b] - tau * template_totals[b];
      total += column[b];
    }
    const F mean = total * inv_B;
    for (int64_t b = 0; b < B; ++b) column[b] -= mean;
  }
  // Transposed back to image-major straight into dx, 16×16 tiles in registers where the types allow.
  constexpr int64_t tile = 16;
  const F* columns = ws.pyramid.data();
  for (int64_t b0 = 0; b0 < B; b0 += tile)
    for (int64_t i0 = 0; i0 < g.HW; i0 += tile) {
      const int64_t b_end = std::min(b0 + tile, B), i_end = std::min(i0 + tile, g.HW);
#if defined(__AVX512F__)
      if constexpr (std::is_same_v<F, float> && std::is_same_v<scalar_t, float>) {
        if (b_end - b0 == tile && i_end - i0 == tile) {
          const float* rows[tile];
          for (int64_t i = 0; i < tile; ++i) rows[i] = columns + (i0 + i) * B + b0;
          transpose16x16(rows, dx + (b0 * g.C + c) * g.HW + i0, g.C * g.HW);
          continue;
        }
      }
#endif
      for (int64_t b = b0; b < b_end; ++b) {
        scalar_t* __restrict out = dx + (b * g.C + c) * g.HW;
        for (int64_t i = i0; i < i_end; ++i) out[i] = static_cast<scalar_t>(columns[i * B + b]);
      }
    }
}

}  // namespace filter_loss_detail
}  // namespace fastexplain
