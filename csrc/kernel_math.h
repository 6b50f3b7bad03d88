// Shared numerics for the fastexplain CPU kernels (SPEC §1–2): a vectorisable expm1, the entropy term
// f(u) = u·e^u − expm1(u) and the L1-pyramid correlation of the part templates.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

namespace fastexplain {

// exp(s) overflows float32 near 88; beyond this spread of s around its batch mean the lme is shifted.
constexpr double kSafeSpread = 30.0;

// Constants of expm1 per compute type: range of the argument, 2^k construction, Cody–Waite ln 2.
template <typename F> struct ExpTraits;
template <> struct ExpTraits<float> {
  using Int = int32_t;
  static constexpr float lo = -87.0f, hi = 88.0f, round_magic = 12582912.0f;  // 1.5·2^23
  static constexpr float ln2_hi = 0.693145751953125f, ln2_lo = 1.428606765330187045e-06f;
  static constexpr int mantissa_bits = 23, bias = 127, taylor_degree = 8;
};
template <> struct ExpTraits<double> {
  using Int = int64_t;
  static constexpr double lo = -708.0, hi = 709.0, round_magic = 6755399441055744.0;  // 1.5·2^52
  static constexpr double ln2_hi = 0.693147180369123816490, ln2_lo = 1.90821492927058770002e-10;
  static constexpr int mantissa_bits = 52, bias = 1023, taylor_degree = 13;
};

// expm1(x) accurate to a few ulp, written with arithmetic and bit operations only so that loops calling
// it auto-vectorise: x = k·ln2 + r, |r| ≤ ln2/2, expm1(x) = 2^k·expm1(r) + (2^k − 1), expm1(r) by Taylor.
template <typename F>
inline F expm1_vec(F x) {
  using T = ExpTraits<F>;
  using Int = typename T::Int;
  x = x < T::lo ? T::lo : x;
  x = x > T::hi ? T::hi : x;
  const F k = (x * F(1.4426950408889634) + T::round_magic) - T::round_magic;
  const F r = (x - k * T::ln2_hi) - k * T::ln2_lo;
  F poly = F(0);
  F inverse_factorial = F(1);
  for (int j = 2; j <= T::taylor_degree; ++j) inverse_factorial /= F(j);  // folded at compile time
  // Horner on r·(1 + r/2 + r²/6 + …): coefficients 1/(j+1)! for j = degree−1 … 0.
  F coefficient = inverse_factorial;
  for (int j = T::taylor_degree; j >= 1; --j) {
    poly = poly * r + coefficient;
    coefficient *= F(j);
  }
  poly *= r;  // expm1(r)
  const Int bits = (static_cast<Int>(k) + T::bias) << T::mantissa_bits;
  const F two_k = __builtin_bit_cast(F, bits);
  return two_k * poly + (two_k - F(1));
}

// f(u) = u·e^u − expm1(u) ≥ 0 given w = expm1(u) (reference.entropy_term): a Taylor series for |u| < 0.5,
// where the direct form would cancel down to u²/2, the direct form u·(1 + w) − w elsewhere.
template <typename F>
inline F entropy_term(F u, F w) {
  // (k − 1)/k! for k = 13 … 2
  constexpr double c[12] = {12.0 / 6227020800.0, 11.0 / 479001600.0, 10.0 / 39916800.0, 9.0 / 3628800.0,
                            8.0 / 362880.0, 7.0 / 40320.0, 6.0 / 5040.0, 5.0 / 720.0, 4.0 / 120.0,
                            3.0 / 24.0, 2.0 / 6.0, 1.0 / 2.0};
  const bool small = std::abs(u) < F(0.5);
  const F us = small ? u : F(0);
  F series = F(0);
  for (int j = 0; j < 12; ++j) series = (series + F(c[j])) * us;
  series *= us;
  const F direct = u * (F(1) + w) - w;
  return small ? series : direct;
}

// The pyramid part of the templates as a sparse stencil (SPEC §1): T_μ(i) = τ·(−1 + (β/n)·max(0, r − ‖i − μ‖₁)),
// r = 2n/β. For every position μ: the positions i with ‖i − μ‖₁ < r and their weights r − ‖i − μ‖₁.
// The stencil is symmetric, so the same correlation serves the forward logits and the backward pass.
struct PyramidStencil {
  std::vector<int64_t> start;   // [HW + 1]: entries of μ are start[μ] … start[μ+1)
  std::vector<int64_t> source;  // row-major position i of each entry
  std::vector<double> weight;   // r − ‖i − μ‖₁ > 0

