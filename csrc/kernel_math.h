// Shared numerics for the fastexplain CPU kernels (SPEC §1–2): a vectorisable expm1, the entropy term
// f(u) = u·e^u − expm1(u) and the L1-pyramid correlation of the part templates.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <utility>
#include <vector>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace fastexplain {

#if defined(__AVX512F__)
// A 16×16 float tile transposed in registers: dst[k][j] = rows[j][k] for row pointers rows[0 … 15] and destination
// rows dst + k·dst_stride (four shuffle stages, 64 shuffles for 256 values instead of 256 scalar moves).
inline void transpose16x16(const float* const* rows, float* dst, int64_t dst_stride) {
  __m512 r[16], t[16];
  for (int i = 0; i < 16; ++i) r[i] = _mm512_loadu_ps(rows[i]);
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
  for (int i = 0; i < 4; ++i) {
    r[4 * i] = _mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(t[4 * i]), _mm512_castps_pd(t[4 * i + 2])));
    r[4 * i + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(t[4 * i]), _mm512_castps_pd(t[4 * i + 2])));
    r[4 * i + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(t[4 * i + 1]), _mm512_castps_pd(t[4 * i + 3])));
    r[4 * i + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(t[4 * i + 1]), _mm512_castps_pd(t[4 * i + 3])));
  }
  for (int i = 0; i < 2; ++i)
    for (int j = 0; j < 4; ++j) {
      t[8 * i + j] = _mm512_shuffle_f32x4(r[8 * i + j], r[8 * i + j + 4], 0x88);
      t[8 * i + j + 4] = _mm512_shuffle_f32x4(r[8 * i + j], r[8 * i + j + 4], 0xdd);
    }
  for (int j = 0; j < 8; ++j) {
    r[j] = _mm512_shuffle_f32x4(t[j], t[j + 8], 0x88);
    r[j + 8] = _mm512_shuffle_f32x4(t[j], t[j + 8], 0xdd);
  }
  for (int i = 0; i < 16; ++i) _mm512_storeu_ps(dst + i * dst_stride, r[i]);
}
#endif

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

// The same expm1 and entropy term on 16 floats at once (GCC vector extensions), for the per-template loops over the
// batch: written with explicit vector accumulators, their reductions are one tree per template instead of the
// scalar epilogue `omp simd reduction` leaves. Bit-identical to the scalar forms lane by lane (same operations).
typedef float Float16 __attribute__((vector_size(64)));
typedef int32_t Int16 __attribute__((vector_size(64)));

inline Float16 splat16(float value) { return Float16{} + value; }

// Whether every lane of a vector comparison's result (−1 true, 0 false per lane) is true.
template <typename Mask>
inline bool all_lanes16(Mask mask) {
  int32_t lanes[16];
  std::memcpy(lanes, &mask, sizeof(lanes));
  int32_t all = -1;
  for (int l = 0; l < 16; ++l) all &= lanes[l];
  return all == -1;
}

// Whether some lane of a vector comparison's result is true.
template <typename Mask>
inline bool any_lanes16(Mask mask) {
  int32_t lanes[16];
  std::memcpy(lanes, &mask, sizeof(lanes));
  int32_t any = 0;
  for (int l = 0; l < 16; ++l) any |= lanes[l];
  return any != 0;
}

