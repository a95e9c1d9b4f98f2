// The activation passes of mixed_quant_conv (compiled once per ISA, see setup.py):
//   mqc_act_forward:  x -> xq, every activation variant FQa_j(x) in one read of x, written channels-last in the
//                     channel order of csrc/include/qops/mixed_quant_conv.h (what oneDNN's convolution wants);
//   mqc_act_backward: (x, grad xq) -> grad x = sum_j STE_j * grad xq_j, plus the LSQ scale sums of every
//                     variant, in one pass.
// x is NCHW- or NHWC-contiguous (the host makes anything else NCHW). NHWC pixels are vectorized over channels
// directly; NCHW rows are turned into 8-pixel NHWC tiles with 8x8 register transposes first, so both share
// the per-pixel code. Work is split by image rows (n, h) and every row writes its own scale partial sums, so
// the sums do not depend on the thread count.
//
// Intrinsics rather than at::vec: ATen's vec headers need sleef's AVX declarations, which sleef.h only makes
// when __AVX2__ is defined by the command line, not by the `#pragma GCC target` of setup.py's wrappers.
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#if defined(CPU_CAPABILITY_AVX2) || defined(CPU_CAPABILITY_AVX512)
#include <immintrin.h>
#endif
#if defined(CPU_CAPABILITY_AVX512) && defined(__GNUC__) && !defined(__clang__)
// GCC 12 flags _mm512_undefined_ps() inside its own AVX-512 intrinsics as "may be used uninitialized".
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif

#include "qops/fake_quant_math.h"
#include "qops/mixed_quant_conv.h"
#include "qops/parallel_grain.h"

