// Hot loops of torch.ops.qops.packed_conv2d / quantized_conv2d / requantized_conv2d on CPU, compiled once per
// ISA (setup.py). The entry point (csrc/cpu/packed_conv2d.cpp) unpacks the bit-plane weights
// (csrc/include/qops/packed_layout.h) into int8 codes, picks the path and calls packed_conv2d_kernel, which
// builds the path's weight panel and shares blocks of output rows among the threads (run_blocked): each
// work item lays out the activation rows of its block (range check / float quantization fused) in a
// thread-local buffer, runs the path's register tile over it and writes int32, dequantized float or the
// next layer's codes (optionally pixel-shuffled) as NCHW output. Every path computes the same exact
// integers. docs/kernels.md describes the paths for users.
//
//   scalar     direct convolution on the codes (portable; the only path of the DEFAULT build).
//   dot        activations as offset codes u = x + 2^(a-1)·signed in [0, 2^a) (4 channels of a pixel in
//              one dword), weights as int8 dwords broadcast per output channel; vpmaddubsw u8 x s8 ->
//              int16 pairs. Where the pair sum can not saturate, int16 partial sums are accumulated with
//              vpaddw for L = 32767 / max|pair| steps before vpmaddwd widens them to int32: low
//              bit-widths need one multiply per 32 MACs instead of two (the int8 kernel's vpmaddubsw +
//              vpmaddwd). a8 x w8 (the one pair that can saturate) runs on int16 codes with vpmaddwd.
//              AVX512 builds with VNNI use vpdpbusd (u8 x s8 -> int32, never saturates) in an 8x3 tile of
//              zmm registers (8 output channels x 48 pixels, segments of 16).
//              Signed activations: sum x·w = sum u·w - 2^(a-1)·sum w, padding holds u = 2^(a-1).
//   lut        (a_bits <= 2) g = 4 / a_bits activations of one pixel form a 4-bit index; per output
//              channel and step a 16-entry table holds sum_t x_t·w_t for every index, biased by its own
//              minimum; vpshufb looks up 32 pixels at once and vpaddb accumulates bytes for
//              255 / (g·max|w|·(2^a - 1)) steps before widening: g MACs per byte lookup.
//   bitserial  two's complement bit-planes of activations (64 channels per uint64, per pixel) and of
//              weights; acc = sum_ij c_i d_j popcount(A_i & W_j) with c, d = ±2^i (the top plane of a
//              signed operand negative; 1-bit weights ±1 as 2·b - 1, i.e. planes {b: 2, ones: -1}).
//              AVX2 counts bits with a nibble table (vpshufb), bytes summed with vpsadbw; AVX512 uses
//              vpopcntq where the CPU has VPOPCNTDQ. (A reference-speed path on AVX2: dot/lut are faster.)
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <vector>

#include "../packed_conv2d.h"
#include "../packed_parallel.h"
#include "qops/parallel_grain.h"

#if defined(CPU_CAPABILITY_AVX2) || defined(CPU_CAPABILITY_AVX512)
#include <immintrin.h>
#define QOPS_PC_AVX2 1
#endif
// GCC 12 flags _mm512_undefined_*() inside its own AVX-512 intrinsics as "may be used uninitialized".
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

namespace qops::cpu::CPU_CAPABILITY {

namespace {

// ---------------------------------------------------------------------------------------------
// Shared pieces: activation ranges, row loading (with the range check / float quantization), output.

struct ActRange {
  int bits;
  bool is_signed;
  int lo, hi;   // code range
  int off;      // offset code u = x + off is in [0, 2^bits)
  int mask;     // 2^bits - 1
};

ActRange act_range(const PackedConvParams& p) {
  ActRange r;
  r.bits = p.a_bits;
  r.is_signed = p.a_signed;
  r.mask = (1 << p.a_bits) - 1;
  r.off = p.a_signed ? 1 << (p.a_bits - 1) : 0;
  r.lo = -r.off;
  r.hi = r.mask - r.off;
  return r;
}

template <typename T>
std::unique_ptr<T[]> uninit(int64_t n) {
  return std::unique_ptr<T[]>(new T[static_cast<size_t>(std::max<int64_t>(n, 1))]);
}

// Offset codes u = x + off of input row (n, c, iy), W values, into dst. Quantizes float input as
// fake_quant does (nearbyint(x * inv_scale), clamped). Returns nonzero if an x_codes value was outside
// the activation range.
uint32_t load_row(const PackedConvParams& p, const ActRange& r, int64_t n, int64_t c, int64_t iy, uint8_t* dst) {
  const int64_t W = p.W;
  const int64_t row = ((n * p.Cin + c) * p.H + iy) * W;
  int64_t i = 0;
  if (p.x_codes != nullptr) {
    const uint8_t* src = p.x_codes + row;
    const uint8_t off = static_cast<uint8_t>(r.off);
    const uint8_t outside = static_cast<uint8_t>(~r.mask);
    uint32_t bad = 0;
#if defined(QOPS_PC_AVX2)
    const __m256i voff = _mm256_set1_epi8(static_cast<char>(off));
    const __m256i vout = _mm256_set1_epi8(static_cast<char>(outside));
    __m256i vbad = _mm256_setzero_si256();
    for (; i + 32 <= W; i += 32) {
      const __m256i v = _mm256_add_epi8(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + i)), voff);
      vbad = _mm256_or_si256(vbad, _mm256_and_si256(v, vout));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + i), v);
    }
    bad = _mm256_testz_si256(vbad, vbad) ? 0u : 1u;
#endif
    for (; i < W; ++i) {
      const uint8_t v = static_cast<uint8_t>(src[i] + off);
      bad |= v & outside;
      dst[i] = v;
    }
    return bad;
  }
  const float* src = p.x_float + row;
  const float inv = p.a_inv_scale;
  const float lo = static_cast<float>(r.lo), hi = static_cast<float>(r.hi);
#if defined(QOPS_PC_AVX2)
  const __m256 vinv = _mm256_set1_ps(inv), vlo = _mm256_set1_ps(lo), vhi = _mm256_set1_ps(hi);
  const __m256i voff = _mm256_set1_epi32(r.off);
  const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
  for (; i + 32 <= W; i += 32) {
    __m256i q[4];
    for (int k = 0; k < 4; ++k) {
      __m256 f = _mm256_mul_ps(_mm256_loadu_ps(src + i + 8 * k), vinv);
      f = _mm256_round_ps(f, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
      f = _mm256_min_ps(_mm256_max_ps(f, vlo), vhi);  // max(NaN, lo) = lo, as fmaxf
      q[k] = _mm256_add_epi32(_mm256_cvtps_epi32(f), voff);
    }
    const __m256i b = _mm256_packus_epi16(_mm256_packs_epi32(q[0], q[1]), _mm256_packs_epi32(q[2], q[3]));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + i), _mm256_permutevar8x32_epi32(b, order));
  }
#endif
  for (; i < W; ++i) {
    const float f = std::fmin(std::fmax(std::nearbyint(src[i] * inv), lo), hi);
    dst[i] = static_cast<uint8_t>(static_cast<int>(f) + r.off);
  }
  return 0;
}

// count codes clamp(nearbyint(relu?(fma(v[t] - corr, s, b)) * out_inv_scale)) into o (requantization
// epilogue, csrc/cpu/packed_conv2d.h).
inline void emit_codes(const PackedConvParams& p, const int32_t* v, int64_t count, int32_t corr, float s, float b,
                       uint8_t* o) {
  const float inv = p.out_inv_scale;
  const float lo = static_cast<float>(p.out_lo), hi = static_cast<float>(p.out_hi);
  const bool relu = p.out_relu;
  int64_t t = 0;
#if defined(CPU_CAPABILITY_AVX512)
  {
    // 16 at a time; vpmov(u)sdb narrows with saturation (the values are already within the code range).
    const __m512i vc = _mm512_set1_epi32(corr);
    const __m512 vs = _mm512_set1_ps(s), vb = _mm512_set1_ps(b), vinv = _mm512_set1_ps(inv);
    const __m512 vlo = _mm512_set1_ps(lo), vhi = _mm512_set1_ps(hi), zero = _mm512_setzero_ps();
    const bool is_signed = p.out_lo < 0;
    for (; t + 16 <= count; t += 16) {
      const __m512i a = _mm512_sub_epi32(_mm512_loadu_si512(v + t), vc);
      __m512 f = _mm512_fmadd_ps(_mm512_cvtepi32_ps(a), vs, vb);
      if (relu) f = _mm512_max_ps(f, zero);
      f = _mm512_roundscale_ps(_mm512_mul_ps(f, vinv), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
      f = _mm512_min_ps(_mm512_max_ps(f, vlo), vhi);  // max(NaN, lo) = lo, as fmaxf
      const __m512i q = _mm512_cvtps_epi32(f);
      _mm_storeu_si128(reinterpret_cast<__m128i*>(o + t), is_signed ? _mm512_cvtsepi32_epi8(q) : _mm512_cvtusepi32_epi8(q));
    }
  }
#endif
#if defined(QOPS_PC_AVX2)
  {
    const __m256i vc = _mm256_set1_epi32(corr);
    const __m256 vs = _mm256_set1_ps(s), vb = _mm256_set1_ps(b), vinv = _mm256_set1_ps(inv);
    const __m256 vlo = _mm256_set1_ps(lo), vhi = _mm256_set1_ps(hi), zero = _mm256_setzero_ps();
    const bool is_signed = p.out_lo < 0;
    for (; t + 8 <= count; t += 8) {
      const __m256i a = _mm256_sub_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(v + t)), vc);
      __m256 f = _mm256_fmadd_ps(_mm256_cvtepi32_ps(a), vs, vb);
      if (relu) f = _mm256_max_ps(f, zero);
      f = _mm256_round_ps(_mm256_mul_ps(f, vinv), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
      f = _mm256_min_ps(_mm256_max_ps(f, vlo), vhi);  // max(NaN, lo) = lo, as fmaxf
      const __m256i q = _mm256_cvtps_epi32(f);
      const __m128i w = _mm_packs_epi32(_mm256_castsi256_si128(q), _mm256_extracti128_si256(q, 1));
      _mm_storel_epi64(reinterpret_cast<__m128i*>(o + t), is_signed ? _mm_packs_epi16(w, w) : _mm_packus_epi16(w, w));
    }
  }
#endif
  for (; t < count; ++t) {
    float f = std::fma(static_cast<float>(v[t] - corr), s, b);
    if (relu) f = std::fmax(f, 0.f);
    f = std::fmin(std::fmax(std::nearbyint(f * inv), lo), hi);
    o[t] = static_cast<uint8_t>(static_cast<int>(f));
  }
}

