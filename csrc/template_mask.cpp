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
#if defined(__SSE__)
#include <xmmintrin.h>
#endif

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

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

// One pass over a map's raw values: returns the maximum of relu?(x) and sets nonfinite when a value is NaN or ±Inf
// (x·0 is NaN exactly for those).
template <typename F>
inline F check_and_max(const F* map, int64_t n, bool relu, bool& nonfinite) {
  // Both reductions are exact in any order (a NaN sum stays NaN, max is associative), so omp simd may split them
  // across vector lanes held in registers.
  F poison = F(0), best = relu ? F(0) : map[0];
#pragma omp simd reduction(+ : poison) reduction(max : best)
  for (int64_t i = 0; i < n; ++i) {
    const F raw = map[i];
    poison += raw * F(0);
    const F value = relu ? (raw > F(0) ? raw : F(0)) : raw;
    best = value > best ? value : best;
  }
  nonfinite = poison != poison;
  return best;
}

// The first position where found(map[i]) holds (it holds somewhere): a min-reduction over vector lanes.
template <typename F, typename Predicate>
inline __attribute__((always_inline)) int64_t first_position(const F* map, int64_t n, Predicate found) {
  int32_t first = static_cast<int32_t>(n);
#pragma omp simd reduction(min : first)
  for (int32_t i = 0; i < static_cast<int32_t>(n); ++i)
    if (found(map[i])) first = i < first ? i : first;
  return first;
}

// The map's values in the compute type: the input itself when it is already dense and of that type, otherwise a
// converted copy in buffer.
template <typename scalar_t, typename F>
inline const F* image_values(const scalar_t* image, const MaskGeometry& g, F* buffer) {
  if constexpr (std::is_same_v<F, scalar_t>)
    if (g.dense_maps) return image;
  if (g.dense_maps) {
    for (int64_t i = 0; i < g.HW; ++i) buffer[i] = static_cast<F>(image[i]);
  } else {
    for (int64_t r = 0; r < g.H; ++r)
      for (int64_t c = 0; c < g.W; ++c) buffer[r * g.W + c] = static_cast<F>(image[r * g.sH + c * g.sW]);
  }
  return buffer;
}

