// Hot loops of fake_quant / fake_quant_backward on CPU, compiled once per ISA (setup.py ISAS) inside
// qops::cpu::CPU_CAPABILITY. Element math: csrc/include/qops/fake_quant_math.h (vectorized here).
//
// Every result is bitwise the same on every ISA and for any thread count:
//  - elements are processed in groups of 16 "lanes" (2 AVX2 vectors, 1 AVX-512 vector, 2 emulated
//    vectors on DEFAULT), element i of a run going to lane i % 16, with zero padding for short runs;
//  - the two roundings the built-in does with an FMA are explicit FMAs (std::fma on DEFAULT), and no
//    other multiply feeds an add (a mask always sits between), so compiler contraction cannot differ;
//  - reductions add in float within a lane for at most kFlushGroups groups, then fold the 16 lanes
//    in a fixed tree into a double accumulator per task; the task grid depends on the shape only.
// ATen's vec headers declare their sleef functions only where sleef.h sees __AVX__ / __AVX512F__, which
// GCC defines for -mavx* flags but not for the `#pragma GCC target` of setup.py's ISA wrappers. The
// pragma has enabled those instructions already, so announce them before any include (sleef.h is the
// only header of this file that tests these macros).
#if defined(CPU_CAPABILITY_AVX2) || defined(CPU_CAPABILITY_AVX512)
#ifndef __AVX__
#define __AVX__ 1
#endif
#endif
#if defined(CPU_CAPABILITY_AVX512) && !defined(__AVX512F__)
#define __AVX512F__ 1
#endif

// GCC 12 warns inside ATen's and its own AVX headers: the vector-ABI note for the per-ISA namespaces
// compiled under `#pragma GCC target`, and _mm512_undefined_* in avx512fintrin.h. Neither is ours.
#pragma GCC diagnostic ignored "-Wpsabi"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

#include "fake_quant.h"

#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <type_traits>
#include <vector>