// Writes count output values of (n, co, oy, ox0..): int32 acc, float y = fma(acc, scale[co], bias[co]), or the
// codes of y (requantization epilogue, csrc/cpu/packed_conv2d.h). acc = v[t] - corr. std::fma and the
// intrinsics round y once in every build, so each ISA computes the same floats and codes.
inline void emit(const PackedConvParams& p, int64_t n, int64_t co, int64_t oy, int64_t ox0, int64_t count,
                 const int32_t* v, int32_t corr) {
  const int64_t idx = ((n * p.Cout + co) * p.Ho + oy) * p.Wo + ox0;
  int64_t t = 0;
  if (p.out_i32 != nullptr) {
    int32_t* o = p.out_i32 + idx;
#if defined(QOPS_PC_AVX2)
    const __m256i vc = _mm256_set1_epi32(corr);
    for (; t + 8 <= count; t += 8)
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(o + t),
                          _mm256_sub_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(v + t)), vc));
#endif
    for (; t < count; ++t) o[t] = v[t] - corr;
    return;
  }
  const float s = p.out_scale[co];
  const float b = p.bias != nullptr ? p.bias[co] : 0.f;
  if (p.out_f != nullptr) {
    float* o = p.out_f + idx;
#if defined(QOPS_PC_AVX2)
    const __m256i vc = _mm256_set1_epi32(corr);
    const __m256 vs = _mm256_set1_ps(s), vb = _mm256_set1_ps(b);
    for (; t + 8 <= count; t += 8) {
      const __m256i a = _mm256_sub_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(v + t)), vc);
      _mm256_storeu_ps(o + t, _mm256_fmadd_ps(_mm256_cvtepi32_ps(a), vs, vb));
    }
#endif
    for (; t < count; ++t) o[t] = std::fma(static_cast<float>(v[t] - corr), s, b);
    return;
  }
  if (p.out_shuffle == 1) return emit_codes(p, v, count, corr, s, b, p.out_codes + idx);
  // Pixel shuffle in the epilogue: channel co = c r^2 + dy r + dx of pixel (oy, ox) goes to channel c,
  // pixel (oy r + dy, ox r + dx) of the [N, Cout / r^2, Ho r, Wo r] output.
  const int64_t r = p.out_shuffle, sub = co % (r * r);
  uint8_t* o = p.out_codes + (((n * (p.Cout / (r * r)) + co / (r * r)) * p.Ho + oy) * r + sub / r) * (p.Wo * r) +
               ox0 * r + sub % r;
  alignas(64) uint8_t tmp[64];
  for (int64_t t0 = 0; t0 < count; t0 += 64) {
    const int64_t m = std::min<int64_t>(64, count - t0);
    emit_codes(p, v + t0, m, corr, s, b, tmp);
    for (int64_t k = 0; k < m; ++k) o[(t0 + k) * r] = tmp[k];
  }
}

// Codes of channels co (dx = 0) and co + 1 (dx = 1) of a pixel shuffle by 2 (co even), interleaved into their
// shared output row: the two channels' count codes become 2 count consecutive bytes.
inline void emit_shuffle2(const PackedConvParams& p, int64_t n, int64_t co, int64_t oy, int64_t ox0, int64_t count,
                          const int32_t* v0, const int32_t* v1, int32_t corr0, int32_t corr1) {
  const int64_t sub = co % 4;
  uint8_t* o = p.out_codes + (((n * (p.Cout / 4) + co / 4) * p.Ho + oy) * 2 + sub / 2) * (p.Wo * 2) + ox0 * 2;
  const float b0 = p.bias != nullptr ? p.bias[co] : 0.f, b1 = p.bias != nullptr ? p.bias[co + 1] : 0.f;
  alignas(64) uint8_t t0[64], t1[64];
  for (int64_t k0 = 0; k0 < count; k0 += 64) {
    const int64_t m = std::min<int64_t>(64, count - k0);
    emit_codes(p, v0 + k0, m, corr0, p.out_scale[co], b0, t0);
    emit_codes(p, v1 + k0, m, corr1, p.out_scale[co + 1], b1, t1);
    int64_t k = 0;
#if defined(QOPS_PC_AVX2)
    for (; k + 16 <= m; k += 16) {
      const __m128i a = _mm_load_si128(reinterpret_cast<const __m128i*>(t0 + k));
      const __m128i b = _mm_load_si128(reinterpret_cast<const __m128i*>(t1 + k));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(o + 2 * (k0 + k)), _mm_unpacklo_epi8(a, b));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(o + 2 * (k0 + k) + 16), _mm_unpackhi_epi8(a, b));
    }
#endif
    for (; k < m; ++k) {
      o[2 * (k0 + k)] = t0[k];
      o[2 * (k0 + k) + 1] = t1[k];
    }
  }
}