// μ̂ of one (ReLU'd) map: first maximum in row-major order, or the activation-weighted centroid rounded half up
// and clamped to the grid (all-zero or non-positive total → 0), as in reference.peak_indices.
template <typename F>
inline __attribute__((always_inline)) int64_t peak_index(const F* map, F best_value, const MaskGeometry& g, bool centroid, bool relu) {
  if (!centroid) {  // the first maximum of relu?(x) in row-major order
    if (relu && !(best_value > F(0))) return first_position(map, g.HW, [](F raw) { return !(raw > F(0)); });
    return first_position(map, g.HW, [best_value](F raw) { return raw == best_value; });
  }
  double total = 0.0, row_moment = 0.0, col_moment = 0.0;
  for (int64_t r = 0; r < g.H; ++r) {
    double row_total = 0.0;
#pragma omp simd reduction(+ : row_total, col_moment)
    for (int64_t c = 0; c < g.W; ++c) {
      const F raw = map[r * g.W + c];
      const double value = static_cast<double>(relu ? (raw > F(0) ? raw : F(0)) : raw);
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
// Row by row: the column distances |c − μ̂_c| once per map, then one integer add, a conversion and the clamp per
// position (the same float operations as the formula above, so bit-identical to the table).
template <typename F>
inline void mask_at(F* mask, int64_t peak, double beta, const MaskGeometry& g) {
  const F slope = static_cast<F>(beta * g.inverse_n), scale = static_cast<F>(g.scale);
  const int32_t peak_r = static_cast<int32_t>(peak / g.W), peak_c = static_cast<int32_t>(peak % g.W);
  int32_t column_distance_stack[256];
  std::vector<int32_t> column_distance_heap(g.W > 256 ? g.W : 0);
  int32_t* __restrict column_distance = g.W > 256 ? column_distance_heap.data() : column_distance_stack;
  for (int32_t c = 0; c < static_cast<int32_t>(g.W); ++c) column_distance[c] = std::abs(c - peak_c);
  for (int32_t r = 0; r < static_cast<int32_t>(g.H); ++r) {
    const int32_t row_distance = std::abs(r - peak_r);
    F* __restrict out = mask + static_cast<int64_t>(r) * g.W;
#pragma omp simd
    for (int32_t c = 0; c < static_cast<int32_t>(g.W); ++c) {
      const F d = static_cast<F>(row_distance + column_distance[c]);
      out[c] = std::max(F(1) - slope * d, F(-1)) * scale;
    }
  }
}

// The masks of every possible peak, precomputed once per call for small maps (≤ kMaskTableMaxPositions positions,
// a table of HW² values), so that the per-map loops are a plain vectorised product; larger maps compute theirs.
constexpr int64_t kMaskTableMaxPositions = 256;

template <typename F>
struct MaskSource {
  const MaskGeometry& g;
  double beta;
  std::vector<F> table;
  MaskSource(const MaskGeometry& g_, double beta_) : g(g_), beta(beta_) {
    if (g.HW > kMaskTableMaxPositions) return;
    table.resize(g.HW * g.HW);
    for (int64_t peak = 0; peak < g.HW; ++peak) mask_at(table.data() + peak * g.HW, peak, beta, g);
  }
  // The mask of a map with this peak: a row of the table, or computed into buffer.
  const F* operator()(int64_t peak, F* buffer) const {
    if (!table.empty()) return table.data() + peak * g.HW;
    mask_at(buffer, peak, beta, g);
    return buffer;
  }
};

// The maps begin … end−1 (flat index b·C + c) of the forward pass, specialised on the ReLU.
template <bool kRelu, typename scalar_t, typename F>
void forward_maps(const scalar_t* x_data, const MaskGeometry& g, const MaskSource<F>& masks, bool centroid,
                  int64_t begin, int64_t end, scalar_t* y_data, int64_t* peak_data, std::atomic<bool>& found_nonfinite) {
  std::vector<F> map_buffer(g.HW), mask_buffer(masks.table.empty() ? g.HW : 0);
  int64_t b = begin / g.C, c = begin % g.C;
  for (int64_t bc = begin; bc < end; ++bc, ++c) {
    if (c == g.C) {
      c = 0;
      ++b;
    }
    const F* __restrict map = image_values(x_data + b * g.sB + c * g.sC, g, map_buffer.data());
    bool nonfinite = false;
    const F best_value = check_and_max(map, g.HW, kRelu, nonfinite);
    if (nonfinite) {
      found_nonfinite = true;
      continue;
    }
    const int64_t peak = peak_index(map, best_value, g, centroid, kRelu);
    peak_data[bc] = peak;
    const F* __restrict mask = masks(peak, mask_buffer.data());
    scalar_t* __restrict out = y_data + bc * g.HW;
    for (int64_t i = 0; i < g.HW; ++i) {
      const F value = kRelu ? (map[i] > F(0) ? map[i] : F(0)) : map[i];
      out[i] = static_cast<scalar_t>(std::max(value * mask[i], F(0)));
    }
  }
}

// Where one tensor's maps live: strides of an [B, C, H, W] tensor and whether every map is one dense row-major block.
struct MapLayout {
  int64_t sB, sC, sH, sW;
  bool dense;
  MapLayout(const at::Tensor& t)
      : sB(t.stride(0)), sC(t.stride(1)), sH(t.stride(2)), sW(t.stride(3)),
        dense((t.size(3) == 1 || t.stride(3) == 1) && (t.size(2) == 1 || t.stride(2) == t.size(3))) {}
  int64_t offset(int64_t b, int64_t c) const { return b * sB + c * sC; }
};

// The kept positions of the masked output, 1[relu?(x)·m > 0], packed 16 per uint16 word along the row-major map
// (kWordBits bits, the map padded to whole words): all the backward pass needs besides the peak (1/32 of the
// tensor's bytes for float32, instead of saving x).
constexpr int64_t kWordBits = 16;
inline int64_t words_per_map(int64_t HW) { return (HW + kWordBits - 1) / kWordBits; }

// y = max(relu?(x)·m, 0) of one map into a dense output row and its keep bits. AVX-512 for float32, else scalar.
template <bool kRelu, typename scalar_t, typename F>
inline void masked_row(const F* __restrict map, const F* __restrict mask, int64_t HW, scalar_t* __restrict out,
                       uint16_t* __restrict keep) {
#if defined(__AVX512F__)
  if constexpr (std::is_same_v<scalar_t, float> && std::is_same_v<F, float>) {
    const __m512 zero = _mm512_setzero_ps();
    for (int64_t k = 0; k * kWordBits < HW; ++k) {
      const int64_t i = k * kWordBits;
      const __mmask16 lanes = HW - i >= kWordBits ? __mmask16(0xFFFF) : __mmask16((1u << (HW - i)) - 1u);
      __m512 value = _mm512_maskz_loadu_ps(lanes, map + i);
      if constexpr (kRelu) value = _mm512_max_ps(value, zero);
      const __m512 product = _mm512_mul_ps(value, _mm512_maskz_loadu_ps(lanes, mask + i));
      const __mmask16 kept = _mm512_mask_cmp_ps_mask(lanes, product, zero, _CMP_GT_OQ);
      _mm512_mask_storeu_ps(out + i, lanes, _mm512_maskz_mov_ps(kept, product));
      keep[k] = static_cast<uint16_t>(kept);
    }
    return;
  }
#endif
  for (int64_t k = 0; k * kWordBits < HW; ++k) {
    const int64_t i0 = k * kWordBits, i1 = std::min(HW, i0 + kWordBits);
    uint32_t word = 0;
    for (int64_t i = i0; i < i1; ++i) {
      const F value = kRelu ? (map[i] > F(0) ? map[i] : F(0)) : map[i];
      const F product = value * mask[i];
      const bool kept = product > F(0);
      out[i] = static_cast<scalar_t>(kept ? product : F(0));
      word |= static_cast<uint32_t>(kept) << (i - i0);
    }
    keep[k] = static_cast<uint16_t>(word);
  }
}

// dx = grad_y·m where the keep bit is set, else 0, for one map (dense rows).
template <typename scalar_t, typename F>
inline void masked_grad_row(const scalar_t* __restrict grad, const F* __restrict mask, const uint16_t* __restrict keep,
                            int64_t HW, scalar_t* __restrict dx) {
#if defined(__AVX512F__)
  if constexpr (std::is_same_v<scalar_t, float> && std::is_same_v<F, float>) {
    for (int64_t k = 0; k * kWordBits < HW; ++k) {
      const int64_t i = k * kWordBits;
      const __mmask16 lanes = HW - i >= kWordBits ? __mmask16(0xFFFF) : __mmask16((1u << (HW - i)) - 1u);
      const __mmask16 kept = static_cast<__mmask16>(keep[k]) & lanes;
      const __m512 product = _mm512_maskz_mul_ps(kept, _mm512_maskz_loadu_ps(kept, grad + i),
                                                 _mm512_maskz_loadu_ps(kept, mask + i));
      _mm512_mask_storeu_ps(dx + i, lanes, product);
    }
    return;
  }
#endif
  for (int64_t i = 0; i < HW; ++i) {
    const bool kept = (keep[i / kWordBits] >> (i % kWordBits)) & 1u;
    dx[i] = static_cast<scalar_t>(kept ? static_cast<F>(grad[i]) * mask[i] : F(0));
  }
}

#if defined(__AVX512F__)
// NaN/Inf check and first argmax of relu?(x) in one AVX-512 pass over a float map: every lane keeps its own first
// maximum (strict >), then the lowest position among the lanes holding the overall maximum wins (row-major ties).
template <bool kRelu>
inline int64_t check_and_argmax_avx512(const float* map, int64_t HW, bool& nonfinite) {
  const __m512 zero = _mm512_setzero_ps();
  __m512 best = _mm512_set1_ps(kRelu ? -1.0f : -INFINITY), poison = zero;
  __m512i best_index = _mm512_setzero_si512();
  __m512i index = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  const __m512i step = _mm512_set1_epi32(16);
  for (int64_t i = 0; i < HW; i += 16) {
    const __mmask16 lanes = HW - i >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (HW - i)) - 1u);
    __m512 value = _mm512_maskz_loadu_ps(lanes, map + i);
    poison = _mm512_add_ps(poison, _mm512_mul_ps(value, zero));
    if constexpr (kRelu) value = _mm512_max_ps(value, zero);
    const __mmask16 better = _mm512_mask_cmp_ps_mask(lanes, value, best, _CMP_GT_OQ);
    best = _mm512_mask_mov_ps(best, better, value);
    best_index = _mm512_mask_mov_epi32(best_index, better, index);
    index = _mm512_add_epi32(index, step);
  }
  nonfinite = _mm512_cmp_ps_mask(poison, poison, _CMP_UNORD_Q) != 0;
  const float top = _mm512_reduce_max_ps(best);
  const __mmask16 holders = _mm512_cmp_ps_mask(best, _mm512_set1_ps(top), _CMP_EQ_OQ);
  return _mm512_mask_reduce_min_epi32(holders, best_index);
}
#endif

// Software prefetch of the map `ahead` maps after bc when the maps lie one after another in memory (dense
// NCHW): the per-map work (peak search, then the masked row) is a dependent chain that leaves the hardware
// prefetcher too little lead when the tensor streams from DRAM.
template <typename T>
inline void prefetch_map(const T* base, int64_t bc, int64_t ahead, int64_t end, int64_t map_stride, int64_t HW) {
#if defined(__SSE__)
  if (bc + ahead >= end) return;
  const char* p = reinterpret_cast<const char*>(base + (bc + ahead) * map_stride);
  for (int64_t byte = 0; byte < HW * int64_t(sizeof(T)); byte += 64) _mm_prefetch(p + byte, _MM_HINT_T0);
#endif
}

// The maps begin … end−1 (flat index b·C + c) of the bit-mask forward pass: y in y's layout, peaks, keep bits.
template <bool kRelu, typename scalar_t, typename F>
void forward_maps_bits(const scalar_t* x_data, const MaskGeometry& g, const MaskSource<F>& masks, bool centroid,
                       int64_t begin, int64_t end, scalar_t* y_data, const MapLayout& y_layout, int64_t* peak_data,
                       uint16_t* keep_data, std::atomic<bool>& found_nonfinite) {
  const int64_t words = words_per_map(g.HW);
  std::vector<F> map_buffer(g.HW), mask_buffer(masks.table.empty() ? g.HW : 0);
  std::vector<scalar_t> out_buffer(y_layout.dense ? 0 : g.HW);
  const bool sequential_maps = g.dense_maps && g.sC == g.HW && g.sB == g.C * g.HW;
  int64_t b = begin / g.C, c = begin % g.C;
  for (int64_t bc = begin; bc < end; ++bc, ++c) {
    if (c == g.C) {
      c = 0;
      ++b;
    }
    if (sequential_maps) prefetch_map(x_data, bc, 2, end, g.sC, g.HW);
    const F* __restrict map = image_values(x_data + b * g.sB + c * g.sC, g, map_buffer.data());
    bool nonfinite = false;
    int64_t peak = 0;
#if defined(__AVX512F__)
    if constexpr (std::is_same_v<F, float>) {
      if (!centroid && g.HW < (int64_t(1) << 30)) peak = check_and_argmax_avx512<kRelu>(map, g.HW, nonfinite);
    }
    const bool fused_peak = std::is_same_v<F, float> && !centroid;
#else
    const bool fused_peak = false;
#endif
    if (!fused_peak) {
      const F best_value = check_and_max(map, g.HW, kRelu, nonfinite);
      if (!nonfinite) peak = peak_index(map, best_value, g, centroid, kRelu);
    }
    if (nonfinite) {
      found_nonfinite = true;
      continue;
    }
    peak_data[bc] = peak;
    const F* __restrict mask = masks(peak, mask_buffer.data());
    scalar_t* out = y_layout.dense ? y_data + y_layout.offset(b, c) : out_buffer.data();
    masked_row<kRelu>(map, mask, g.HW, out, keep_data + bc * words);
    if (!y_layout.dense) {
      scalar_t* target = y_data + y_layout.offset(b, c);
      for (int64_t r = 0; r < g.H; ++r)
        for (int64_t col = 0; col < g.W; ++col) target[r * y_layout.sH + col * y_layout.sW] = out[r * g.W + col];
    }
  }
}

template <typename scalar_t>
std::tuple<at::Tensor, at::Tensor, at::Tensor> forward_bits_typed(const at::Tensor& x, double beta, bool centroid,
                                                                  bool tau_scale, bool relu) {
  using F = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
  const MaskGeometry g(x, tau_scale);
  // The output keeps x's memory format (channels_last in, channels_last out), as the reference's x·m does.
  at::Tensor y = at::empty_like(x, at::MemoryFormat::Preserve);
  const MapLayout y_layout(y);
  at::Tensor peaks = at::empty({g.B, g.C}, x.options().dtype(at::kLong));
  at::Tensor keep = at::empty({g.B, g.C, words_per_map(g.HW)}, x.options().dtype(at::kShort));
  const scalar_t* x_data = x.const_data_ptr<scalar_t>();
  scalar_t* y_data = y.data_ptr<scalar_t>();
  int64_t* peak_data = peaks.data_ptr<int64_t>();
  uint16_t* keep_data = reinterpret_cast<uint16_t*>(keep.data_ptr<int16_t>());
  std::atomic<bool> found_nonfinite{false};
  const MaskSource<F> masks(g, beta);
  at::parallel_for(0, g.B * g.C, 16, [&](int64_t begin, int64_t end) {
    if (relu)
      forward_maps_bits<true>(x_data, g, masks, centroid, begin, end, y_data, y_layout, peak_data, keep_data,
                              found_nonfinite);
    else
      forward_maps_bits<false>(x_data, g, masks, centroid, begin, end, y_data, y_layout, peak_data, keep_data,
                               found_nonfinite);
  });
  TORCH_CHECK_VALUE(!found_nonfinite.load(), op_name(relu),
                    ": the input contains NaN or Inf; check the layer that produced it (or lower the learning rate)");
  return {y, peaks, keep};
}

// dx = grad_y · m where the forward pass kept the position (relu?(x)·m > 0), else 0 (SPEC §3); dx takes grad_y's
// memory format. Reads grad_y, the peaks and the bits: x is not needed.
template <typename scalar_t>
at::Tensor backward_bits_typed(const at::Tensor& grad_y, const at::Tensor& peaks, const at::Tensor& keep, double beta,
                               bool tau_scale) {
  using F = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
  const MaskGeometry g(grad_y, tau_scale);
  const MapLayout grad_layout(grad_y);
  at::Tensor dx = at::empty_like(grad_y, at::MemoryFormat::Preserve);
  const MapLayout dx_layout(dx);
  const at::Tensor peak_index = peaks.to(at::kLong).contiguous();
  const at::Tensor keep_bits = keep.contiguous();
  const scalar_t* grad_data = grad_y.const_data_ptr<scalar_t>();
  const int64_t* peak_data = peak_index.const_data_ptr<int64_t>();
  const uint16_t* keep_data = reinterpret_cast<const uint16_t*>(keep_bits.const_data_ptr<int16_t>());
  scalar_t* dx_data = dx.data_ptr<scalar_t>();
  const int64_t words = words_per_map(g.HW);
  const MaskSource<F> masks(g, beta);
  at::parallel_for(0, g.B * g.C, 16, [&](int64_t begin, int64_t end) {
    std::vector<F> mask_buffer(masks.table.empty() ? g.HW : 0);
    std::vector<scalar_t> grad_buffer(grad_layout.dense ? 0 : g.HW), dx_buffer(dx_layout.dense ? 0 : g.HW);
    const bool sequential_maps = grad_layout.dense && grad_layout.sC == g.HW && grad_layout.sB == g.C * g.HW;
    for (int64_t bc = begin; bc < end; ++bc) {
      const int64_t b = bc / g.C, c = bc % g.C;
      if (sequential_maps) prefetch_map(grad_data, bc, 2, end, grad_layout.sC, g.HW);
      const scalar_t* grad = grad_data + grad_layout.offset(b, c);
      if (!grad_layout.dense) {
        for (int64_t r = 0; r < g.H; ++r)
          for (int64_t col = 0; col < g.W; ++col)
            grad_buffer[r * g.W + col] = grad[r * grad_layout.sH + col * grad_layout.sW];
        grad = grad_buffer.data();
      }
      const F* __restrict mask = masks(peak_data[bc], mask_buffer.data());
      scalar_t* out = dx_layout.dense ? dx_data + dx_layout.offset(b, c) : dx_buffer.data();
      masked_grad_row(grad, mask, keep_data + bc * words, g.HW, out);
      if (!dx_layout.dense) {
        scalar_t* target = dx_data + dx_layout.offset(b, c);
        for (int64_t r = 0; r < g.H; ++r)
          for (int64_t col = 0; col < g.W; ++col) target[r * dx_layout.sH + col * dx_layout.sW] = out[r * g.W + col];
      }
    }
  });
  return dx;
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
  const MaskSource<F> masks(g, beta);
  at::parallel_for(0, g.B * g.C, 16, [&](int64_t begin, int64_t end) {
    if (relu)
      forward_maps<true>(x_data, g, masks, centroid, begin, end, y_data, peak_data, found_nonfinite);
    else
      forward_maps<false>(x_data, g, masks, centroid, begin, end, y_data, peak_data, found_nonfinite);
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
  const MaskSource<F> masks(g, beta);
  at::parallel_for(0, g.B * g.C, 16, [&](int64_t begin, int64_t end) {
    std::vector<F> map_buffer(g.dense_maps && std::is_same_v<F, scalar_t> ? 0 : g.HW);
    const F slope = static_cast<F>(beta * g.inverse_n), scale = static_cast<F>(g.scale);
    const int32_t* __restrict rows = g.row_of.data();
    const int32_t* __restrict cols = g.col_of.data();
    for (int64_t bc = begin; bc < end; ++bc) {
      const int64_t b = bc / g.C, c = bc % g.C;
      const scalar_t* image = x_data + b * g.sB + c * g.sC;
      const F* __restrict map = image_values(image, g, map_buffer.data());
      const int64_t peak = peak_data[bc];
      const int32_t peak_r = static_cast<int32_t>(peak / g.W), peak_c = static_cast<int32_t>(peak % g.W);
      const scalar_t* __restrict grad_map = grad_data + bc * g.HW;
      scalar_t* __restrict dx_map = dx_data + bc * g.HW;
      if (!masks.table.empty()) {  // small maps: the mask is a row of the precomputed table
        const F* __restrict mask = masks.table.data() + peak * g.HW;
        for (int64_t i = 0; i < g.HW; ++i) {
          const F raw = map[i];
          const F value = relu ? (raw > F(0) ? raw : F(0)) : raw;
          dx_map[i] = static_cast<scalar_t>(value * mask[i] > F(0) ? static_cast<F>(grad_map[i]) * mask[i] : F(0));
        }
        continue;
      }
      for (int64_t i = 0; i < g.HW; ++i) {  // one fused, vectorised pass: the mask is recomputed inline
        const F d = static_cast<F>(std::abs(rows[i] - peak_r) + std::abs(cols[i] - peak_c));
        const F m = std::max(F(1) - slope * d, F(-1)) * scale;
        const F raw = map[i];
        const F value = relu ? (raw > F(0) ? raw : F(0)) : raw;
        dx_map[i] = static_cast<scalar_t>(value * m > F(0) ? static_cast<F>(grad_map[i]) * m : F(0));
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

std::tuple<at::Tensor, at::Tensor, at::Tensor> template_mask_forward_bits(const at::Tensor& x, double beta,
                                                                         c10::string_view center, bool tau_scale,
                                                                         bool relu) {
  check_mask_input(x, relu);
  TORCH_CHECK_VALUE(beta > 0 && std::isfinite(beta), op_name(relu), ": beta must be a finite positive number, got ",
                    beta);
  TORCH_CHECK_VALUE(center == "argmax" || center == "centroid", op_name(relu),
                    ": center must be 'argmax' or 'centroid', got '", std::string(center), "'");
  const bool centroid = center == "centroid";
  return AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "template_mask_forward_bits",
                                         [&] { return forward_bits_typed<scalar_t>(x, beta, centroid, tau_scale, relu); });
}

at::Tensor template_mask_backward_bits(const at::Tensor& grad_y, const at::Tensor& peaks, const at::Tensor& keep,
                                       double beta, bool tau_scale) {
  check_mask_input(grad_y, false);
  const int64_t B = grad_y.size(0), C = grad_y.size(1), HW = grad_y.size(2) * grad_y.size(3);
  TORCH_CHECK_VALUE(peaks.numel() == B * C && keep.numel() == B * C * words_per_map(HW) &&
                        keep.scalar_type() == at::kShort,
                    "template_mask: grad_y/peaks/keep do not match; pass the outputs of template_mask_forward_bits(x)");
  return AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad_y.scalar_type(), "template_mask_backward_bits",
                                         [&] { return backward_bits_typed<scalar_t>(grad_y, peaks, keep, beta, tau_scale); });
}

}  // namespace
}  // namespace fastexplain

TORCH_LIBRARY_IMPL(fastexplain, CPU, m) {
  m.impl("template_mask_forward", &fastexplain::template_mask_forward);
  m.impl("template_mask_backward", &fastexplain::template_mask_backward);
  m.impl("template_mask_forward_bits", &fastexplain::template_mask_forward_bits);
  m.impl("template_mask_backward_bits", &fastexplain::template_mask_backward_bits);
}