  PyramidStencil(int64_t H, int64_t W, double beta) {
    const double radius = 2.0 * static_cast<double>(H > W ? H : W) / beta;
    start.reserve(H * W + 1);
    start.push_back(0);
    for (int64_t mr = 0; mr < H; ++mr)
      for (int64_t mc = 0; mc < W; ++mc) {
        for (int64_t r = 0; r < H; ++r)
          for (int64_t c = 0; c < W; ++c) {
            const double d = static_cast<double>(std::abs(r - mr) + std::abs(c - mc));
            if (radius - d > 0.0) {
              source.push_back(r * W + c);
              weight.push_back(radius - d);
            }
          }
        start.push_back(static_cast<int64_t>(source.size()));
      }
  }
};

// out[μ][b] = Σ_i pyramid(i, μ)·in[i][b] for maps stored position-major ([HW][B], the batch innermost so the
// inner loop is a contiguous, vectorisable axpy over images).
// A block of NV·(64 bytes) images accumulated in registers (GCC vector extensions, lowered to whatever vector
// width the target has), so each stencil entry costs loads and FMAs but no store.
template <typename F, int NV>
inline void pyramid_block(const PyramidStencil& stencil, int64_t first, int64_t last, const F* in, F* o, int64_t B) {
  typedef F Vec __attribute__((vector_size(64)));
  constexpr int64_t lanes = 64 / sizeof(F);
  Vec acc[NV];
  for (int v = 0; v < NV; ++v) acc[v] = Vec{} ;
  for (int64_t e = first; e < last; ++e) {
    const F w = static_cast<F>(stencil.weight[e]);
    const F* src = in + stencil.source[e] * B;
    for (int v = 0; v < NV; ++v) {
      Vec x;
      std::memcpy(&x, src + v * lanes, sizeof(Vec));
      acc[v] += w * x;
    }
  }
  for (int v = 0; v < NV; ++v) std::memcpy(o + v * lanes, &acc[v], sizeof(Vec));
}

template <typename F>
inline void pyramid_correlate(const PyramidStencil& stencil, const F* in, F* out, int64_t B) {
  constexpr int64_t lanes = 64 / sizeof(F);
  const int64_t positions = static_cast<int64_t>(stencil.start.size()) - 1;
  for (int64_t mu = 0; mu < positions; ++mu) {
    F* __restrict o = out + mu * B;
    const int64_t first = stencil.start[mu], last = stencil.start[mu + 1];
    int64_t b0 = 0;
    for (; b0 + 4 * lanes <= B; b0 += 4 * lanes) pyramid_block<F, 4>(stencil, first, last, in + b0, o + b0, B);
    for (; b0 + lanes <= B; b0 += lanes) pyramid_block<F, 1>(stencil, first, last, in + b0, o + b0, B);
    if (b0 < B) {
      for (int64_t b = b0; b < B; ++b) o[b] = F(0);
      for (int64_t e = first; e < last; ++e) {
        const F w = static_cast<F>(stencil.weight[e]);
        const F* __restrict src = in + stencil.source[e] * B;
        for (int64_t b = b0; b < B; ++b) o[b] += w * src[b];
      }
    }
  }
}

// The same correlation in O(1) work per position (SPEC §1: the pyramid as box sums on 45°-rotated prefix
// sums). With C0 = ⌈r⌉ − 1 and f = r − C0 ∈ (0, 1], the second difference along columns of the pyramid is
//   Δ_c² pyramid = −2·[column segment |dr| ≤ C0] + (1 − f)·(ring_C0 + apex_C0) + f·(ring_{C0+1} − apex_{C0+1}),
// where ring_k is the L1 circle of radius k and apex_k its two points on the column through μ. Column
// segments come from column prefix sums, each ring from four diagonal segments of the two diagonal prefix
// sums, and the pyramid from two prefix sums of z = Δ_c² y along each row starting where y is zero.
struct PyramidPrefixPlan {
  int64_t H, W, C0, top, left, Hp, Wp, z_width;
  double f;