#if defined(CPU_CAPABILITY_AVX512)
// emit() of a whole MR x NR tile of 16-pixel segments as codes (no pixel shuffle), the per-channel factors and
// the constants loaded once: the same operations as emit_codes, a masked store for a segment cut by the
// row's end.
template <int MR, int NR>
void emit_codes_tile16(const PackedConvParams& p, int64_t n, int64_t cb, const int64_t* oy, const int64_t* ox0,
                       int nvalid, const int32_t (*res)[NR][16], const int32_t* corr) {
  const __m512 vinv = _mm512_set1_ps(p.out_inv_scale), zero = _mm512_setzero_ps();
  const __m512 vlo = _mm512_set1_ps(static_cast<float>(p.out_lo)), vhi = _mm512_set1_ps(static_cast<float>(p.out_hi));
  const bool is_signed = p.out_lo < 0, relu = p.out_relu;
  int64_t off[NR];
  __mmask16 mask[NR];
  for (int j = 0; j < nvalid; ++j) {
    off[j] = oy[j] * p.Wo + ox0[j];
    const int64_t count = std::min<int64_t>(16, p.Wo - ox0[j]);
    mask[j] = static_cast<__mmask16>((1u << count) - 1u);
  }
  for (int i = 0; i < MR && cb * MR + i < p.Cout; ++i) {
    const int64_t co = cb * MR + i;
    const __m512 vs = _mm512_set1_ps(p.out_scale[co]);
    const __m512 vb = _mm512_set1_ps(p.bias != nullptr ? p.bias[co] : 0.f);
    const __m512i vc = _mm512_set1_epi32(corr[co]);
    uint8_t* plane = p.out_codes + (n * p.Cout + co) * p.Ho * p.Wo;
    for (int j = 0; j < nvalid; ++j) {
      const __m512i a = _mm512_sub_epi32(_mm512_load_si512(res[i][j]), vc);
      __m512 f = _mm512_fmadd_ps(_mm512_cvtepi32_ps(a), vs, vb);
      if (relu) f = _mm512_max_ps(f, zero);
      f = _mm512_roundscale_ps(_mm512_mul_ps(f, vinv), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
      f = _mm512_min_ps(_mm512_max_ps(f, vlo), vhi);  // max(NaN, lo) = lo, as fmaxf
      const __m512i q = _mm512_cvtps_epi32(f);
      const __m128i b = is_signed ? _mm512_cvtsepi32_epi8(q) : _mm512_cvtusepi32_epi8(q);
      _mm_mask_storeu_epi8(plane + off[j], mask[j], b);
    }
  }
}
#endif

// Tiles of output pixels: segments of SEG consecutive pixels of one output row, grouped by NR.
struct Segments {
  int64_t seg, per_row, total, groups;
  Segments(const PackedConvParams& p, int64_t seg_px, int64_t nr)
      : seg(seg_px), per_row((p.Wo + seg_px - 1) / seg_px), total(p.Ho * per_row), groups((total + nr - 1) / nr) {}
  // Segment t (clamped to the last one for the padding of the last group): row and first column.
  void at(int64_t t, int64_t* oy, int64_t* ox0) const {
    t = std::min(t, total - 1);
    *oy = t / per_row;
    *ox0 = (t % per_row) * seg;
  }
};

// Sets `flag` if any thread saw a bad activation code.
struct BadFlag {
  std::atomic<uint32_t> v{0};
  void add(uint32_t b) {
    if (b != 0) v.store(1, std::memory_order_relaxed);
  }
  bool ok() const { return v.load() == 0; }
};

// ---------------------------------------------------------------------------------------------
// scalar: direct convolution on the codes, exact int32. Reads activation codes through load_row (range
// check, float quantization) one input channel plane at a time.

bool run_scalar(const PackedConvParams& p) {
  const ActRange r = act_range(p);
  const int64_t HW = p.H * p.W;
  // Signed activation values, NCHW.
  auto xv = uninit<int16_t>(p.N * p.Cin * HW);
  BadFlag bad;
  at::parallel_for(0, p.N * p.Cin * p.H, parallel_grain(p.W), [&](int64_t b, int64_t e) {
    std::vector<uint8_t> row(static_cast<size_t>(p.W));
    uint32_t flag = 0;
    for (int64_t t = b; t < e; ++t) {
      const int64_t iy = t % p.H, nc = t / p.H;
      flag |= load_row(p, r, nc / p.Cin, nc % p.Cin, iy, row.data());
      int16_t* dst = xv.get() + t * p.W;
      for (int64_t i = 0; i < p.W; ++i) dst[i] = static_cast<int16_t>(row[i] - r.off);
    }
    bad.add(flag);
  });
  if (!bad.ok()) return false;
  const int64_t K = p.Cin * p.KH * p.KW;
  at::parallel_for(0, p.N * p.Cout, parallel_grain(p.Ho * p.Wo * K), [&](int64_t b, int64_t e) {
    std::vector<int32_t> acc(static_cast<size_t>(p.Wo));
    for (int64_t t = b; t < e; ++t) {
      const int64_t n = t / p.Cout, co = t % p.Cout;
      const int8_t* w = p.w_codes + co * K;
      for (int64_t oy = 0; oy < p.Ho; ++oy) {
        std::fill(acc.begin(), acc.end(), 0);
        for (int64_t ci = 0; ci < p.Cin; ++ci) {
          for (int64_t ky = 0; ky < p.KH; ++ky) {
            const int64_t iy = oy * p.SH - p.PH + ky;
            if (iy < 0 || iy >= p.H) continue;
            const int16_t* xrow = xv.get() + ((n * p.Cin + ci) * p.H + iy) * p.W;
            for (int64_t kx = 0; kx < p.KW; ++kx) {
              const int32_t wv = w[(ci * p.KH + ky) * p.KW + kx];
              if (wv == 0) continue;
              // Output columns whose input column ox * SW - PW + kx lies inside the row.
              const int64_t shift = p.PW - kx;
              const int64_t lo = shift > 0 ? (shift + p.SW - 1) / p.SW : 0;
              // Division truncates toward zero: a tap left of the whole row (W - 1 + shift < 0) has no column.
              if (p.W - 1 + shift < 0) continue;
              const int64_t hi = std::min<int64_t>(p.Wo - 1, (p.W - 1 + shift) / p.SW);
              if (p.SW == 1) {
                const int16_t* xs = xrow - shift;
                for (int64_t ox = lo; ox <= hi; ++ox) acc[ox] += wv * xs[ox];
              } else {
                for (int64_t ox = lo; ox <= hi; ++ox) acc[ox] += wv * xrow[ox * p.SW - shift];
              }
            }
          }
        }
        emit(p, n, co, oy, 0, p.Wo, acc.data(), 0);
      }
    }
  });
  return true;
}

#if defined(QOPS_PC_AVX2)

// One padded input row in offset codes: tmp[xp] for xp in [0, width), input column xp - PW, pad value
// `pad` outside the image (and for rows outside it or channels >= Cin).
uint32_t padded_row(const PackedConvParams& p, const ActRange& r, int64_t n, int64_t c, int64_t yp, int64_t width,
                    uint8_t pad, uint8_t* tmp) {
  const int64_t iy = yp - p.PH;
  if (c >= p.Cin || iy < 0 || iy >= p.H) {
    std::memset(tmp, pad, static_cast<size_t>(width));
    return 0;
  }
  std::memset(tmp, pad, static_cast<size_t>(std::min(p.PW, width)));
  const int64_t end = p.PW + p.W;
  if (end < width) std::memset(tmp + end, pad, static_cast<size_t>(width - end));
  return load_row(p, r, n, c, iy, tmp + p.PW);
}

// ---------------------------------------------------------------------------------------------
// Activation layout of the vector paths: per (image, channel group, column phase) a plane of padded rows
// yp in [0, Hp) and columns q in [0, Wq), where phase ph holds padded columns xp = q * SW + ph. The input
// column of output column ox and tap kx is then phase kx % SW, q = ox + kx / SW: consecutive output
// pixels read consecutive elements for any stride. `elem` bytes per (pixel, group).

struct ActLayout {
  int64_t groups, Hp, Wq, elem;
  int64_t row, plane, group, image;  // strides in bytes
  // rows: padded rows held (all of them, or one block of output rows and its halo).
  ActLayout(const PackedConvParams& p, int64_t groups_, int64_t seg_px, int64_t elem_, int64_t rows)
      : groups(groups_), elem(elem_) {
    const int64_t wo_pad = (p.Wo + seg_px - 1) / seg_px * seg_px;
    Hp = rows;
    Wq = wo_pad + (p.KW - 1) / p.SW;
    // Row-major over groups: one padded row holds every group (and phase) of its pixels, so the steps
    // (ky, group, kx) of a tile walk memory with one ascending stride (prefetch friendly).
    plane = Wq * elem;
    group = p.SW * plane;
    row = groups * group;
    image = Hp * row;
  }
  // Index of step (group g, tap ky, kx): the order of the weight panels and of step_offsets.
  int64_t step(const PackedConvParams& p, int64_t g, int64_t ky, int64_t kx) const {
    return (ky * groups + g) * p.KW + kx;
  }
  // Byte offset of step (group g, tap ky, kx) from a tile's base.
  int64_t step_offset(const PackedConvParams& p, int64_t g, int64_t ky, int64_t kx) const {
    return g * group + (kx % p.SW) * plane + ky * row + (kx / p.SW) * elem;
  }
  // Byte offset of output pixel (n, oy, ox) for step offset 0.
  int64_t base(const PackedConvParams& p, int64_t n, int64_t oy, int64_t ox) const {
    return n * image + oy * p.SH * row + ox * elem;
  }
  int64_t bytes(const PackedConvParams& p) const { return p.N * image; }
};

// Step offsets for steps s = (g, ky, kx), g-major.
std::vector<int64_t> step_offsets(const PackedConvParams& p, const ActLayout& L) {
  std::vector<int64_t> offs(static_cast<size_t>(L.groups * p.KH * p.KW));
  for (int64_t g = 0; g < L.groups; ++g)
    for (int64_t ky = 0; ky < p.KH; ++ky)
      for (int64_t kx = 0; kx < p.KW; ++kx) offs[static_cast<size_t>(L.step(p, g, ky, kx))] = L.step_offset(p, g, ky, kx);
  return offs;
}

// Width of the padded temp rows: every padded column any phase reads, and the whole input row.
int64_t padded_width(const PackedConvParams& p, const ActLayout& L) {
  return std::max(L.Wq * p.SW, p.PW + p.W);
}

// Multiply-adds of the whole convolution.
int64_t conv_macs(const PackedConvParams& p) { return p.N * p.Ho * p.Wo * p.Cout * p.Cin * p.KH * p.KW; }

// Output rows per work item of run_blocked: the item's activation block (its rows plus the KH - SH halo)
// within ~256 KiB so that it stays in L2 while the tiles use it, and at least 8 items per thread, so that
// the threads, which take items one at a time (run_blocked), end together even when one of them lost its
// core for a while (a shared machine).
int64_t block_rows(const PackedConvParams& p, int64_t bytes_per_row) {
  // The threads the problem is worth: a small one stays in one block per image (no halo rows loaded twice).
  const int64_t threads = parallel_threads(conv_macs(p), at::get_num_threads(), kParallelMinMacs);
  const int64_t fit = std::max<int64_t>(1, ((256 << 10) / std::max<int64_t>(bytes_per_row, 1) - p.KH) / p.SH + 1);
  const int64_t items = std::max<int64_t>(threads > 1 ? 8 * threads : 1, p.N * ((p.Ho + fit - 1) / fit));
  const int64_t per_image = std::max<int64_t>(1, items / p.N);
  return std::max<int64_t>(1, (p.Ho + per_image - 1) / per_image);
}

// The convolution of the vector paths in one parallel region. A work item is a block of R output rows of
// one image: it lays out the activation rows the block reads (fill(n, group, padded row, tmp, out): writes
// phase ph of the row at out + ph * L.plane) into a thread-local buffer with layout L (L.Hp = the rows of
// a full block), then runs tile(bases, cb, res) for every block of MR output channels (outer, so that
// one block's weights stay in L1) and group of NR segments of SEG pixels, and writes the results minus
// corr[co]. Threads take items from a shared counter without spin-waiting (run_shared, packed_parallel.h: a
// thread that gets no core on a busy machine leaves its items to the others instead of stalling the layer).
// Returns false if fill reported an activation code out of range.
template <int MR, int NR, int SEG, typename Fill, typename Tile>
bool run_blocked(const PackedConvParams& p, const ActLayout& L, int64_t R, int64_t CB, const int32_t* corr,
                 int64_t tmp_bytes, Fill fill, Tile tile) {
  const int64_t nb = (p.Ho + R - 1) / R;
  const int64_t per_row = (p.Wo + SEG - 1) / SEG;
  const int64_t items = p.N * nb;
  BadFlag bad;
  const bool shuffle2 = p.out_codes != nullptr && p.out_shuffle == 2;
  const bool codes16 = p.out_codes != nullptr && p.out_shuffle == 1;  // emit_codes_tile16 (AVX512, SEG 16)
  (void)codes16;
  const int64_t workers =
      std::min(items, parallel_threads(conv_macs(p), at::get_num_threads(), kParallelMinMacs));
  run_shared(items, workers, [&](int64_t first, const Claim& claim) {
    auto buf = uninit<uint8_t>(L.image);
    std::vector<uint8_t> tmp(static_cast<size_t>(tmp_bytes));
    alignas(64) int32_t res[MR][NR][SEG];
    std::vector<const uint8_t*> bases(static_cast<size_t>((R * per_row + NR - 1) / NR * NR));
    std::vector<int64_t> oy(bases.size()), ox0(bases.size());
    uint32_t flag = 0;
    for (int64_t t = first; t >= 0; t = claim()) {
      const int64_t n = t / nb, oy0 = (t % nb) * R, oy1 = std::min(p.Ho, oy0 + R);
      const int64_t y0 = oy0 * p.SH, rows = (oy1 - 1 - oy0) * p.SH + p.KH;
      for (int64_t g = 0; g < L.groups; ++g)
        for (int64_t r = 0; r < rows; ++r) flag |= fill(n, g, y0 + r, tmp.data(), buf.get() + g * L.group + r * L.row);
      const int64_t nseg = (oy1 - oy0) * per_row, ngroups = (nseg + NR - 1) / NR;
      for (int64_t k = 0; k < ngroups * NR; ++k) {
        const int64_t sg = std::min(k, nseg - 1);
        oy[k] = oy0 + sg / per_row;
        ox0[k] = (sg % per_row) * SEG;
        bases[k] = buf.get() + (oy[k] - oy0) * p.SH * L.row + ox0[k] * L.elem;
      }
      for (int64_t cb = 0; cb < CB; ++cb)
        for (int64_t gi = 0; gi < ngroups; ++gi) {
          const int64_t k0 = gi * NR;
          tile(bases.data() + k0, cb, res);
          const int nvalid = static_cast<int>(std::min<int64_t>(NR, nseg - k0));
#if defined(CPU_CAPABILITY_AVX512)
          if constexpr (SEG == 16) {
            if (codes16) {
              emit_codes_tile16<MR, NR>(p, n, cb, oy.data() + k0, ox0.data() + k0, nvalid, res, corr);
              continue;
            }
          }
#endif
          for (int i = 0; i < MR && cb * MR + i < p.Cout; ++i) {
            const int64_t co = cb * MR + i;
            // A pixel shuffle by 2 pairs channels co, co + 1 in one output row (Cout % 4 == 0, co even).
            if (shuffle2 && co % 2 == 0 && i + 1 < MR) {
              for (int j = 0; j < nvalid; ++j)
                emit_shuffle2(p, n, co, oy[k0 + j], ox0[k0 + j], std::min<int64_t>(SEG, p.Wo - ox0[k0 + j]),
                              res[i][j], res[i + 1][j], corr[co], corr[co + 1]);
              ++i;
              continue;
            }
            for (int j = 0; j < nvalid; ++j)
              emit(p, n, co, oy[k0 + j], ox0[k0 + j], std::min<int64_t>(SEG, p.Wo - ox0[k0 + j]), res[i][j], corr[co]);
          }
        }
    }
    bad.add(flag);
  });
  return bad.ok();
}

// Interleaves 4 byte rows into dwords: out[4 q + e] = rows[e][q * SW + ph] for q in [0, Wq).
void interleave4(const uint8_t* const rows[4], int64_t sw, int64_t ph, int64_t Wq, uint8_t* out) {
  int64_t q = 0;
  if (sw == 1) {
    for (; q + 32 <= Wq; q += 32) {
      const __m256i a = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(rows[0] + q));
      const __m256i b = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(rows[1] + q));
      const __m256i c = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(rows[2] + q));
      const __m256i d = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(rows[3] + q));
      const __m256i ab_lo = _mm256_unpacklo_epi8(a, b), ab_hi = _mm256_unpackhi_epi8(a, b);
      const __m256i cd_lo = _mm256_unpacklo_epi8(c, d), cd_hi = _mm256_unpackhi_epi8(c, d);
      const __m256i x0 = _mm256_unpacklo_epi16(ab_lo, cd_lo);  // pixels 0-3 | 16-19
      const __m256i x1 = _mm256_unpackhi_epi16(ab_lo, cd_lo);  // 4-7 | 20-23
      const __m256i x2 = _mm256_unpacklo_epi16(ab_hi, cd_hi);  // 8-11 | 24-27
      const __m256i x3 = _mm256_unpackhi_epi16(ab_hi, cd_hi);  // 12-15 | 28-31
      __m256i* o = reinterpret_cast<__m256i*>(out + 4 * q);
      _mm256_storeu_si256(o + 0, _mm256_permute2x128_si256(x0, x1, 0x20));
      _mm256_storeu_si256(o + 1, _mm256_permute2x128_si256(x2, x3, 0x20));
      _mm256_storeu_si256(o + 2, _mm256_permute2x128_si256(x0, x1, 0x31));
      _mm256_storeu_si256(o + 3, _mm256_permute2x128_si256(x2, x3, 0x31));
    }
  }
  for (; q < Wq; ++q) {
    const int64_t xp = q * sw + ph;
    for (int e = 0; e < 4; ++e) out[4 * q + e] = rows[e][xp];
  }
}