inline Float16 load16(const float* p) {
  Float16 v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
inline void store16(float* p, Float16 v) { std::memcpy(p, &v, sizeof(v)); }

// Horizontal sum/max of one vector: a shuffle tree with AVX-512 (4 levels) instead of 15 dependent scalar adds.
inline float sum16(Float16 v) {
#if defined(__AVX512F__)
  return _mm512_reduce_add_ps(reinterpret_cast<__m512&>(v));
#else
  float lanes[16];
  std::memcpy(lanes, &v, sizeof(v));
  float total = 0.0f;
  for (int i = 0; i < 16; ++i) total += lanes[i];
  return total;
#endif
}
inline float max16(Float16 v) {
#if defined(__AVX512F__)
  return _mm512_reduce_max_ps(reinterpret_cast<__m512&>(v));
#endif
  float lanes[16];
  std::memcpy(lanes, &v, sizeof(v));
  float best = lanes[0];
  for (int i = 1; i < 16; ++i) best = lanes[i] > best ? lanes[i] : best;
  return best;
}

inline Float16 expm1_16(Float16 x) {
  using T = ExpTraits<float>;
  x = x < splat16(T::lo) ? splat16(T::lo) : x;
  x = x > splat16(T::hi) ? splat16(T::hi) : x;
  const Float16 k = (x * 1.4426950408889634f + T::round_magic) - T::round_magic;
  const Float16 r = (x - k * T::ln2_hi) - k * T::ln2_lo;
  Float16 poly = Float16{};
  float inverse_factorial = 1.0f;
  for (int j = 2; j <= T::taylor_degree; ++j) inverse_factorial /= float(j);
  float coefficient = inverse_factorial;
  for (int j = T::taylor_degree; j >= 1; --j) {
    poly = poly * r + coefficient;
    coefficient *= float(j);
  }
  poly *= r;
  const Int16 bits = (__builtin_convertvector(k, Int16) + T::bias) << T::mantissa_bits;
  const Float16 two_k = reinterpret_cast<const Float16&>(bits);
  return two_k * poly + (two_k - 1.0f);
}

// log1p on 16 floats, for the per-template log-means and the per-image mixtures of the filter loss (std::log1pf was
// one scalar call per template and per image, ~8% of the kernel). y = 1 + m is split as 2^k·f with f in [√½, √2)
// (musl's logf reduction), log f = 2·atanh(s), s = (f − 1)/(f + 1), by its odd series to s⁹ (|s| ≤ 0.172: the
// next term is below 1e-9 of log f), plus the rounding of 1 + m, (m − (y − 1))/y. A few ulp for finite m > −1;
// lanes outside that range (m ≤ −1, ±Inf, NaN) are recomputed with std::log1p, so the result matches it there.
inline Float16 log1p16(Float16 m) {
  const auto regular = (m > -1.0f) & (m < 3.0e38f);
  const Float16 safe_m = regular ? m : Float16{};
  const Float16 safe_y = 1.0f + safe_m;
  const Float16 correction = (safe_m - (safe_y - 1.0f)) / safe_y;
  const Int16 bits = reinterpret_cast<const Int16&>(safe_y) + (0x3f800000 - 0x3f3504f3);
  const Int16 k = (bits >> 23) - 127;
  const Int16 f_bits = (bits & 0x007fffff) + 0x3f3504f3;
  const Float16 f = reinterpret_cast<const Float16&>(f_bits);
  const Float16 s = (f - 1.0f) / (f + 1.0f);
  const Float16 s2 = s * s;
  const Float16 odd = s2 * (2.0f / 3 + s2 * (2.0f / 5 + s2 * (2.0f / 7 + s2 * (2.0f / 9))));
  const Float16 kf = __builtin_convertvector(k, Float16);
  const Float16 result = kf * 0.693145751953125f + ((2.0f * s + s * odd) + (kf * 1.42860682030941723212e-6f + correction));
  if (__builtin_expect(!all_lanes16(regular), 0)) {
    float lanes[16], inputs[16];
    std::memcpy(lanes, &result, sizeof(result));
    std::memcpy(inputs, &m, sizeof(m));
    for (int l = 0; l < 16; ++l)
      if (!(inputs[l] > -1.0f && inputs[l] < 3.0e38f)) lanes[l] = std::log1p(inputs[l]);
    Float16 fixed;
    std::memcpy(&fixed, lanes, sizeof(fixed));
    return fixed;
  }
  return result;
}

inline Float16 entropy_term16(Float16 u, Float16 w) {
  constexpr double c[12] = {12.0 / 6227020800.0, 11.0 / 479001600.0, 10.0 / 39916800.0, 9.0 / 3628800.0,
                            8.0 / 362880.0, 7.0 / 40320.0, 6.0 / 5040.0, 5.0 / 720.0, 4.0 / 120.0,
                            3.0 / 24.0, 2.0 / 6.0, 1.0 / 2.0};
  const Float16 magnitude = u < 0.0f ? -u : u;
  const auto small = magnitude < 0.5f;
  const Float16 us = small ? u : Float16{};
  Float16 series = Float16{};
  for (int j = 0; j < 12; ++j) series = (series + float(c[j])) * us;
  series *= us;
  const Float16 direct = u * (1.0f + w) - w;
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
// The prefix sums are stored on the map only (no padding): a lookup outside the map is clamped to the last
// position inside the map on the same column/diagonal before it, or dropped when there is none. The plan turns
// every z value into a short list of (position in the prefix buffer, coefficient) terms, once per call.
struct PyramidPrefixPlan {
  int64_t H, W, C0, z_width;
  double f;
  std::vector<int64_t> term_start;  // [H·z_width + 1]
  std::vector<int64_t> term_source; // row of the [4·HW][B] buffer: X, column, diagonal (+1,+1), diagonal (+1,−1)
  std::vector<double> term_weight;
  std::vector<float> term_weight_float;  // the same, rounded once for float32 kernels

  template <typename F>
  const F* weights() const {
    if constexpr (std::is_same_v<F, float>) return term_weight_float.data();
    else return term_weight.data();
  }

  enum Array : int64_t { kX = 0, kColumn = 1, kDown = 2, kUp = 3 };

  // The buffer row holding array(r, c) after clamping, or −1 when the lookup is zero.
  int64_t lookup(Array array, int64_t r, int64_t c) const {
    const int64_t HW = H * W;
    if (array == kX) return (r >= 0 && r < H && c >= 0 && c < W) ? r * W + c : -1;
    if (array == kColumn) return (c >= 0 && c < W && r >= 0) ? HW + std::min(r, H - 1) * W + c : -1;
    if (array == kDown) {  // Σ_j X(r − j, c − j)
      const int64_t d = c - r;
      if (d < -(H - 1) || d > W - 1) return -1;
      const int64_t r_min = std::max<int64_t>(0, -d), r_max = std::min(H - 1, W - 1 - d);
      if (r < r_min) return -1;
      const int64_t rr = std::min(r, r_max);
      return 2 * HW + rr * W + rr + d;
    }
    const int64_t s = r + c;  // kUp: Σ_j X(r − j, c + j)
    if (s < 0 || s > H + W - 2) return -1;
    const int64_t r_min = std::max<int64_t>(0, s - (W - 1)), r_max = std::min(H - 1, s);
    if (r < r_min) return -1;
    const int64_t rr = std::min(r, r_max);
    return 3 * HW + rr * W + s - rr;
  }

  PyramidPrefixPlan(int64_t H_, int64_t W_, double beta) : H(H_), W(W_) {
    const double radius = 2.0 * static_cast<double>(H > W ? H : W) / beta;
    C0 = static_cast<int64_t>(std::ceil(radius)) - 1;
    f = radius - static_cast<double>(C0);
    z_width = W + C0;  // z for columns −C0−1 … W−2 give y for columns −C0 … W−1
    if (H == 0) return;
    term_start.push_back(0);
    std::vector<std::pair<int64_t, double>> terms;
    auto add = [&](Array array, int64_t r, int64_t c, double weight) {
      const int64_t source = lookup(array, r, c);
      if (source >= 0) terms.emplace_back(source, weight);
    };
    for (int64_t r = 0; r < H; ++r)
      for (int64_t zc = 0; zc < z_width; ++zc) {
        const int64_t c = zc - C0 - 1;
        terms.clear();
        add(kColumn, r + C0, c, -2.0);
        add(kColumn, r - C0 - 1, c, 2.0);
        for (int pass = 0; pass < 2; ++pass) {
          const int64_t k = C0 + pass;
          const double weight = pass == 0 ? 1.0 - f : f;
          if (weight == 0.0) continue;
          const double apex_sign = pass == 0 ? 1.0 : -1.0;
          if (k == 0) {  // ring_0 + apex_0 = 2·x(μ)
            add(kX, r, c, 2.0 * weight);
            continue;
          }
          add(kDown, r, c + k, weight);
          add(kDown, r - k - 1, c - 1, -weight);
          add(kDown, r + k, c, weight);
          add(kDown, r - 1, c - k - 1, -weight);
          add(kUp, r - 1, c - k + 1, weight);
          add(kUp, r - k, c, -weight);
          add(kUp, r + k - 1, c + 1, weight);
          add(kUp, r, c + k, -weight);
          add(kX, r - k, c, apex_sign * weight);
          add(kX, r + k, c, apex_sign * weight);
        }
        // Merge lookups clamped onto the same position; drop those that cancel.
        std::sort(terms.begin(), terms.end());
        for (size_t i = 0; i < terms.size();) {
          double weight = 0.0;
          size_t j = i;
          for (; j < terms.size() && terms[j].first == terms[i].first; ++j) weight += terms[j].second;
          if (weight != 0.0) {
            term_source.push_back(terms[i].first);
            term_weight.push_back(weight);
          }
          i = j;
        }
        term_start.push_back(static_cast<int64_t>(term_source.size()));
      }
    term_weight_float.assign(term_weight.begin(), term_weight.end());
  }
  // Vector operations per call, to choose between this plan and the direct stencil.
  double cost_per_call() const {
    return 4.0 * static_cast<double>(H * W) + static_cast<double>(term_source.size()) +
           2.0 * static_cast<double>(H * z_width);
  }
};

// The rows of the prefix-sum correlation for NV·(64 bytes) images starting at X/out: z from its terms, then the
// two running prefix sums along the row (slope = Σ z, y = Σ slope), all accumulated in vector registers.
template <typename F, int NV>
inline void prefix_rows_block(const PyramidPrefixPlan& p, const F* X, F* out, int64_t B) {
  typedef F Vec __attribute__((vector_size(64)));
  constexpr int64_t lanes = 64 / sizeof(F);
  const int64_t* __restrict start = p.term_start.data();
  const int64_t* __restrict source = p.term_source.data();
  const F* __restrict weight = p.weights<F>();
  for (int64_t r = 0; r < p.H; ++r) {
    // g(c + 1) = Σ_{c' ≤ c} z(c') with g(c) = y(c) − y(c − 1); y(c) = Σ_{c' ≤ c} g(c'); y = g = 0 at column −C0 − 1.
    Vec slope[NV], value[NV];
    for (int v = 0; v < NV; ++v) slope[v] = value[v] = Vec{};
    for (int64_t zc = 0; zc < p.z_width; ++zc) {
      const int64_t entry = r * p.z_width + zc;
      // Two accumulators per vector (even and odd terms) halve the FMA dependency chain.
      Vec even[NV], odd[NV];
      for (int v = 0; v < NV; ++v) even[v] = odd[v] = Vec{};
      int64_t e = start[entry];
      const int64_t e_end = start[entry + 1];
      for (; e + 1 < e_end; e += 2) {
        const F w0 = weight[e], w1 = weight[e + 1];
        const F* src0 = X + source[e] * B;
        const F* src1 = X + source[e + 1] * B;
        for (int v = 0; v < NV; ++v) {
          Vec x0, x1;
          std::memcpy(&x0, src0 + v * lanes, sizeof(Vec));
          std::memcpy(&x1, src1 + v * lanes, sizeof(Vec));
          even[v] += w0 * x0;
          odd[v] += w1 * x1;
        }
      }
      if (e < e_end) {
        const F w0 = weight[e];
        const F* src0 = X + source[e] * B;
        for (int v = 0; v < NV; ++v) {
          Vec x0;
          std::memcpy(&x0, src0 + v * lanes, sizeof(Vec));
          even[v] += w0 * x0;
        }
      }
      for (int v = 0; v < NV; ++v) slope[v] += even[v] + odd[v];
      for (int v = 0; v < NV; ++v) value[v] += slope[v];
      const int64_t c = zc - p.C0;  // value now holds y(c) for c = (column of z) + 1
      if (c >= 0)
        for (int v = 0; v < NV; ++v) std::memcpy(out + (r * p.W + c) * B + v * lanes, &value[v], sizeof(Vec));
    }
  }
}

template <typename F>
struct PyramidPrefixBuffers;

// The same for the images b0 … B−1 that do not fill a vector, with scalar-width loops.
template <typename F>
inline void prefix_rows_tail(const PyramidPrefixPlan& p, PyramidPrefixBuffers<F>& buf, const F* X, F* out,
                             int64_t b0, int64_t B) {
  const int64_t* __restrict start = p.term_start.data();
  const int64_t* __restrict source = p.term_source.data();
  const double* __restrict weight = p.term_weight.data();
  F* __restrict slope = buf.slope.data();
  F* __restrict value = buf.value.data();
  for (int64_t r = 0; r < p.H; ++r) {
    std::fill(slope + b0, slope + B, F(0));
    std::fill(value + b0, value + B, F(0));
    for (int64_t zc = 0; zc < p.z_width; ++zc) {
      const int64_t entry = r * p.z_width + zc;
      for (int64_t e = start[entry]; e < start[entry + 1]; ++e) {
        const F w = static_cast<F>(weight[e]);
        const F* __restrict src = X + source[e] * B;
        for (int64_t b = b0; b < B; ++b) slope[b] += w * src[b];
      }
      for (int64_t b = b0; b < B; ++b) value[b] += slope[b];
      const int64_t c = zc - p.C0;
      if (c >= 0) std::copy(value + b0, value + B, out + (r * p.W + c) * B + b0);
    }
  }
}

template <typename F>
struct PyramidPrefixBuffers {
  std::vector<F> prefix, slope, value;
  PyramidPrefixBuffers(const PyramidPrefixPlan& p, int64_t B) : prefix(4 * p.H * p.W * B), slope(B), value(B) {}
};

template <typename F>
inline void pyramid_correlate_prefix(const PyramidPrefixPlan& p, PyramidPrefixBuffers<F>& buf, const F* in, F* out,
                                     int64_t B) {
  const int64_t H = p.H, W = p.W, HW = H * W;
  F* X = buf.prefix.data();
  F* Col = X + HW * B;
  F* D1 = X + 2 * HW * B;  // along (+1, +1)
  F* D2 = X + 3 * HW * B;  // along (+1, −1)
  std::copy(in, in + HW * B, X);
  for (int64_t r = 0; r < H; ++r)
    for (int64_t c = 0; c < W; ++c) {
      const int64_t i = r * W + c;
      const F* __restrict x = X + i * B;
      F* __restrict col = Col + i * B;
      F* __restrict d1 = D1 + i * B;
      F* __restrict d2 = D2 + i * B;
      if (r == 0) {
        std::copy(x, x + B, col);
        std::copy(x, x + B, d1);
        std::copy(x, x + B, d2);
        continue;
      }
      const F* __restrict col_up = Col + (i - W) * B;
#pragma omp simd
      for (int64_t b = 0; b < B; ++b) col[b] = x[b] + col_up[b];
      if (c > 0) {
        const F* __restrict d1_up = D1 + (i - W - 1) * B;
#pragma omp simd
        for (int64_t b = 0; b < B; ++b) d1[b] = x[b] + d1_up[b];
      } else {
        std::copy(x, x + B, d1);
      }
      if (c + 1 < W) {
        const F* __restrict d2_up = D2 + (i - W + 1) * B;
#pragma omp simd
        for (int64_t b = 0; b < B; ++b) d2[b] = x[b] + d2_up[b];
      } else {
        std::copy(x, x + B, d2);
      }
    }
  int64_t b0 = 0;
  constexpr int64_t lanes = 64 / sizeof(F);
  for (; b0 + 4 * lanes <= B; b0 += 4 * lanes) prefix_rows_block<F, 4>(p, X + b0, out + b0, B);
  for (; b0 + 2 * lanes <= B; b0 += 2 * lanes) prefix_rows_block<F, 2>(p, X + b0, out + b0, B);
  for (; b0 + lanes <= B; b0 += lanes) prefix_rows_block<F, 1>(p, X + b0, out + b0, B);
  if (b0 < B) prefix_rows_tail(p, buf, X, out, b0, B);
}

// Relative cost of one prefix-sum term and one direct-stencil FMA (measured, see choose_prefix).
constexpr double kPrefixCostFactor = 1.5;

// Which correlation a call uses: 0 = automatic (fewer estimated operations), 1 = direct stencil, 2 = prefix sums.
struct PyramidPlan {
  PyramidPrefixPlan prefix;
  bool use_prefix;
  PyramidStencil stencil;

  static bool choose_prefix(const PyramidPrefixPlan& plan, int64_t method) {
    if (method != 0) return method == 2;
    const int64_t HW = plan.H * plan.W;
    const double diamond = 1.0 + 2.0 * static_cast<double>(plan.C0) * static_cast<double>(plan.C0 + 1);
    const double direct = static_cast<double>(HW) * std::min(diamond, static_cast<double>(HW));
    // Measured (one core, fwd+bwd, β = 4): 14×14 prefix 1.9× faster than direct (model: 3×), 7×7 direct ≈1.2× faster,
    // 28×28 prefix 6× faster: a prefix term costs ≈1.5 stencil FMAs.
    return kPrefixCostFactor * plan.cost_per_call() < direct;
  }
  PyramidPlan(int64_t H, int64_t W, double beta, int64_t method = 0)
      : prefix(H, W, beta), use_prefix(choose_prefix(prefix, method)),
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