  PyramidPrefixPlan(int64_t H_, int64_t W_, double beta) : H(H_), W(W_) {
    const double radius = 2.0 * static_cast<double>(H > W ? H : W) / beta;
    C0 = static_cast<int64_t>(std::ceil(radius)) - 1;
    f = radius - static_cast<double>(C0);
    top = C0 + 2;
    left = 2 * C0 + 3;
    Hp = H + 2 * top;
    Wp = W + left + C0 + 2;
    z_width = W + C0;  // z for columns −C0−1 … W−2 give y for columns −C0 … W−1
  }
  // Vector operations per position, to choose between this plan and the direct stencil.
  double cost_per_call() const {
    const double lookups = f < 1.0 ? 24.0 : 14.0;
    return 4.0 * static_cast<double>(Hp * Wp) + (lookups + 4.0) * static_cast<double>(H * z_width);
  }
};

template <typename F>
struct PyramidPrefixBuffers {
  std::vector<F> padded, column, diag_down, diag_up, z, zeros;
  PyramidPrefixBuffers(const PyramidPrefixPlan& p, int64_t B)
      : padded(p.Hp * p.Wp * B), column(p.Hp * p.Wp * B), diag_down(p.Hp * p.Wp * B), diag_up(p.Hp * p.Wp * B),
        z(p.z_width * B), zeros(B, F(0)) {}
};

template <typename F>
inline void pyramid_correlate_prefix(const PyramidPrefixPlan& p, PyramidPrefixBuffers<F>& buf, const F* in, F* out,
                                     int64_t B) {
  const int64_t Wp = p.Wp;
  F* X = buf.padded.data();
  F* Col = buf.column.data();
  F* D1 = buf.diag_down.data();  // along (+1, +1)
  F* D2 = buf.diag_up.data();    // along (+1, −1)
  std::fill(buf.padded.begin(), buf.padded.end(), F(0));
  for (int64_t r = 0; r < p.H; ++r)
    for (int64_t c = 0; c < p.W; ++c)
      std::copy(in + (r * p.W + c) * B, in + (r * p.W + c + 1) * B, X + ((r + p.top) * Wp + c + p.left) * B);
  for (int64_t R = 0; R < p.Hp; ++R)
    for (int64_t C = 0; C < Wp; ++C) {
      const F* __restrict x = X + (R * Wp + C) * B;
      F* __restrict col = Col + (R * Wp + C) * B;
      F* __restrict d1 = D1 + (R * Wp + C) * B;
      F* __restrict d2 = D2 + (R * Wp + C) * B;
      const F* zero = buf.zeros.data();
      const F* col_up = R > 0 ? Col + ((R - 1) * Wp + C) * B : zero;
      const F* d1_up = R > 0 && C > 0 ? D1 + ((R - 1) * Wp + C - 1) * B : zero;
      const F* d2_up = R > 0 && C + 1 < Wp ? D2 + ((R - 1) * Wp + C + 1) * B : zero;
#pragma omp simd
      for (int64_t b = 0; b < B; ++b) {
        col[b] = x[b] + col_up[b];
        d1[b] = x[b] + d1_up[b];
        d2[b] = x[b] + d2_up[b];
      }
    }
  auto at = [&](const F* base, int64_t R, int64_t C) { return base + (R * Wp + C) * B; };
  const F one_minus_f = static_cast<F>(1.0 - p.f), f = static_cast<F>(p.f);
  const int64_t C0 = p.C0;
  for (int64_t r = 0; r < p.H; ++r) {
    const int64_t R = r + p.top;
    for (int64_t zc = 0; zc < p.z_width; ++zc) {
      const int64_t C = zc - C0 - 1 + p.left;
      F* __restrict z = buf.z.data() + zc * B;
      const F* col_hi = at(Col, R + C0, C);
      const F* col_lo = at(Col, R - C0 - 1, C);
#pragma omp simd
      for (int64_t b = 0; b < B; ++b) z[b] = F(-2) * (col_hi[b] - col_lo[b]);
      // ring_k ± apex_k with weight: k = C0 (weight 1 − f, apex added), k = C0 + 1 (weight f, apex removed)
      for (int pass = 0; pass < 2; ++pass) {
        const int64_t k = C0 + pass;
        const F weight = pass == 0 ? one_minus_f : f;
        if (weight == F(0)) continue;
        const F apex_sign = pass == 0 ? F(1) : F(-1);
        if (k == 0) {  // ring_0 + apex_0 = 2·x(μ)
          const F* x0 = at(X, R, C);
          for (int64_t b = 0; b < B; ++b) z[b] += weight * F(2) * x0[b];
          continue;
        }
        const F* tr_hi = at(D1, R, C + k);
        const F* tr_lo = at(D1, R - k - 1, C - 1);
        const F* bl_hi = at(D1, R + k, C);
        const F* bl_lo = at(D1, R - 1, C - k - 1);
        const F* tl_hi = at(D2, R - 1, C - k + 1);
        const F* tl_lo = at(D2, R - k, C);
        const F* br_hi = at(D2, R + k - 1, C + 1);
        const F* br_lo = at(D2, R, C + k);
        const F* apex_top = at(X, R - k, C);
        const F* apex_bottom = at(X, R + k, C);
#pragma omp simd
        for (int64_t b = 0; b < B; ++b) {
          const F ring = (tr_hi[b] - tr_lo[b]) + (bl_hi[b] - bl_lo[b]) + (tl_hi[b] - tl_lo[b]) + (br_hi[b] - br_lo[b]);
          z[b] += weight * (ring + apex_sign * (apex_top[b] + apex_bottom[b]));
        }
      }
    }
    // g(c + 1) = Σ_{c' ≤ c} z(c') with g(c) = y(c) − y(c − 1); y(c) = Σ_{c' ≤ c} g(c'); y = g = 0 at column −C0 − 1.
    std::vector<F> slope(B, F(0)), value(B, F(0));
    for (int64_t zc = 0; zc < p.z_width; ++zc) {
      const F* __restrict z = buf.z.data() + zc * B;
#pragma omp simd
      for (int64_t b = 0; b < B; ++b) {
        slope[b] += z[b];
        value[b] += slope[b];
      }
      const int64_t c = zc - C0;  // value now holds y(c) for c = (column of z) + 1
      if (c >= 0) std::copy(value.begin(), value.end(), out + (r * p.W + c) * B);
    }
  }
}

// Which correlation a call uses: 0 = automatic (fewer estimated operations), 1 = direct stencil, 2 = prefix sums.
struct PyramidPlan {
  PyramidPrefixPlan prefix;
  bool use_prefix;
  PyramidStencil stencil;