// ---------------------------------------------------------------------------------------------
// dot path

enum class DotMode { U8_I16ACC, U8_I32ACC, I16 };

constexpr int kDotMR = 6;  // output channels per tile
constexpr int kDotNR = 2;  // segments of 8 pixels per tile

// The 6x2 register tiles of the dot and lut paths in inline asm: accumulators ymm0..ymm11 (output channel
// i, segment j in ymm(2i+j)), activations ymm12/13, the current weight operand ymm15, the product ymm14:
// all 16 registers. (Written as intrinsics, GCC 12 hoists the 12 multiplies of a step above their adds
// and spills half the accumulators.) Runs steps [0, n) from zeroed accumulators, then stores them to
// acc[12]. Per step s: activations at b0 + offs[s], b1 + offs[s]; weights at wp + s * WSTEP bytes.
#define QOPS_TILE_ACC2(i, A, B, LOADW, MUL, ADD) \
  LOADW(i) MUL("%%ymm12") ADD("%%ymm" #A) MUL("%%ymm13") ADD("%%ymm" #B)
#define QOPS_TILE_KERNEL(LOADW, MUL, ADD, WSTEP)                                                             \
  asm volatile(                                                                                              \
      "vpxor %%xmm0, %%xmm0, %%xmm0\n\tvpxor %%xmm1, %%xmm1, %%xmm1\n\tvpxor %%xmm2, %%xmm2, %%xmm2\n\t"        \
      "vpxor %%xmm3, %%xmm3, %%xmm3\n\tvpxor %%xmm4, %%xmm4, %%xmm4\n\tvpxor %%xmm5, %%xmm5, %%xmm5\n\t"        \
      "vpxor %%xmm6, %%xmm6, %%xmm6\n\tvpxor %%xmm7, %%xmm7, %%xmm7\n\tvpxor %%xmm8, %%xmm8, %%xmm8\n\t"        \
      "vpxor %%xmm9, %%xmm9, %%xmm9\n\tvpxor %%xmm10, %%xmm10, %%xmm10\n\tvpxor %%xmm11, %%xmm11, %%xmm11\n\t"  \
      "test %[n], %[n]\n\tjle 2f\n\t"                                                                        \
      ".p2align 4\n"                                                                                         \
      "1:\n\t"                                                                                               \
      "mov (%[offs]), %%rax\n\t"                                                                             \
      "vmovdqu (%[b0], %%rax), %%ymm12\n\t"                                                                  \
      "vmovdqu (%[b1], %%rax), %%ymm13\n\t"                                                                  \
      QOPS_TILE_ACC2(0, 0, 1, LOADW, MUL, ADD) QOPS_TILE_ACC2(1, 2, 3, LOADW, MUL, ADD)                      \
      QOPS_TILE_ACC2(2, 4, 5, LOADW, MUL, ADD) QOPS_TILE_ACC2(3, 6, 7, LOADW, MUL, ADD)                      \
      QOPS_TILE_ACC2(4, 8, 9, LOADW, MUL, ADD) QOPS_TILE_ACC2(5, 10, 11, LOADW, MUL, ADD)                    \
      "add $8, %[offs]\n\t"                                                                                  \
      "add $" #WSTEP ", %[wp]\n\t"                                                                           \
      "dec %[n]\n\t"                                                                                         \
      "jnz 1b\n"                                                                                             \
      "2:\n\t"                                                                                               \
      "vmovdqu %%ymm0, 0(%[acc])\n\tvmovdqu %%ymm1, 32(%[acc])\n\tvmovdqu %%ymm2, 64(%[acc])\n\t"              \
      "vmovdqu %%ymm3, 96(%[acc])\n\tvmovdqu %%ymm4, 128(%[acc])\n\tvmovdqu %%ymm5, 160(%[acc])\n\t"           \
      "vmovdqu %%ymm6, 192(%[acc])\n\tvmovdqu %%ymm7, 224(%[acc])\n\tvmovdqu %%ymm8, 256(%[acc])\n\t"          \
      "vmovdqu %%ymm9, 288(%[acc])\n\tvmovdqu %%ymm10, 320(%[acc])\n\tvmovdqu %%ymm11, 352(%[acc])\n\t"        \
      : [offs] "+r"(offs), [wp] "+r"(wp), [n] "+r"(n)                                                        \
      : [b0] "r"(b0), [b1] "r"(b1), [acc] "r"(acc), [ones] "m"(ones)                                         \
      : "rax", "cc", "memory", "xmm0", "xmm1", "xmm2", "xmm3", "xmm4", "xmm5", "xmm6", "xmm7", "xmm8", "xmm9", \
        "xmm10", "xmm11", "xmm12", "xmm13", "xmm14", "xmm15")
// dot: one int8x4 (or int16x2) weight dword broadcast per output channel, 6 per step.
#define QOPS_DOT_LOADW(i) "vpbroadcastd " #i "*4(%[wp]), %%ymm15\n\t"
#define QOPS_DOT_MUL_U8(act) "vpmaddubsw %%ymm15, " act ", %%ymm14\n\t"
#define QOPS_DOT_MUL_U8W(act) "vpmaddubsw %%ymm15, " act ", %%ymm14\n\tvpmaddwd %[ones], %%ymm14, %%ymm14\n\t"
#define QOPS_DOT_MUL_I16(act) "vpmaddwd %%ymm15, " act ", %%ymm14\n\t"
#define QOPS_ADD_B(acc) "vpaddb %%ymm14, " acc ", " acc "\n\t"
#define QOPS_ADD_W(acc) "vpaddw %%ymm14, " acc ", " acc "\n\t"
#define QOPS_ADD_D(acc) "vpaddd %%ymm14, " acc ", " acc "\n\t"
// lut: one 16-byte table per output channel (both lanes), looked up by the activation index bytes.
#define QOPS_LUT_LOADW(i) "vbroadcasti128 " #i "*16(%[wp]), %%ymm15\n\t"
#define QOPS_LUT_MUL(act) "vpshufb " act ", %%ymm15, %%ymm14\n\t"

template <DotMode MODE>
void dot_steps_6x2(const uint8_t* b0, const uint8_t* b1, const int64_t* offs, int64_t n, const int32_t* wp,
                   __m256i* acc) {
  const __m256i ones = _mm256_set1_epi16(1);
  if constexpr (MODE == DotMode::U8_I16ACC) {
    QOPS_TILE_KERNEL(QOPS_DOT_LOADW, QOPS_DOT_MUL_U8, QOPS_ADD_W, 24);
  } else if constexpr (MODE == DotMode::U8_I32ACC) {
    QOPS_TILE_KERNEL(QOPS_DOT_LOADW, QOPS_DOT_MUL_U8W, QOPS_ADD_D, 24);
  } else {
    QOPS_TILE_KERNEL(QOPS_DOT_LOADW, QOPS_DOT_MUL_I16, QOPS_ADD_D, 24);
  }
}

// out[i][j] (8 int32, pixel order) = sum over steps of the dot products of output channel i with the
// pixels of segment j. wp: [S][MR] dwords (4 int8 codes, or 2 int16 codes in I16 mode).
template <DotMode MODE>
void dot_tile(const uint8_t* const* base, const int64_t* offs, int64_t S, int64_t L, const int32_t* wp,
              int32_t (*out)[kDotNR][8]) {
  static_assert(kDotMR == 6 && kDotNR == 2, "dot_steps_6x2 is written for 6x2 tiles");
  __m256i acc[12];
  if constexpr (MODE == DotMode::U8_I16ACC) {
    const __m256i ones = _mm256_set1_epi16(1);
    __m256i sum[12];
    for (int k = 0; k < 12; ++k) sum[k] = _mm256_setzero_si256();
    for (int64_t s0 = 0; s0 < S; s0 += L) {
      const int64_t n = std::min(L, S - s0);
      dot_steps_6x2<MODE>(base[0], base[1], offs + s0, n, wp + s0 * kDotMR, acc);
      for (int k = 0; k < 12; ++k) sum[k] = _mm256_add_epi32(sum[k], _mm256_madd_epi16(acc[k], ones));
    }
    for (int k = 0; k < 12; ++k) _mm256_storeu_si256(reinterpret_cast<__m256i*>(out[k / 2][k % 2]), sum[k]);
  } else {
    dot_steps_6x2<MODE>(base[0], base[1], offs, S, wp, acc);
    for (int k = 0; k < 12; ++k) _mm256_storeu_si256(reinterpret_cast<__m256i*>(out[k / 2][k % 2]), acc[k]);
  }
}

// vpdpbusd: u8 x s8, 4 products summed into int32 without saturation, so one instruction per 32 MACs for
// every bit pair. Same operands and layout as the U8 modes above. The AVX512 build uses the AVX512-VNNI
// (EVEX, 256-bit) form, the AVX2 build the AVX-VNNI (VEX) form of AVX2-only CPUs with VNNI; both are
// chosen at run time from cpu_features() (csrc/cpu/packed_conv2d.cpp).
#if defined(CPU_CAPABILITY_AVX512)
#define QOPS_VNNI_TARGET "avx512vnni"
#define QOPS_DPBUSD _mm256_dpbusd_epi32
#else
#define QOPS_VNNI_TARGET "avxvnni"
#define QOPS_DPBUSD _mm256_dpbusd_avx_epi32
#endif
template <int MR, int NR>
__attribute__((target(QOPS_VNNI_TARGET))) void dot_tile_vnni(const uint8_t* const* base, const int64_t* offs,
                                                              int64_t S, const int32_t* wp, int32_t (*out)[NR][8]) {
  __m256i acc[MR][NR];
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NR; ++j) acc[i][j] = _mm256_setzero_si256();
  for (int64_t s = 0; s < S; ++s) {
    __m256i a[NR];
    for (int j = 0; j < NR; ++j) a[j] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(base[j] + offs[s]));
    for (int i = 0; i < MR; ++i) {
      const __m256i w = _mm256_set1_epi32(wp[s * MR + i]);
      for (int j = 0; j < NR; ++j) acc[i][j] = QOPS_DPBUSD(acc[i][j], a[j], w);
    }
  }
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NR; ++j) _mm256_storeu_si256(reinterpret_cast<__m256i*>(out[i][j]), acc[i][j]);
}
#undef QOPS_DPBUSD
#undef QOPS_VNNI_TARGET