namespace qops::cpu::CPU_CAPABILITY {
namespace {

using Vec = at::vec::Vectorized<float>;
constexpr int64_t kLanes = 16;
constexpr int64_t kVecLen = Vec::size();
constexpr int kVecs = static_cast<int>(kLanes / kVecLen);
static_assert(kLanes % Vec::size() == 0, "16 lanes must be a whole number of vectors");
// Groups of 16 summed in float per lane before the lanes are folded into double: 4096 elements in the
// segment mode, 256 rows per channel in the row mode.
constexpr int64_t kFlushGroups = 256;

// ---- loads and stores of one group (n <= 16 valid elements, zero padded) as float ----

template <typename T>
inline void load_group(const T* p, int64_t n, Vec* out) {
  if constexpr (std::is_same_v<T, float>) {
    if (n == kLanes) {
      for (int v = 0; v < kVecs; ++v) out[v] = Vec::loadu(p + v * kVecLen);
      return;
    }
    for (int v = 0; v < kVecs; ++v) {
      const int64_t m = std::clamp<int64_t>(n - v * kVecLen, 0, kVecLen);
      out[v] = m == 0 ? Vec(0.f) : Vec::loadu(p + v * kVecLen, m);
    }
  } else {
    alignas(64) float buf[kLanes];
    for (int64_t i = 0; i < n; ++i) buf[i] = static_cast<float>(p[i]);
    for (int64_t i = n; i < kLanes; ++i) buf[i] = 0.f;
    for (int v = 0; v < kVecs; ++v) out[v] = Vec::loadu(buf + v * kVecLen);
  }
}

template <typename T>
inline void store_group(T* p, int64_t n, const Vec* in) {
  if constexpr (std::is_same_v<T, float>) {
    if (n == kLanes) {
      for (int v = 0; v < kVecs; ++v) in[v].store(p + v * kVecLen);
      return;
    }
    for (int v = 0; v < kVecs; ++v) {
      const int64_t m = std::clamp<int64_t>(n - v * kVecLen, 0, kVecLen);
      if (m > 0) in[v].store(p + v * kVecLen, static_cast<int>(m));
    }
  } else {
    alignas(64) float buf[kLanes];
    for (int v = 0; v < kVecs; ++v) in[v].store(buf + v * kVecLen);
    for (int64_t i = 0; i < n; ++i) p[i] = static_cast<T>(buf[i]);  // round to nearest even
  }
}

// a * b + c rounded once, on every ISA (the built-in's contracted expressions).
inline Vec fused_multiply_add(const Vec& a, const Vec& b, const Vec& c) {
#if defined(CPU_CAPABILITY_AVX2) || defined(CPU_CAPABILITY_AVX512)
  return at::vec::fmadd(a, b, c);
#else
  alignas(64) float av[kVecLen], bv[kVecLen], cv[kVecLen];
  a.store(av);
  b.store(bv);
  c.store(cv);
  for (int64_t i = 0; i < kVecLen; ++i) av[i] = std::fma(av[i], bv[i], cv[i]);
  return Vec::loadu(av);
#endif
}

// Quantization parameters of the 16 lanes of a group (one channel broadcast, or 16 channels).
struct LaneParams {
  Vec scale[kVecs], inv_scale[kVecs], zero_point[kVecs];
  Vec quant_min, quant_max;
};

inline void broadcast_params(const FqCpuProblem& p, int64_t c, LaneParams* lp) {
  for (int v = 0; v < kVecs; ++v) {
    lp->scale[v] = Vec(p.scale[c]);
    lp->inv_scale[v] = Vec(p.inv_scale[c]);
    lp->zero_point[v] = Vec(p.zero_point[c]);
  }
}

inline void load_lane_params(const FqCpuProblem& p, int64_t c, int64_t n, LaneParams* lp) {
  load_group(p.scale + c, n, lp->scale);
  load_group(p.inv_scale + c, n, lp->inv_scale);
  load_group(p.zero_point + c, n, lp->zero_point);
}

// x -> y in place: y = (clamp(zp + rint(x * inv_scale)) - zp) * scale.
inline void forward_group(const LaneParams& lp, Vec* xy) {
  for (int v = 0; v < kVecs; ++v) {
    Vec q = (xy[v] * lp.inv_scale[v]).round() + lp.zero_point[v];
    q = Vec::blendv(lp.quant_min, q, q >= lp.quant_min);  // NaN fails the test: qmin, like the built-in
    q = Vec::blendv(q, lp.quant_max, q > lp.quant_max);
    xy[v] = (q - lp.zero_point[v]) * lp.scale[v];
  }
}

// Float sums of one run of groups, per lane.
struct LaneSums {
  Vec inside[kVecs], below[kVecs], above[kVecs];
  void zero() {
    for (int v = 0; v < kVecs; ++v) inside[v] = below[v] = above[v] = Vec(0.f);
  }
};

// dy -> dx in place, and the three gradient sums: inside sum dy * fma(q - zp, s, -x), below / above sum dy.
inline void backward_group(const LaneParams& lp, const Vec* x, Vec* dy_dx, LaneSums* sums) {
  const Vec zero(0.f), one(1.f);
  for (int v = 0; v < kVecs; ++v) {
    const Vec q = fused_multiply_add(x[v], lp.inv_scale[v], lp.zero_point[v]).round();
    const Vec at_least_min = q >= lp.quant_min;  // false for NaN: below, as in the built-in
    const Vec above = q > lp.quant_max;
    const Vec inside = at_least_min ^ above;
    const Vec dy = dy_dx[v];
    const Vec y_minus_x = fused_multiply_add(q - lp.zero_point[v], lp.scale[v], x[v].neg());
    sums->inside[v] = sums->inside[v] + (inside & (dy * y_minus_x));
    sums->below[v] = sums->below[v] + Vec::blendv(dy, zero, at_least_min);
    sums->above[v] = sums->above[v] + (above & dy);
    dy_dx[v] = dy * (inside & one);
  }
}

// Folds 16 lane sums into one float with a fixed tree (same order on every ISA).
inline float fold_lanes(const Vec* lanes) {
  alignas(64) float a[kLanes];
  for (int v = 0; v < kVecs; ++v) lanes[v].store(a + v * kVecLen);
  for (int64_t width = kLanes / 2; width >= 1; width /= 2) {
    for (int64_t i = 0; i < width; ++i) a[i] = a[i] + a[i + width];
  }
  return a[0];
}

struct TaskGrid {
  const FqCpuProblem& p;
  // Segment mode: task -> (group, channel, chunk).
  void segment(int64_t task, int64_t* g, int64_t* c, int64_t* k) const {
    *k = task % p.chunks;
    *c = (task / p.chunks) % p.channels;
    *g = task / (p.chunks * p.channels);
  }
  void rows(int64_t g, int64_t* begin, int64_t* end) const {
    *begin = g * p.rows_per_group;
    *end = std::min(p.outer, *begin + p.rows_per_group);
  }
};

template <typename T>
void forward_impl(const FqCpuProblem& p, const T* x, T* y) {
  const TaskGrid grid{p};
  at::parallel_for(0, p.tasks, p.tasks_per_thread_min, [&](int64_t task_begin, int64_t task_end) {
    LaneParams lp;
    lp.quant_min = Vec(p.quant_min);
    lp.quant_max = Vec(p.quant_max);
    Vec v[kVecs];
    for (int64_t task = task_begin; task < task_end; ++task) {
      if (!p.row_mode) {
        int64_t g, c, k, o0, o1;
        grid.segment(task, &g, &c, &k);
        grid.rows(g, &o0, &o1);
        broadcast_params(p, c, &lp);
        const int64_t i0 = k * p.chunk, i1 = std::min(p.inner, i0 + p.chunk);
        for (int64_t o = o0; o < o1; ++o) {
          const int64_t base = (o * p.channels + c) * p.inner;
          for (int64_t i = i0; i < i1; i += kLanes) {
            const int64_t n = std::min(kLanes, i1 - i);
            load_group(x + base + i, n, v);
            forward_group(lp, v);
            store_group(y + base + i, n, v);
          }
        }
      } else {
        const int64_t g = task / p.tiles, j = task % p.tiles;
        int64_t o0, o1;
        grid.rows(g, &o0, &o1);
        const int64_t c0 = j * p.tile, c1 = std::min(p.channels, c0 + p.tile);
        for (int64_t o = o0; o < o1; ++o) {
          const int64_t base = o * p.channels;
          for (int64_t c = c0; c < c1; c += kLanes) {
            const int64_t n = std::min(kLanes, c1 - c);
            load_lane_params(p, c, n, &lp);
            load_group(x + base + c, n, v);
            forward_group(lp, v);
            store_group(y + base + c, n, v);
          }
        }
      }
    }
  });
}

template <typename T>
void backward_segment_task(const FqCpuProblem& p, const TaskGrid& grid, int64_t task, const T* dy_ptr,
                           const T* x_ptr, T* dx_ptr, double* partials) {
  int64_t g, c, k, o0, o1;
  grid.segment(task, &g, &c, &k);
  grid.rows(g, &o0, &o1);
  LaneParams lp;
  lp.quant_min = Vec(p.quant_min);
  lp.quant_max = Vec(p.quant_max);
  broadcast_params(p, c, &lp);
  LaneSums sums;
  sums.zero();
  double total[3] = {0.0, 0.0, 0.0};
  int64_t groups_in_sums = 0;
  auto flush = [&] {
    total[0] += static_cast<double>(fold_lanes(sums.inside));
    total[1] += static_cast<double>(fold_lanes(sums.below));
    total[2] += static_cast<double>(fold_lanes(sums.above));
    sums.zero();
    groups_in_sums = 0;
  };
  Vec x[kVecs], d[kVecs];
  const int64_t i0 = k * p.chunk, i1 = std::min(p.inner, i0 + p.chunk);
  for (int64_t o = o0; o < o1; ++o) {
    const int64_t base = (o * p.channels + c) * p.inner;
    for (int64_t i = i0; i < i1; i += kLanes) {
      const int64_t n = std::min(kLanes, i1 - i);
      load_group(x_ptr + base + i, n, x);
      load_group(dy_ptr + base + i, n, d);  // padding: dy = 0, x = 0 adds exact zeros
      backward_group(lp, x, d, &sums);
      store_group(dx_ptr + base + i, n, d);
      if (++groups_in_sums == kFlushGroups) flush();
    }
  }
  if (groups_in_sums > 0) flush();
  double* out = partials + ((g * p.channels + c) * p.chunks + k) * 3;
  out[0] = total[0];
  out[1] = total[1];
  out[2] = total[2];
}

template <typename T>
void backward_row_task(const FqCpuProblem& p, const TaskGrid& grid, int64_t task, const T* dy_ptr,
                       const T* x_ptr, T* dx_ptr, double* partials) {
  const int64_t g = task / p.tiles, j = task % p.tiles;
  int64_t o0, o1;
  grid.rows(g, &o0, &o1);
  const int64_t c0 = j * p.tile, c1 = std::min(p.channels, c0 + p.tile);
  const int64_t width = c1 - c0;
  const int64_t padded = (width + kLanes - 1) / kLanes * kLanes;
  // Lanes are channels here: per-channel float sums over at most kFlushGroups rows, then double.
  std::vector<float> lane_sums(3 * padded, 0.f);
  std::vector<double> total(3 * padded, 0.0);
  float* s_in = lane_sums.data();
  float* s_lo = s_in + padded;
  float* s_hi = s_lo + padded;
  auto flush = [&] {
    for (int64_t i = 0; i < 3 * padded; ++i) total[i] += static_cast<double>(lane_sums[i]);
    std::fill(lane_sums.begin(), lane_sums.end(), 0.f);
  };
  LaneParams lp;
  lp.quant_min = Vec(p.quant_min);
  lp.quant_max = Vec(p.quant_max);
  LaneSums sums;
  Vec x[kVecs], d[kVecs];
  int64_t rows_in_sums = 0;
  for (int64_t o = o0; o < o1; ++o) {
    const int64_t base = o * p.channels;
    for (int64_t c = c0; c < c1; c += kLanes) {
      const int64_t n = std::min(kLanes, c1 - c);
      const int64_t at = c - c0;
      load_lane_params(p, c, n, &lp);
      for (int v = 0; v < kVecs; ++v) {
        sums.inside[v] = Vec::loadu(s_in + at + v * kVecLen);
        sums.below[v] = Vec::loadu(s_lo + at + v * kVecLen);
        sums.above[v] = Vec::loadu(s_hi + at + v * kVecLen);
      }
      load_group(x_ptr + base + c, n, x);
      load_group(dy_ptr + base + c, n, d);
      backward_group(lp, x, d, &sums);
      store_group(dx_ptr + base + c, n, d);
      for (int v = 0; v < kVecs; ++v) {
        sums.inside[v].store(s_in + at + v * kVecLen);
        sums.below[v].store(s_lo + at + v * kVecLen);
        sums.above[v].store(s_hi + at + v * kVecLen);
      }
    }
    if (++rows_in_sums == kFlushGroups) {
      flush();
      rows_in_sums = 0;
    }
  }
  if (rows_in_sums > 0) flush();
  for (int64_t c = c0; c < c1; ++c) {
    double* out = partials + (g * p.channels + c) * 3;
    out[0] = total[c - c0];
    out[1] = total[padded + c - c0];
    out[2] = total[2 * padded + c - c0];
  }
}

template <typename T>
void backward_impl(const FqCpuProblem& p, const T* dy, const T* x, T* dx, double* partials) {
  const TaskGrid grid{p};
  at::parallel_for(0, p.tasks, p.tasks_per_thread_min, [&](int64_t task_begin, int64_t task_end) {
    for (int64_t task = task_begin; task < task_end; ++task) {
      if (p.row_mode) {
        backward_row_task(p, grid, task, dy, x, dx, partials);
      } else {
        backward_segment_task(p, grid, task, dy, x, dx, partials);
      }
    }
  });
}

}  // namespace

void fake_quant_forward_kernel(const FqCpuProblem& p, const void* x, void* y) {
  switch (p.dtype) {
    case FqDtype::kFloat:
      return forward_impl(p, static_cast<const float*>(x), static_cast<float*>(y));
    case FqDtype::kHalf:
      return forward_impl(p, static_cast<const c10::Half*>(x), static_cast<c10::Half*>(y));
    case FqDtype::kBFloat16:
      return forward_impl(p, static_cast<const c10::BFloat16*>(x), static_cast<c10::BFloat16*>(y));
  }
}

void fake_quant_backward_kernel(const FqCpuProblem& p, const void* grad, const void* x, void* grad_x,
                                double* partials) {
  switch (p.dtype) {
    case FqDtype::kFloat:
      return backward_impl(p, static_cast<const float*>(grad), static_cast<const float*>(x),
                           static_cast<float*>(grad_x), partials);
    case FqDtype::kHalf:
      return backward_impl(p, static_cast<const c10::Half*>(grad), static_cast<const c10::Half*>(x),
                           static_cast<c10::Half*>(grad_x), partials);
    case FqDtype::kBFloat16:
      return backward_impl(p, static_cast<const c10::BFloat16*>(grad), static_cast<const c10::BFloat16*>(x),
                           static_cast<c10::BFloat16*>(grad_x), partials);
  }
}

}  // namespace qops::cpu::CPU_CAPABILITY