  static bool choose_prefix(int64_t H, int64_t W, double beta, int64_t method) {
    if (method != 0) return method == 2;
    const PyramidPrefixPlan plan(H, W, beta);
    const double diamond = 1.0 + 2.0 * static_cast<double>(plan.C0) * static_cast<double>(plan.C0 + 1);
    const double direct = static_cast<double>(H * W) * std::min(diamond, static_cast<double>(H * W));
    // The prefix passes stream four padded arrays: measured ≈3.5× the cost of a stencil FMA per operation
    // (one core, fwd+bwd: 14×14 direct 1.6× faster; 28×28 prefix 2.3× faster; 56×56 prefix 11× faster).
    return 3.5 * plan.cost_per_call() < direct;
  }
  PyramidPlan(int64_t H, int64_t W, double beta, int64_t method = 0)
      : prefix(H, W, beta), use_prefix(choose_prefix(H, W, beta, method)),
        stencil(use_prefix ? 0 : H, use_prefix ? 0 : W, beta) {}
};

// A thread's correlation workspace for one plan.
template <typename F>
struct PyramidCorrelator {
  const PyramidPlan& plan;
  PyramidPrefixBuffers<F> buffers;
  PyramidCorrelator(const PyramidPlan& plan_, int64_t B)
      : plan(plan_), buffers(plan_.use_prefix ? plan_.prefix : PyramidPrefixPlan(0, 0, 1.0), plan_.use_prefix ? B : 0) {}
  void operator()(const F* in, F* out, int64_t B) {
    if (plan.use_prefix)
      pyramid_correlate_prefix(plan.prefix, buffers, in, out, B);
    else
      pyramid_correlate(plan.stencil, in, out, B);
  }
};

}  // namespace fastexplain