#if defined(CPU_CAPABILITY_AVX512)
// The AVX512-VNNI tile: 8 output channels x 3 segments of 16 pixels in 24 zmm accumulators (channel i,
// segment j in zmm(3i + j)), the 3 activation vectors in zmm24..26, each weight dword broadcast from memory
// by the vpdpbusd itself ({1to16}): per step 3 loads and 24 vpdpbusd (1536 MACs), no register moves. In
// inline asm for the same reason as the 6x2 tiles. out[i][j] (16 int32, pixel order) = the sums over the
// steps; wp: [S][8] dwords.
constexpr int kZmmMR = 8;
constexpr int kZmmNR = 3;
__attribute__((target("avx512vnni"))) void dot_tile_zmm(const uint8_t* const* base, const int64_t* offs, int64_t n,
                                                        const int32_t* wp, int32_t (*out)[kZmmNR][16]) {
  const uint8_t *b0 = base[0], *b1 = base[1], *b2 = base[2];
  int32_t* acc = &out[0][0][0];
  asm volatile(
      "vpxord %%zmm0, %%zmm0, %%zmm0\n\t"
      "vpxord %%zmm1, %%zmm1, %%zmm1\n\t"
      "vpxord %%zmm2, %%zmm2, %%zmm2\n\t"
      "vpxord %%zmm3, %%zmm3, %%zmm3\n\t"
      "vpxord %%zmm4, %%zmm4, %%zmm4\n\t"
      "vpxord %%zmm5, %%zmm5, %%zmm5\n\t"
      "vpxord %%zmm6, %%zmm6, %%zmm6\n\t"
      "vpxord %%zmm7, %%zmm7, %%zmm7\n\t"
      "vpxord %%zmm8, %%zmm8, %%zmm8\n\t"
      "vpxord %%zmm9, %%zmm9, %%zmm9\n\t"
      "vpxord %%zmm10, %%zmm10, %%zmm10\n\t"
      "vpxord %%zmm11, %%zmm11, %%zmm11\n\t"
      "vpxord %%zmm12, %%zmm12, %%zmm12\n\t"
      "vpxord %%zmm13, %%zmm13, %%zmm13\n\t"
      "vpxord %%zmm14, %%zmm14, %%zmm14\n\t"
      "vpxord %%zmm15, %%zmm15, %%zmm15\n\t"
      "vpxord %%zmm16, %%zmm16, %%zmm16\n\t"
      "vpxord %%zmm17, %%zmm17, %%zmm17\n\t"
      "vpxord %%zmm18, %%zmm18, %%zmm18\n\t"
      "vpxord %%zmm19, %%zmm19, %%zmm19\n\t"
      "vpxord %%zmm20, %%zmm20, %%zmm20\n\t"
      "vpxord %%zmm21, %%zmm21, %%zmm21\n\t"
      "vpxord %%zmm22, %%zmm22, %%zmm22\n\t"
      "vpxord %%zmm23, %%zmm23, %%zmm23\n\t"
      "test %[n], %[n]\n\tjle 2f\n\t"
      ".p2align 4\n"
      "1:\n\t"
      "mov (%[offs]), %%rax\n\t"
      "vmovdqu64 (%[b0], %%rax), %%zmm24\n\t"
      "vmovdqu64 (%[b1], %%rax), %%zmm25\n\t"
      "vmovdqu64 (%[b2], %%rax), %%zmm26\n\t"
      "vpdpbusd 0(%[wp])%{1to16%}, %%zmm24, %%zmm0\n\t"
      "vpdpbusd 0(%[wp])%{1to16%}, %%zmm25, %%zmm1\n\t"
      "vpdpbusd 0(%[wp])%{1to16%}, %%zmm26, %%zmm2\n\t"
      "vpdpbusd 4(%[wp])%{1to16%}, %%zmm24, %%zmm3\n\t"
      "vpdpbusd 4(%[wp])%{1to16%}, %%zmm25, %%zmm4\n\t"
      "vpdpbusd 4(%[wp])%{1to16%}, %%zmm26, %%zmm5\n\t"
      "vpdpbusd 8(%[wp])%{1to16%}, %%zmm24, %%zmm6\n\t"
      "vpdpbusd 8(%[wp])%{1to16%}, %%zmm25, %%zmm7\n\t"
      "vpdpbusd 8(%[wp])%{1to16%}, %%zmm26, %%zmm8\n\t"
      "vpdpbusd 12(%[wp])%{1to16%}, %%zmm24, %%zmm9\n\t"
      "vpdpbusd 12(%[wp])%{1to16%}, %%zmm25, %%zmm10\n\t"
      "vpdpbusd 12(%[wp])%{1to16%}, %%zmm26, %%zmm11\n\t"
      "vpdpbusd 16(%[wp])%{1to16%}, %%zmm24, %%zmm12\n\t"
      "vpdpbusd 16(%[wp])%{1to16%}, %%zmm25, %%zmm13\n\t"
      "vpdpbusd 16(%[wp])%{1to16%}, %%zmm26, %%zmm14\n\t"
      "vpdpbusd 20(%[wp])%{1to16%}, %%zmm24, %%zmm15\n\t"
      "vpdpbusd 20(%[wp])%{1to16%}, %%zmm25, %%zmm16\n\t"
      "vpdpbusd 20(%[wp])%{1to16%}, %%zmm26, %%zmm17\n\t"
      "vpdpbusd 24(%[wp])%{1to16%}, %%zmm24, %%zmm18\n\t"
      "vpdpbusd 24(%[wp])%{1to16%}, %%zmm25, %%zmm19\n\t"
      "vpdpbusd 24(%[wp])%{1to16%}, %%zmm26, %%zmm20\n\t"
      "vpdpbusd 28(%[wp])%{1to16%}, %%zmm24, %%zmm21\n\t"
      "vpdpbusd 28(%[wp])%{1to16%}, %%zmm25, %%zmm22\n\t"
      "vpdpbusd 28(%[wp])%{1to16%}, %%zmm26, %%zmm23\n\t"
      "add $8, %[offs]\n\t"
      "add $32, %[wp]\n\t"
      "dec %[n]\n\t"
      "jnz 1b\n"
      "2:\n\t"
      "vmovdqu64 %%zmm0, 0(%[acc])\n\t"
      "vmovdqu64 %%zmm1, 64(%[acc])\n\t"
      "vmovdqu64 %%zmm2, 128(%[acc])\n\t"
      "vmovdqu64 %%zmm3, 192(%[acc])\n\t"
      "vmovdqu64 %%zmm4, 256(%[acc])\n\t"
      "vmovdqu64 %%zmm5, 320(%[acc])\n\t"
      "vmovdqu64 %%zmm6, 384(%[acc])\n\t"
      "vmovdqu64 %%zmm7, 448(%[acc])\n\t"
      "vmovdqu64 %%zmm8, 512(%[acc])\n\t"
      "vmovdqu64 %%zmm9, 576(%[acc])\n\t"
      "vmovdqu64 %%zmm10, 640(%[acc])\n\t"
      "vmovdqu64 %%zmm11, 704(%[acc])\n\t"
      "vmovdqu64 %%zmm12, 768(%[acc])\n\t"
      "vmovdqu64 %%zmm13, 832(%[acc])\n\t"
      "vmovdqu64 %%zmm14, 896(%[acc])\n\t"
      "vmovdqu64 %%zmm15, 960(%[acc])\n\t"
      "vmovdqu64 %%zmm16, 1024(%[acc])\n\t"
      "vmovdqu64 %%zmm17, 1088(%[acc])\n\t"
      "vmovdqu64 %%zmm18, 1152(%[acc])\n\t"
      "vmovdqu64 %%zmm19, 1216(%[acc])\n\t"
      "vmovdqu64 %%zmm20, 1280(%[acc])\n\t"
      "vmovdqu64 %%zmm21, 1344(%[acc])\n\t"
      "vmovdqu64 %%zmm22, 1408(%[acc])\n\t"
      "vmovdqu64 %%zmm23, 1472(%[acc])\n\t"
      : [offs] "+r"(offs), [wp] "+r"(wp), [n] "+r"(n)
      : [b0] "r"(b0), [b1] "r"(b1), [b2] "r"(b2), [acc] "r"(acc)
      : "rax", "cc", "memory", "xmm0", "xmm1", "xmm2", "xmm3", "xmm4", "xmm5", "xmm6", "xmm7", "xmm8", "xmm9", "xmm10", "xmm11", "xmm12", "xmm13", "xmm14", "xmm15", "xmm16", "xmm17", "xmm18", "xmm19", "xmm20", "xmm21", "xmm22", "xmm23", "xmm24", "xmm25", "xmm26");
}
#endif