namespace qops::cpu::CPU_CAPABILITY {

namespace {

// ---- a minimal SIMD layer: F (floats), M (lane mask), loads/stores with a tail count ----------------------
#if defined(CPU_CAPABILITY_AVX512)
struct Simd {
  using F = __m512;
  using M = __mmask16;
  static constexpr int kWidth = 16;
  static F set1(float v) { return _mm512_set1_ps(v); }
  static __mmask16 tail(int64_t n) { return static_cast<__mmask16>((1u << n) - 1u); }
  static F load(const float* p, int64_t n) { return n == kWidth ? _mm512_loadu_ps(p) : _mm512_maskz_loadu_ps(tail(n), p); }
  static void store(float* p, F v, int64_t n) {
    if (n == kWidth) _mm512_storeu_ps(p, v);
    else _mm512_mask_storeu_ps(p, tail(n), v);
  }
  static F add(F a, F b) { return _mm512_add_ps(a, b); }
  static F sub(F a, F b) { return _mm512_sub_ps(a, b); }
  static F mul(F a, F b) { return _mm512_mul_ps(a, b); }
  static F round(F a) { return _mm512_roundscale_ps(a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
  static F min(F a, F b) { return _mm512_min_ps(a, b); }
  static F max(F a, F b) { return _mm512_max_ps(a, b); }
  static F fmsub(F a, F b, F c) { return _mm512_fmsub_ps(a, b, c); }
  static M nge(F a, F b) { return _mm512_cmp_ps_mask(a, b, _CMP_NGE_UQ); }
  static M gt(F a, F b) { return _mm512_cmp_ps_mask(a, b, _CMP_GT_OQ); }
  static M lor(M a, M b) { return static_cast<M>(a | b); }
  static F select(M m, F if_true, F if_false) { return _mm512_mask_blend_ps(m, if_false, if_true); }
  static void lanes(F v, float* out) { _mm512_storeu_ps(out, v); }
};
#elif defined(CPU_CAPABILITY_AVX2)
struct Simd {
  using F = __m256;
  using M = __m256;
  static constexpr int kWidth = 8;
  static F set1(float v) { return _mm256_set1_ps(v); }
  static __m256i tail(int64_t n) {
    return _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(n)), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
  }
  static F load(const float* p, int64_t n) { return n == kWidth ? _mm256_loadu_ps(p) : _mm256_maskload_ps(p, tail(n)); }
  static void store(float* p, F v, int64_t n) {
    if (n == kWidth) _mm256_storeu_ps(p, v);
    else _mm256_maskstore_ps(p, tail(n), v);
  }
  static F add(F a, F b) { return _mm256_add_ps(a, b); }
  static F sub(F a, F b) { return _mm256_sub_ps(a, b); }
  static F mul(F a, F b) { return _mm256_mul_ps(a, b); }
  static F round(F a) { return _mm256_round_ps(a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
  static F min(F a, F b) { return _mm256_min_ps(a, b); }
  static F max(F a, F b) { return _mm256_max_ps(a, b); }
  static F fmsub(F a, F b, F c) { return _mm256_fmsub_ps(a, b, c); }
  static M nge(F a, F b) { return _mm256_cmp_ps(a, b, _CMP_NGE_UQ); }
  static M gt(F a, F b) { return _mm256_cmp_ps(a, b, _CMP_GT_OQ); }
  static M lor(M a, M b) { return _mm256_or_ps(a, b); }
  static F select(M m, F if_true, F if_false) { return _mm256_blendv_ps(if_false, if_true, m); }
  static void lanes(F v, float* out) { _mm256_storeu_ps(out, v); }
};
#else
// Portable path: one lane, the same formulas as qops::fq_forward / fq_backward.
struct Simd {
  using F = float;
  using M = bool;
  static constexpr int kWidth = 1;
  static F set1(float v) { return v; }
  static F load(const float* p, int64_t) { return *p; }
  static void store(float* p, F v, int64_t) { *p = v; }
  static F add(F a, F b) { return a + b; }
  static F sub(F a, F b) { return a - b; }
  static F mul(F a, F b) { return a * b; }
  static F round(F a) { return std::nearbyint(a); }
  static F min(F a, F b) { return std::fmin(a, b); }
  static F max(F a, F b) { return std::fmax(a, b); }
  static F fmsub(F a, F b, F c) { return std::fma(a, b, -c); }
  static M nge(F a, F b) { return !(a >= b); }
  static M gt(F a, F b) { return a > b; }
  static M lor(M a, M b) { return a || b; }
  static F select(M m, F if_true, F if_false) { return m ? if_true : if_false; }
  static void lanes(F v, float* out) { *out = v; }
};
#endif

using F = Simd::F;
constexpr int64_t kW = Simd::kWidth;
constexpr int64_t kTile = 8;  // pixels per NCHW tile (one 8x8 transpose wide)

// One pixel's C channels -> its n_a * C channels of xq.
inline void forward_pixel(const float* xp, float* out, const MqcActVariants& v, int64_t C, int64_t cb) {
  const int64_t n_a = v.n;
  for (int64_t b0 = 0; b0 < C; b0 += cb) {
    const float* src = xp + b0;
    for (int64_t j = 0; j < n_a; ++j) {
      float* dst = out + b0 * n_a + j * cb;
      if (v.bits[j] == 0) {
        std::copy(src, src + cb, dst);
        continue;
      }
      const F inv = Simd::set1(v.inv_scale[j]), scale = Simd::set1(v.scale[j]);
      const F qmin = Simd::set1(v.qmin[j]), qmax = Simd::set1(v.qmax[j]);
      for (int64_t k = 0; k < cb; k += kW) {
        const int64_t n = std::min(kW, cb - k);
        const F q = Simd::round(Simd::mul(Simd::load(src + k, n), inv));
        Simd::store(dst + k, Simd::mul(Simd::min(Simd::max(q, qmin), qmax), scale), n);
      }
    }
  }
}

// A run of `len` values: grad x from the variants' grads g + j * g_stride (j = 0..n_a-1); LSQ scale sums
// into acc[j] (qops::fq_backward with zero point 0 and grad_factor 1, lane-wise).
inline void backward_span(const float* xp, const float* g0, int64_t g_stride, float* gxo, const MqcActVariants& v,
                          int64_t len, F* acc) {
  const F zero = Simd::set1(0.f);
  for (int64_t k = 0; k < len; k += kW) {
    const int64_t n = std::min(kW, len - k);
    // Tail lanes load as zeros (x = 0, g = 0), so they add nothing to the sums.
    const F xs = Simd::load(xp + k, n);
    F gsum = zero;
    for (int64_t j = 0; j < v.n; ++j) {
      const F g = Simd::load(g0 + j * g_stride + k, n);
      if (v.bits[j] == 0 || v.noise) {
        gsum = Simd::add(gsum, g);
        continue;
      }
      const F inv = Simd::set1(v.inv_scale[j]), scale = Simd::set1(v.scale[j]);
      const F qmin = Simd::set1(v.qmin[j]), qmax = Simd::set1(v.qmax[j]);
      // As qops::fq_backward: q = rint(x / s) (one rounding), NaN counts as below, y - x = fma(q, s, -x).
      const F q = Simd::round(Simd::mul(xs, inv));
      const auto below = Simd::nge(q, qmin);
      const auto above = Simd::gt(q, qmax);
      F ds = Simd::mul(Simd::mul(g, Simd::fmsub(q, scale, xs)), inv);
      ds = Simd::select(below, Simd::mul(g, qmin), ds);
      ds = Simd::select(above, Simd::mul(g, qmax), ds);
      acc[j] = Simd::add(acc[j], ds);
      gsum = Simd::add(gsum, Simd::select(Simd::lor(below, above), zero, g));
    }
    Simd::store(gxo + k, gsum, n);
  }
}

// One pixel: grad x (C channels) from grad xq (n_a * C channels, blocks of cb).
inline void backward_pixel(const float* xp, const float* gp, float* gxo, const MqcActVariants& v, int64_t C,
                           int64_t cb, F* acc) {
  for (int64_t b0 = 0; b0 < C; b0 += cb) backward_span(xp + b0, gp + b0 * v.n, cb, gxo + b0, v, cb, acc);
}

// dst[w * ld_dst + c] = src[c * ld_src + w] for an nc x nw block (nc, nw <= 8).
inline void transpose_block(const float* src, int64_t ld_src, float* dst, int64_t ld_dst, int64_t nc, int64_t nw) {
#if defined(CPU_CAPABILITY_AVX2) || defined(CPU_CAPABILITY_AVX512)
  if (nc == 8 && nw == 8) {
    __m256 r0 = _mm256_loadu_ps(src + 0 * ld_src), r1 = _mm256_loadu_ps(src + 1 * ld_src);
    __m256 r2 = _mm256_loadu_ps(src + 2 * ld_src), r3 = _mm256_loadu_ps(src + 3 * ld_src);
    __m256 r4 = _mm256_loadu_ps(src + 4 * ld_src), r5 = _mm256_loadu_ps(src + 5 * ld_src);
    __m256 r6 = _mm256_loadu_ps(src + 6 * ld_src), r7 = _mm256_loadu_ps(src + 7 * ld_src);
    __m256 t0 = _mm256_unpacklo_ps(r0, r1), t1 = _mm256_unpackhi_ps(r0, r1);
    __m256 t2 = _mm256_unpacklo_ps(r2, r3), t3 = _mm256_unpackhi_ps(r2, r3);
    __m256 t4 = _mm256_unpacklo_ps(r4, r5), t5 = _mm256_unpackhi_ps(r4, r5);
    __m256 t6 = _mm256_unpacklo_ps(r6, r7), t7 = _mm256_unpackhi_ps(r6, r7);
    __m256 s0 = _mm256_shuffle_ps(t0, t2, 0x44), s1 = _mm256_shuffle_ps(t0, t2, 0xEE);
    __m256 s2 = _mm256_shuffle_ps(t1, t3, 0x44), s3 = _mm256_shuffle_ps(t1, t3, 0xEE);
    __m256 s4 = _mm256_shuffle_ps(t4, t6, 0x44), s5 = _mm256_shuffle_ps(t4, t6, 0xEE);
    __m256 s6 = _mm256_shuffle_ps(t5, t7, 0x44), s7 = _mm256_shuffle_ps(t5, t7, 0xEE);
    _mm256_storeu_ps(dst + 0 * ld_dst, _mm256_permute2f128_ps(s0, s4, 0x20));
    _mm256_storeu_ps(dst + 1 * ld_dst, _mm256_permute2f128_ps(s1, s5, 0x20));
    _mm256_storeu_ps(dst + 2 * ld_dst, _mm256_permute2f128_ps(s2, s6, 0x20));
    _mm256_storeu_ps(dst + 3 * ld_dst, _mm256_permute2f128_ps(s3, s7, 0x20));
    _mm256_storeu_ps(dst + 4 * ld_dst, _mm256_permute2f128_ps(s0, s4, 0x31));
    _mm256_storeu_ps(dst + 5 * ld_dst, _mm256_permute2f128_ps(s1, s5, 0x31));
    _mm256_storeu_ps(dst + 6 * ld_dst, _mm256_permute2f128_ps(s2, s6, 0x31));
    _mm256_storeu_ps(dst + 7 * ld_dst, _mm256_permute2f128_ps(s3, s7, 0x31));
    return;
  }
#endif
  for (int64_t c = 0; c < nc; ++c)
    for (int64_t w = 0; w < nw; ++w) dst[w * ld_dst + c] = src[c * ld_src + w];
}

// NCHW row (n, h), pixels [w0, w0 + nw): tile[w][c] = x[n, c, h, w0 + w], and back.
inline void load_tile(const float* xrow, int64_t HW, int64_t C, int64_t nw, float* tile) {
  for (int64_t c0 = 0; c0 < C; c0 += 8) transpose_block(xrow + c0 * HW, HW, tile + c0, C, std::min<int64_t>(8, C - c0), nw);
}

inline void store_tile(const float* tile, int64_t HW, int64_t C, int64_t nw, float* row) {
  for (int64_t c0 = 0; c0 < C; c0 += 8) transpose_block(tile + c0, C, row + c0 * HW, HW, nw, std::min<int64_t>(8, C - c0));
}

}  // namespace

void mqc_act_forward(const float* x, bool channels_last, int64_t N, int64_t C, int64_t H, int64_t W,
                     const MqcActVariants& v, int64_t cb, float* xq, bool xq_channels_last) {
  const int64_t ctot = v.n * C, HW = H * W;
  if (!channels_last && !xq_channels_last) {
    // NCHW -> NCHW: every (n, c) plane of x becomes n_a planes of xq, contiguous runs of H * W.
    at::parallel_for(0, N * C, parallel_grain(HW * v.n), [&](int64_t begin, int64_t end) {
      MqcActVariants one = v;
      for (int64_t u = begin; u < end; ++u) {
        const int64_t n = u / C, c = u % C;
        for (int64_t j = 0; j < v.n; ++j) {
          one.n = 1;
          one.bits[0] = v.bits[j];
          one.scale[0] = v.scale[j];
          one.inv_scale[0] = v.inv_scale[j];
          one.qmin[0] = v.qmin[j];
          one.qmax[0] = v.qmax[j];
          forward_pixel(x + u * HW, xq + (n * ctot + mqc_xq_channel(j, c, v.n, cb)) * HW, one, HW, HW);
        }
      }
    });
    return;
  }
  at::parallel_for(0, N * H, parallel_grain(W * ctot), [&](int64_t begin, int64_t end) {
    std::vector<float> xtile(channels_last ? 0 : kTile * C), otile(xq_channels_last ? 0 : kTile * ctot);
    for (int64_t r = begin; r < end; ++r) {
      const int64_t n = r / H, h = r % H;
      for (int64_t w0 = 0; w0 < W; w0 += kTile) {
        const int64_t nw = std::min(kTile, W - w0);
        const float* xt = x + (r * W + w0) * C;  // NHWC pixels of this tile
        if (!channels_last) {
          load_tile(x + n * C * HW + h * W + w0, HW, C, nw, xtile.data());
          xt = xtile.data();
        }
        float* ot = xq_channels_last ? xq + (r * W + w0) * ctot : otile.data();
        for (int64_t w = 0; w < nw; ++w) forward_pixel(xt + w * C, ot + w * ctot, v, C, cb);
        if (!xq_channels_last) store_tile(otile.data(), HW, ctot, nw, xq + n * ctot * HW + h * W + w0);
      }
    }
  });
}

void mqc_act_backward(const float* x, bool channels_last, int64_t N, int64_t C, int64_t H, int64_t W,
                      const MqcActVariants& v, int64_t cb, const float* gxq, bool gxq_channels_last, float* gx,
                      double* unit_sums) {
  const int64_t ctot = v.n * C, HW = H * W, n_a = v.n;
  auto finish = [&](F* acc, int64_t unit) {
    for (int64_t j = 0; j < n_a; ++j) {
      float lanes[kW];
      Simd::lanes(acc[j], lanes);
      double s = 0.0;
      for (int64_t k = 0; k < kW; ++k) s += lanes[k];
      unit_sums[unit * n_a + j] = s;
    }
  };
  if (!channels_last && !gxq_channels_last) {
    // NCHW x and grad xq: plane by plane, H * W contiguous values of each variant. Units: the N * C planes.
    at::parallel_for(0, N * C, parallel_grain(HW * n_a), [&](int64_t begin, int64_t end) {
      for (int64_t u = begin; u < end; ++u) {
        const int64_t n = u / C, c = u % C;
        F acc[kMqcMaxBits];
        for (int64_t j = 0; j < n_a; ++j) acc[j] = Simd::set1(0.f);
        // Variant j's plane of channel c sits cb planes after variant j-1's (mqc_xq_channel).
        const float* g0 = gxq + (n * ctot + mqc_xq_channel(0, c, n_a, cb)) * HW;
        backward_span(x + u * HW, g0, cb * HW, gx + u * HW, v, HW, acc);
        finish(acc, u);
      }
    });
    return;
  }
  // Row by row (units: the N * H rows), 8-pixel tiles transposed where a tensor is NCHW.
  at::parallel_for(0, N * H, parallel_grain(W * ctot), [&](int64_t begin, int64_t end) {
    std::vector<float> xtile(channels_last ? 0 : kTile * C), gxtile(channels_last ? 0 : kTile * C);
    std::vector<float> gtile(gxq_channels_last ? 0 : kTile * ctot);
    for (int64_t r = begin; r < end; ++r) {
      const int64_t n = r / H, h = r % H;
      F acc[kMqcMaxBits];
      for (int64_t j = 0; j < n_a; ++j) acc[j] = Simd::set1(0.f);
      for (int64_t w0 = 0; w0 < W; w0 += kTile) {
        const int64_t nw = std::min(kTile, W - w0);
        const float* xt = x + (r * W + w0) * C;
        float* gxt = gx + (r * W + w0) * C;
        const float* gt = gxq + (r * W + w0) * ctot;
        if (!channels_last) {
          load_tile(x + n * C * HW + h * W + w0, HW, C, nw, xtile.data());
          xt = xtile.data();
          gxt = gxtile.data();
        }
        if (!gxq_channels_last) {
          load_tile(gxq + n * ctot * HW + h * W + w0, HW, ctot, nw, gtile.data());
          gt = gtile.data();
        }
        for (int64_t w = 0; w < nw; ++w) backward_pixel(xt + w * C, gt + w * ctot, gxt + w * C, v, C, cb, acc);
        if (!channels_last) store_tile(gxtile.data(), HW, C, nw, gx + n * C * HW + h * W + w0);
      }
      finish(acc, r);
    }
  });
}

// ---- the weight passes (small tensors; the host splits output channels into tasks) -----------------------
namespace {

// Weight element `index` (logical, in its candidate's kernel) at weight bit-width e.
inline float weight_value(const MqcWeightQuant& e, float w, int64_t index) {
  if (e.bits == 0) return w;
  if (e.noise) return e.noisy[index];
  return fq_forward(w, e.scale, e.inv_scale, 0.f, e.qmin, e.qmax);
}

}  // namespace

void mqc_merge_weight_rows(const MqcWeightJob& job, int64_t co_begin, int64_t co_end) {
  const int64_t n_w = job.n_w, n_a = job.n_a, cout_g = job.cout / job.groups;
  float q[kMqcMaxBits];
  for (int64_t co = co_begin; co < co_end; ++co) {
    for (int64_t k = 0; k < job.ci_g; ++k)
      for (int64_t r = 0; r < job.kh; ++r)
        for (int64_t c = 0; c < job.kw; ++c) job.wg[co * job.s0 + k * job.s1 + r * job.s2 + c * job.s3] = 0.f;
    const int64_t base = (co / cout_g) * job.ci_g;  // first xq channel of co's conv group
    for (int m = 0; m < job.n_members; ++m) {
      const MqcWeightJob::Member& mb = job.member[m];
      const int64_t cin_o = job.cin / mb.groups, cout_o = job.cout / mb.groups;
      const int64_t c0 = (co / cout_o) * cin_o;  // first input channel of co's candidate group
      const float* w = mb.w + co * cin_o * mb.kh * mb.kw;
      const MqcWeightQuant* wq = job.quant + mb.o * n_w;
      const float* pr = job.probs + mb.o * n_w * n_a;
      for (int64_t cil = 0; cil < cin_o; ++cil) {
        const int64_t* xch = job.xch + c0 + cil;
        for (int64_t th = 0; th < mb.kh; ++th) {
          for (int64_t tw = 0; tw < mb.kw; ++tw) {
            const int64_t idx = (cil * mb.kh + th) * mb.kw + tw;
            const float wv = w[idx];
            for (int64_t i = 0; i < n_w; ++i) q[i] = weight_value(wq[i], wv, co * cin_o * mb.kh * mb.kw + idx);
            int64_t row, col;
            mqc_tap_position(th, tw, mb.kh, mb.kw, mb.ratio, job.kh, job.kw, &row, &col);
            float* dst = job.wg + co * job.s0 + row * job.s2 + col * job.s3;
            for (int64_t j = 0; j < n_a; ++j) {
              float acc = 0.f;
              for (int64_t i = 0; i < n_w; ++i) acc += pr[i * n_a + j] * q[i];
              dst[(xch[j * job.cin] - base) * job.s1] += acc;
            }
          }
        }
      }
    }
  }
}

void mqc_weight_backward_units(const MqcWeightJob& job, int64_t u_begin, int64_t u_end) {
  const int64_t n_w = job.n_w, n_a = job.n_a, cout_g = job.cout / job.groups;
  float gs[kMqcMaxBits];
  for (int64_t u = u_begin; u < u_end; ++u) {
    const int m = static_cast<int>(u / job.cout);
    const int64_t co = u % job.cout;
    const MqcWeightJob::Member& mb = job.member[m];
    const int64_t cin_o = job.cin / mb.groups, cout_o = job.cout / mb.groups;
    const int64_t c0 = (co / cout_o) * cin_o, base = (co / cout_g) * job.ci_g;
    const int64_t row_len = cin_o * mb.kh * mb.kw;
    const float* w = mb.w + co * row_len;
    float* gw = mb.grad_w + co * row_len;
    const MqcWeightQuant* wq = job.quant + mb.o * n_w;
    const float* pr = job.probs + mb.o * n_w * n_a;
    double* pp = job.part_p + u * n_w * n_a;
    double* ps = job.part_s + u * n_w;
    float acc_p[kMqcMaxBits * kMqcMaxBits] = {};
    float acc_s[kMqcMaxBits] = {};
    for (int64_t cil = 0; cil < cin_o; ++cil) {
      const int64_t* xch = job.xch + c0 + cil;
      for (int64_t th = 0; th < mb.kh; ++th) {
        for (int64_t tw = 0; tw < mb.kw; ++tw) {
          const int64_t idx = (cil * mb.kh + th) * mb.kw + tw;
          const float wv = w[idx];
          int64_t row, col;
          mqc_tap_position(th, tw, mb.kh, mb.kw, mb.ratio, job.kh, job.kw, &row, &col);
          const float* src = job.gwg + co * job.s0 + row * job.s2 + col * job.s3;
          for (int64_t j = 0; j < n_a; ++j) gs[j] = src[(xch[j * job.cin] - base) * job.s1];
          float gsum = 0.f;
          for (int64_t i = 0; i < n_w; ++i) {
            const MqcWeightQuant& e = wq[i];
            const float qi = weight_value(e, wv, co * row_len + idx);
            float gi = 0.f;
            for (int64_t j = 0; j < n_a; ++j) {
              acc_p[i * n_a + j] += gs[j] * qi;
              gi += pr[i * n_a + j] * gs[j];
            }
            if (e.bits == 0 || e.noise) {  // noise: identity gradient, no scale
              gsum += gi;
            } else {
              const FqGrad fg = fq_backward(wv, gi, e.scale, e.inv_scale, 0.f, e.qmin, e.qmax, 1.f);
              gsum += fg.dx;
              acc_s[i] += fg.dscale;
            }
          }
          gw[idx] = gsum;
        }
      }
      // Flush the float partials to double once per input channel: short float sums, exact-ish totals.
      for (int64_t k = 0; k < n_w * n_a; ++k) {
        pp[k] += acc_p[k];
        acc_p[k] = 0.f;
      }
      for (int64_t i = 0; i < n_w; ++i) {
        ps[i] += acc_s[i];
        acc_s[i] = 0.f;
      }
    }
  }
}

}  // namespace qops::cpu::CPU_CAPABILITY