// The dot path with MR x NR tiles of SEG-pixel segments: the 6x2 ymm tiles (SEG 8), or the 8x3 zmm tile of
// AVX512-VNNI (SEG 16).
template <int MR, int NR, int SEG>
bool run_dot_tiles(const PackedConvParams& p) {
  constexpr bool kZmm = SEG == 16;
  const ActRange r = act_range(p);
  const int wmax = p.w_bits == 1 ? 1 : 1 << (p.w_bits - 1);
  const int64_t pair_max = 2LL * r.mask * wmax;  // largest |u0 w0 + u1 w1| of vpmaddubsw
  const bool vnni = p.use_vnni;
  DotMode mode = DotMode::U8_I16ACC;
  int64_t L = 32767 / pair_max;
  if (!vnni && pair_max > 32767) mode = DotMode::I16;
  else if (!vnni && L <= 1) mode = DotMode::U8_I32ACC;
  const bool i16 = mode == DotMode::I16;
  const int64_t kc = i16 ? 2 : 4;  // channels per dword
  const int64_t groups = (p.Cin + kc - 1) / kc;
  const int64_t R = block_rows(p, ActLayout(p, groups, SEG, 4, 1).group * groups);
  const ActLayout Lay(p, groups, SEG, 4, (R - 1) * p.SH + p.KH);
  const int64_t S = Lay.groups * p.KH * p.KW;
  const std::vector<int64_t> offs = step_offsets(p, Lay);

  // Activations, per padded row: offset codes of 4 channels interleaved (I16: the signed codes of 2
  // channels as int16, padding 0).
  const int64_t width = padded_width(p, Lay);
  const uint8_t pad = static_cast<uint8_t>(r.off);
  auto fill = [&](int64_t n, int64_t g, int64_t yp, uint8_t* tmp, uint8_t* out) -> uint32_t {
    uint32_t flag = 0;
    const uint8_t* rows[4];
    for (int64_t e = 0; e < kc; ++e) {
      flag |= padded_row(p, r, n, g * kc + e, yp, width, pad, tmp + e * width);
      rows[e] = tmp + e * width;
    }
    for (int64_t ph = 0; ph < p.SW; ++ph) {
      if (!i16) {
        interleave4(rows, p.SW, ph, Lay.Wq, out + ph * Lay.plane);
      } else {
        int16_t* o = reinterpret_cast<int16_t*>(out + ph * Lay.plane);
        for (int64_t q = 0; q < Lay.Wq; ++q) {
          const int64_t xp = q * p.SW + ph;
          o[2 * q] = static_cast<int16_t>(rows[0][xp] - r.off);
          o[2 * q + 1] = static_cast<int16_t>(rows[1][xp] - r.off);
        }
      }
    }
    return flag;
  };

  // Weight panel [co block][step][MR] dwords; correction off * sum(w) for offset activations.
  const int64_t CB = (p.Cout + MR - 1) / MR;
  const int64_t K = p.Cin * p.KH * p.KW;
  std::vector<int32_t> panel(static_cast<size_t>(CB * S * MR), 0);
  std::vector<int32_t> corr(static_cast<size_t>(p.Cout), 0);
  for (int64_t co = 0; co < p.Cout; ++co) {
    const int8_t* w = p.w_codes + co * K;
    int64_t sum = 0;
    for (int64_t g = 0; g < Lay.groups; ++g)
      for (int64_t ky = 0; ky < p.KH; ++ky)
        for (int64_t kx = 0; kx < p.KW; ++kx) {
          uint32_t dword = 0;
          for (int64_t e = 0; e < kc; ++e) {
            const int64_t c = g * kc + e;
            const int v = c < p.Cin ? w[(c * p.KH + ky) * p.KW + kx] : 0;
            sum += v;
            dword |= i16 ? (static_cast<uint32_t>(static_cast<uint16_t>(v)) << (16 * e))
                         : (static_cast<uint32_t>(static_cast<uint8_t>(v)) << (8 * e));
          }
          const int64_t s = Lay.step(p, g, ky, kx);
          panel[static_cast<size_t>(((co / MR) * S + s) * MR + co % MR)] = static_cast<int32_t>(dword);
        }
    corr[static_cast<size_t>(co)] = i16 ? 0 : static_cast<int32_t>(r.off * sum);
  }

  auto tile = [&](const uint8_t* const* base, int64_t cb, int32_t(*res)[NR][SEG]) {
    const int32_t* wp = panel.data() + cb * S * MR;
    if constexpr (kZmm) {
#if defined(CPU_CAPABILITY_AVX512)
      return dot_tile_zmm(base, offs.data(), S, wp, res);
#endif
    } else {
      if (vnni) return dot_tile_vnni<MR, NR>(base, offs.data(), S, wp, res);
      if (mode == DotMode::U8_I16ACC) return dot_tile<DotMode::U8_I16ACC>(base, offs.data(), S, L, wp, res);
      if (mode == DotMode::U8_I32ACC) return dot_tile<DotMode::U8_I32ACC>(base, offs.data(), S, L, wp, res);
      return dot_tile<DotMode::I16>(base, offs.data(), S, L, wp, res);
    }
  };
  return run_blocked<MR, NR, SEG>(p, Lay, R, CB, corr.data(), kc * width + 64, fill, tile);
}

bool run_dot(const PackedConvParams& p) {
#if defined(CPU_CAPABILITY_AVX512)
  if (p.use_vnni) return run_dot_tiles<kZmmMR, kZmmNR, 16>(p);
#endif
  return run_dot_tiles<kDotMR, kDotNR, 8>(p);
}

// ---------------------------------------------------------------------------------------------
// lut path (a_bits <= 2)

constexpr int kLutMR = 6;  // output channels per tile
constexpr int kLutNR = 2;  // segments of 32 pixels per tile

void lut_steps_6x2(const uint8_t* b0, const uint8_t* b1, const int64_t* offs, int64_t n, const uint8_t* wp,
                   __m256i* acc) {
  const __m256i ones = _mm256_setzero_si256();  // unused by the lut kernel
  QOPS_TILE_KERNEL(QOPS_LUT_LOADW, QOPS_LUT_MUL, QOPS_ADD_B, 96);
}

// out[i][j] (32 int32, pixel order) = sum over steps of tables[s][i][idx_j]: biased byte entries summed
// for L steps in registers, then into int16 sums (at most 128 chunks of <= 255), then int32.
void lut_tile(const uint8_t* const* base, const int64_t* offs, int64_t S, int64_t L, const uint8_t* tables,
              int32_t (*out)[kLutNR][32]) {
  static_assert(kLutMR == 6 && kLutNR == 2, "lut_steps_6x2 is written for 6x2 tiles");
  const __m256i zero = _mm256_setzero_si256();
  __m256i acc[12], lo16[12], hi16[12];  // lo16: pixels {0-7, 16-23}, hi16: {8-15, 24-31} (unpack order)
  bool first = true;
  auto flush16 = [&]() {
    for (int k = 0; k < 12; ++k) {
      __m256i* o = reinterpret_cast<__m256i*>(out[k / 2][k % 2]);
      const __m256i l = lo16[k], h = hi16[k];
      const __m256i parts[4] = {
          _mm256_cvtepi16_epi32(_mm256_castsi256_si128(l)), _mm256_cvtepi16_epi32(_mm256_castsi256_si128(h)),
          _mm256_cvtepi16_epi32(_mm256_extracti128_si256(l, 1)), _mm256_cvtepi16_epi32(_mm256_extracti128_si256(h, 1))};
      for (int q = 0; q < 4; ++q)
        _mm256_storeu_si256(o + q, first ? parts[q] : _mm256_add_epi32(_mm256_loadu_si256(o + q), parts[q]));
      lo16[k] = hi16[k] = zero;
    }
    first = false;
  };
  for (int k = 0; k < 12; ++k) lo16[k] = hi16[k] = zero;
  int chunks = 0;
  for (int64_t s0 = 0; s0 < S; s0 += L) {
    const int64_t n = std::min(L, S - s0);
    lut_steps_6x2(base[0], base[1], offs + s0, n, tables + s0 * kLutMR * 16, acc);
    for (int k = 0; k < 12; ++k) {
      lo16[k] = _mm256_add_epi16(lo16[k], _mm256_unpacklo_epi8(acc[k], zero));
      hi16[k] = _mm256_add_epi16(hi16[k], _mm256_unpackhi_epi8(acc[k], zero));
    }
    if (++chunks == 128) {
      flush16();
      chunks = 0;
    }
  }
  flush16();
}

bool run_lut(const PackedConvParams& p) {
  constexpr int MR = kLutMR, NR = kLutNR;
  const ActRange r = act_range(p);
  const int a = p.a_bits, g = 4 / a;
  // Each table is biased by its own smallest entry, so its entries lie in [0, sum_t |w_t| (2^a - 1)]:
  // L steps of byte accumulation are exact for L * g * max|w| * (2^a - 1) <= 255.
  const int wabs = p.w_bits == 1 ? 1 : 1 << (p.w_bits - 1);
  const int64_t L = 255 / (g * wabs * r.mask);
  const int64_t groups = (p.Cin + g - 1) / g;
  const int64_t R = block_rows(p, ActLayout(p, groups, 32, 1, 1).group * groups);
  const ActLayout Lay(p, groups, 32, 1, (R - 1) * p.SH + p.KH);
  const int64_t S = Lay.groups * p.KH * p.KW;
  const std::vector<int64_t> offs = step_offsets(p, Lay);

  // Activation indices: idx = sum_t u(channel g*grp + t) << (a * t); padding holds u = off (x = 0).
  const int64_t width = padded_width(p, Lay);
  const uint8_t pad = static_cast<uint8_t>(r.off);
  auto fill = [&](int64_t n, int64_t grp, int64_t yp, uint8_t* tmp, uint8_t* out) -> uint32_t {
    uint32_t flag = 0;
    for (int t = 0; t < g; ++t) flag |= padded_row(p, r, n, grp * g + t, yp, width, pad, tmp + t * width);
    // Combine in place into row 0 (byte fields never overlap: u < 2^a).
    uint8_t* r0 = tmp;
    for (int t = 1; t < g; ++t) {
      const uint8_t* rt = tmp + t * width;
      const int sh = a * t;
      int64_t x = 0;
      for (; x + 32 <= width; x += 32) {
        const __m256i v0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(r0 + x));
        const __m256i vt = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(rt + x));
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(r0 + x),
                            _mm256_or_si256(v0, _mm256_sll_epi16(vt, _mm_cvtsi32_si128(sh))));
      }
      for (; x < width; ++x) r0[x] = static_cast<uint8_t>(r0[x] | (rt[x] << sh));
    }
    for (int64_t ph = 0; ph < p.SW; ++ph) {
      uint8_t* o = out + ph * Lay.plane;
      if (p.SW == 1) {
        std::memcpy(o, r0, static_cast<size_t>(Lay.Wq));
      } else {
        for (int64_t q = 0; q < Lay.Wq; ++q) o[q] = r0[q * p.SW + ph];
      }
    }
    return flag;
  };

  // Tables [co block][step][MR][16]: entry idx = sum_t (field_t(idx) - off) * w_t - m, m = the smallest
  // entry; the sum of the m of channel co is added back at the end (corr = -sum m).
  const int64_t CB = (p.Cout + MR - 1) / MR;
  const int64_t K = p.Cin * p.KH * p.KW;
  alignas(32) int16_t field16[4][16];
  for (int t = 0; t < 4; ++t)
    for (int idx = 0; idx < 16; ++idx)
      field16[t][idx] = static_cast<int16_t>(t < g ? ((idx >> (a * t)) & r.mask) - r.off : 0);
  std::vector<uint8_t> tables(static_cast<size_t>(CB * S * MR * 16));
  std::vector<int32_t> corr(static_cast<size_t>(CB * MR), 0);
  __m256i fields[4];  // field_t(idx) - off for idx = 0..15, int16
  for (int t = 0; t < 4; ++t) fields[t] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(field16[t]));
  const int64_t KHW = p.KH * p.KW;
  at::parallel_for(0, CB * MR, parallel_grain(S * 16 * g), [&](int64_t c0, int64_t c1) {
    for (int64_t co = c0; co < c1; ++co) {
      int64_t min_sum = 0;
      const int8_t* wco = p.w_codes + std::min(co, p.Cout - 1) * K;
      for (int64_t grp = 0; grp < Lay.groups; ++grp)
        for (int64_t tap = 0; tap < KHW; ++tap) {
          int wt[4] = {0, 0, 0, 0};
          for (int t = 0; t < g; ++t) {
            const int64_t c = grp * g + t;
            if (co < p.Cout && c < p.Cin) wt[t] = wco[c * KHW + tap];
          }
          int m = 0;
          for (int t = 0; t < g; ++t) m += std::min(r.lo * wt[t], r.hi * wt[t]);
          __m256i e = _mm256_set1_epi16(static_cast<int16_t>(-m));
          for (int t = 0; t < g; ++t)
            e = _mm256_add_epi16(e, _mm256_mullo_epi16(fields[t], _mm256_set1_epi16(static_cast<int16_t>(wt[t]))));
          // entries are in [0, 255]: pack the 16 int16 to bytes, in order
          const __m256i b = _mm256_permute4x64_epi64(_mm256_packus_epi16(e, e), 0x08);
          const int64_t s = Lay.step(p, grp, tap / p.KW, tap % p.KW);
          _mm_storeu_si128(reinterpret_cast<__m128i*>(tables.data() + (((co / MR) * S + s) * MR + co % MR) * 16),
                           _mm256_castsi256_si128(b));
          min_sum += m;
        }
      corr[static_cast<size_t>(co)] = static_cast<int32_t>(-min_sum);
    }
  });
  auto tile = [&](const uint8_t* const* base, int64_t cb, int32_t(*res)[NR][32]) {
    lut_tile(base, offs.data(), S, L, tables.data() + cb * S * MR * 16, res);
  };
  return run_blocked<MR, NR, 32>(p, Lay, R, CB, corr.data(), g * width + 32, fill, tile);
}

// ---------------------------------------------------------------------------------------------
// bitserial path

constexpr int kBsMR = 2;  // output channels per tile
constexpr int kBsNR = 3;  // segments of 4 pixels (one uint64 each) per tile

struct BitPlanes {
  int na, nw;              // activation planes, weight planes
  int act_coef[8];         // ±2^i
  int w_coef[8];           // ±2^j, or {2, -1} for 1-bit weights (planes b and ones)
};

inline __m256i popcount_bytes(__m256i v, __m256i lut, __m256i low4) {
  const __m256i lo = _mm256_and_si256(v, low4);
  const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), low4);
  return _mm256_add_epi8(_mm256_shuffle_epi8(lut, lo), _mm256_shuffle_epi8(lut, hi));
}

// acc[m][j] (4 int64, one per pixel) += coef * sum_s popcount(A[j][s] & W[m][s]) for one plane pair.
// AVX2: byte counts (<= 8 per step) summed for 31 steps, then vpsadbw.
template <int MR, int NR>
void bs_pair(const uint8_t* const* base, const int64_t* offs, int64_t S, const uint64_t* wwords, int64_t wstride,
             int coef, __m256i (*acc)[NR]) {
  const __m256i lut = _mm256_setr_epi8(0, 1, 1, 2, 1, 2, 2, 3, 1, 2, 2, 3, 2, 3, 3, 4, 0, 1, 1, 2, 1, 2, 2, 3, 1, 2, 2,
                                       3, 2, 3, 3, 4);
  const __m256i low4 = _mm256_set1_epi8(0x0f);
  const __m256i zero = _mm256_setzero_si256();
  const int shift = __builtin_ctz(static_cast<unsigned>(coef < 0 ? -coef : coef));
  for (int64_t s0 = 0; s0 < S; s0 += 31) {
    const int64_t s1 = std::min<int64_t>(S, s0 + 31);
    __m256i cnt[MR][NR];
    for (int m = 0; m < MR; ++m)
      for (int j = 0; j < NR; ++j) cnt[m][j] = zero;
    for (int64_t s = s0; s < s1; ++s) {
      __m256i av[NR];
      for (int j = 0; j < NR; ++j) av[j] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(base[j] + offs[s]));
      for (int m = 0; m < MR; ++m) {
        const __m256i w = _mm256_set1_epi64x(static_cast<long long>(wwords[m * wstride + s]));
        for (int j = 0; j < NR; ++j)
          cnt[m][j] = _mm256_add_epi8(cnt[m][j], popcount_bytes(_mm256_and_si256(av[j], w), lut, low4));
      }
    }
    for (int m = 0; m < MR; ++m)
      for (int j = 0; j < NR; ++j) {
        const __m256i c = _mm256_slli_epi64(_mm256_sad_epu8(cnt[m][j], zero), shift);
        acc[m][j] = coef < 0 ? _mm256_sub_epi64(acc[m][j], c) : _mm256_add_epi64(acc[m][j], c);
      }
  }
}

#if defined(CPU_CAPABILITY_AVX512)
// Same with vpopcntq (AVX512-VPOPCNTDQ, 256-bit form): exact 64-bit counts every step.
template <int MR, int NR>
__attribute__((target("avx512vpopcntdq"))) void bs_pair_vpopcnt(const uint8_t* const* base, const int64_t* offs,
                                                                 int64_t S, const uint64_t* wwords, int64_t wstride,
                                                                 int coef, __m256i (*acc)[NR]) {
  const int shift = __builtin_ctz(static_cast<unsigned>(coef < 0 ? -coef : coef));
  __m256i cnt[MR][NR];
  for (int m = 0; m < MR; ++m)
    for (int j = 0; j < NR; ++j) cnt[m][j] = _mm256_setzero_si256();
  for (int64_t s = 0; s < S; ++s) {
    __m256i av[NR];
    for (int j = 0; j < NR; ++j) av[j] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(base[j] + offs[s]));
    for (int m = 0; m < MR; ++m) {
      const __m256i w = _mm256_set1_epi64x(static_cast<long long>(wwords[m * wstride + s]));
      for (int j = 0; j < NR; ++j)
        cnt[m][j] = _mm256_add_epi64(cnt[m][j], _mm256_popcnt_epi64(_mm256_and_si256(av[j], w)));
    }
  }
  for (int m = 0; m < MR; ++m)
    for (int j = 0; j < NR; ++j) {
      const __m256i c = _mm256_slli_epi64(cnt[m][j], shift);
      acc[m][j] = coef < 0 ? _mm256_sub_epi64(acc[m][j], c) : _mm256_add_epi64(acc[m][j], c);
    }
}
#endif

bool run_bitserial(const PackedConvParams& p) {
  constexpr int MR = kBsMR, NR = kBsNR;
  const ActRange r = act_range(p);
  BitPlanes bp;
  bp.na = p.a_bits;
  for (int i = 0; i < bp.na; ++i) bp.act_coef[i] = (p.a_signed && i == bp.na - 1) ? -(1 << i) : (1 << i);
  if (p.w_bits == 1) {
    bp.nw = 2;
    bp.w_coef[0] = 2;
    bp.w_coef[1] = -1;
  } else {
    bp.nw = p.w_bits;
    for (int j = 0; j < bp.nw; ++j) bp.w_coef[j] = j == bp.nw - 1 ? -(1 << j) : (1 << j);
  }
  // One group = 64 channels = one uint64 per pixel; each activation plane is a copy of the layout.
  const ActLayout Lay(p, (p.Cin + 63) / 64, 4, 8, (p.Ho - 1) * p.SH + p.KH);
  const int64_t plane_bytes = Lay.image;  // per image per activation plane
  const int64_t S = Lay.groups * p.KH * p.KW;
  std::vector<int64_t> offs = step_offsets(p, Lay);
  auto act = uninit<uint8_t>(p.N * bp.na * plane_bytes);
  const int64_t width = padded_width(p, Lay);

  // Planes of the two's complement pattern x & mask = u ^ off (offset codes with the top bit flipped).
  BadFlag bad;
  at::parallel_for(0, p.N * Lay.groups * Lay.Hp, parallel_grain(64 * width * bp.na), [&](int64_t b, int64_t e) {
    std::vector<uint8_t> tmp(static_cast<size_t>(width));
    std::vector<uint64_t> words(static_cast<size_t>(bp.na * width));
    uint32_t flag = 0;
    for (int64_t t = b; t < e; ++t) {
      const int64_t yp = t % Lay.Hp, ng = t / Lay.Hp, n = ng / Lay.groups, grp = ng % Lay.groups;
      std::fill(words.begin(), words.end(), 0);
      const int64_t cend = std::min<int64_t>(64, p.Cin - grp * 64);
      for (int64_t cc = 0; cc < cend; ++cc) {
        flag |= padded_row(p, r, n, grp * 64 + cc, yp, width, static_cast<uint8_t>(r.off), tmp.data());
        for (int i = 0; i < bp.na; ++i) {
          uint64_t* wi = words.data() + i * width;
          for (int64_t x = 0; x < width; ++x)
            wi[x] |= static_cast<uint64_t>(((tmp[x] ^ r.off) >> i) & 1) << cc;
        }
      }
      for (int i = 0; i < bp.na; ++i)
        for (int64_t ph = 0; ph < p.SW; ++ph) {
          uint64_t* out = reinterpret_cast<uint64_t*>(act.get() + (n * bp.na + i) * plane_bytes + grp * Lay.group +
                                                      ph * Lay.plane + yp * Lay.row);
          const uint64_t* src = words.data() + i * width;
          for (int64_t q = 0; q < Lay.Wq; ++q) out[q] = src[q * p.SW + ph];
        }
    }
    bad.add(flag);
  });
  if (!bad.ok()) return false;

  // Weight words [co][plane][step]: bit cc of (co, j, s = (grp, ky, kx)) = plane j of channel 64 grp + cc.
  const int64_t CB = (p.Cout + MR - 1) / MR;
  const int64_t K = p.Cin * p.KH * p.KW;
  std::vector<uint64_t> ww(static_cast<size_t>(CB * MR * bp.nw * S), 0);
  for (int64_t co = 0; co < p.Cout; ++co)
    for (int64_t c = 0; c < p.Cin; ++c)
      for (int64_t ky = 0; ky < p.KH; ++ky)
        for (int64_t kx = 0; kx < p.KW; ++kx) {
          const int code = p.w_codes[co * K + (c * p.KH + ky) * p.KW + kx];
          const uint32_t u = p.w_bits == 1 ? static_cast<uint32_t>((code + 1) >> 1)
                                           : static_cast<uint32_t>(code) & ((1u << p.w_bits) - 1u);
          const int64_t s = Lay.step(p, c / 64, ky, kx);
          const uint64_t bit = uint64_t{1} << (c % 64);
          for (int j = 0; j < bp.nw; ++j) {
            const bool set = p.w_bits == 1 ? (j == 0 ? (u & 1u) != 0 : true) : ((u >> j) & 1u) != 0;
            if (set) ww[static_cast<size_t>((co * bp.nw + j) * S + s)] |= bit;
          }
        }

  const bool vpopcnt = p.use_vpopcntdq;
  (void)vpopcnt;
  const Segments seg(p, 4, NR);
  // A work item: NR segments of 4 pixels for every output channel, 64 multiply-adds per popcount word.
  const int64_t item_macs = int64_t{NR} * 4 * p.Cout * p.Cin * p.KH * p.KW * bp.na * bp.nw;
  at::parallel_for(0, p.N * seg.groups, parallel_grain(item_macs, kParallelMinMacs), [&](int64_t b, int64_t e) {
    alignas(32) int64_t res[MR][NR][4];
    int32_t vals[4];
    for (int64_t t = b; t < e; ++t) {
      const int64_t n = t / seg.groups, grp = t % seg.groups;
      int64_t oy[NR], ox0[NR];
      int64_t rel[NR];
      for (int j = 0; j < NR; ++j) {
        seg.at(grp * NR + j, &oy[j], &ox0[j]);
        rel[j] = Lay.base(p, n, oy[j], ox0[j]) - n * Lay.image;
      }
      const int nvalid = static_cast<int>(std::min<int64_t>(NR, seg.total - grp * NR));
      for (int64_t cb = 0; cb < CB; ++cb) {
        __m256i acc[MR][NR];
        for (int m = 0; m < MR; ++m)
          for (int j = 0; j < NR; ++j) acc[m][j] = _mm256_setzero_si256();
        for (int i = 0; i < bp.na; ++i) {
          const uint8_t* base[NR];
          for (int j = 0; j < NR; ++j) base[j] = act.get() + (n * bp.na + i) * plane_bytes + rel[j];
          for (int jw = 0; jw < bp.nw; ++jw) {
            const uint64_t* wwords = ww.data() + ((cb * MR) * bp.nw + jw) * S;
            const int coef = bp.act_coef[i] * bp.w_coef[jw];
#if defined(CPU_CAPABILITY_AVX512)
            if (vpopcnt) {
              bs_pair_vpopcnt<MR, NR>(base, offs.data(), S, wwords, bp.nw * S, coef, acc);
              continue;
            }
#endif
            bs_pair<MR, NR>(base, offs.data(), S, wwords, bp.nw * S, coef, acc);
          }
        }
        for (int m = 0; m < MR; ++m)
          for (int j = 0; j < NR; ++j) _mm256_store_si256(reinterpret_cast<__m256i*>(res[m][j]), acc[m][j]);
        for (int m = 0; m < MR && cb * MR + m < p.Cout; ++m)
          for (int j = 0; j < nvalid; ++j) {
            for (int k = 0; k < 4; ++k) vals[k] = static_cast<int32_t>(res[m][j][k]);
            emit(p, n, cb * MR + m, oy[j], ox0[j], std::min<int64_t>(4, p.Wo - ox0[j]), vals, 0);
          }
      }
    }
  });
  return true;
}

#endif  // QOPS_PC_AVX2

}  // namespace

bool packed_conv2d_kernel(const PackedConvParams& p) {
#if defined(QOPS_PC_AVX2)
  switch (p.path) {
    case PackedPath::DOT: return run_dot(p);
    case PackedPath::LUT: return run_lut(p);
    case PackedPath::BITSERIAL: return run_bitserial(p);
    default: break;
  }
#endif
  return run_scalar(p);
}

}  // namespace qops::cpu::CPU_CAPABILITY
