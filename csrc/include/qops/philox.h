// Counter-based random numbers shared by every qops kernel that injects noise (quant_noise,
// mixed_quant_conv mode "noise"): Philox4x32-10 (Salmon et al., "Parallel random numbers: as easy
// as 1, 2, 3", SC'11; Random123) plus a fixed mapping from (seed, stream, element index) to a
// float eps, written so that plain C++ (any ISA), CUDA, Triton (qops/triton/quant_noise.py) and the
// pure-torch reference (qops/reference.py) produce the SAME BITS for the same arguments.
//
// ---------------------------------------------------------------------------------------------
// API (all QOPS_HD: host and device)
//   float qops::philox_normal (int64_t seed, uint32_t stream, uint64_t index);  // eps ~ N(0, 1)
//   float qops::philox_uniform(int64_t seed, uint32_t stream, uint64_t index);  // eps ~ U(-1, 1)
//   qops::Float4 qops::philox_normal4 (int64_t seed, uint32_t stream, uint64_t group);
//   qops::Float4 qops::philox_uniform4(int64_t seed, uint32_t stream, uint64_t group);
//       eps of the four elements 4*group .. 4*group+3 (one Philox call; use these in loops).
//   qops::Uint4 qops::philox_bits(int64_t seed, uint32_t stream, uint64_t group);  // raw words
//   qops::Uint4 qops::philox4x32_10(Uint4 counter, uint32_t key0, uint32_t key1);  // the cipher
//
// The stream, exactly:
//   key      = (k0, k1) = (low 32 bits, high 32 bits) of the seed's two's complement uint64.
//   counter  = (g mod 2^32, g >> 32, stream, 0)  with g = index / 4 (the "group").
//   r[0..3]  = Philox4x32-10(counter, key)  (Random123's philox4x32 with 10 rounds; the
//              known-answer vectors of Random123 are tested in tests/test_quant_noise.py).
//   element index 4g + j draws from the group's words as follows (u(w) defined below):
//     uniform:  eps_j = 2 u(r[j]) - 1, i.e. ((r[j] >> 8) | 1) * 2^-23 - 1: odd multiples of 2^-23
//               in (-1, 1), symmetric, exactly representable (no rounding anywhere).
//     gaussian: Box-Muller on the pairs (r[0], r[1]) and (r[2], r[3]):
//               R = sqrt(-2 ln u(r[0])), eps_0 = R cos(2 pi u(r[1])), eps_1 = R sin(2 pi u(r[1]));
//               eps_2, eps_3 likewise from (r[2], r[3]).
//   u(w) = ((w >> 8) | 1) * 2^-24: 24-bit, low bit forced to 1, so u lies in the OPEN interval
//   (0, 1) (log never sees 0) symmetrically (1 - u is in the set too). Consequence: |eps| <= 5.77
//   for gaussian (the mass beyond is ~1e-8).
//   "index" is the element's position in the tensor's logical row-major order, so a
//   non-contiguous tensor gets the same noise as its .contiguous() copy.
//   Streams: torch.ops.qops.quant_noise uses stream 0. Other ops derive independent noise for
//   the same user seed by using other stream values (distinct per noise tensor), never by
//   altering the seed; e.g. mixed_quant_conv can use stream = 1 + (id of the tensor it perturbs).
//
// Bitwise reproducibility. ln and sincos are NOT libm calls (glibc, CUDA libdevice and Sleef differ
// in the last ulp): they are the fixed polynomials below, evaluated with + - * / sqrt and explicit
// fused multiply-adds only. Every product that feeds an addition is an explicit fma, so compiler
// FP contraction (GCC -ffp-contract=fast, nvcc --fmad=true, Triton's fp fusion) has nothing to fuse
// and every IEEE-754 operation is correctly rounded on every target: CPU scalar, CPU AVX2, CUDA and
// Triton give identical floats, and the reference in qops/reference.py emulates fma exactly. What may
// still differ: builds with fast-math (-ffast-math, --use_fast_math, approximate sqrt/div) and
// flush-to-zero of subnormals, which only matter for ranges below 1e-38. The kernels must not use them.
// Accuracy of the polynomials vs the exact functions: ln within 2 ulp, cos/sin within 2e-7
// absolute; they feed a noise generator, not a math library.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#ifndef QOPS_HD
#if defined(__CUDACC__) || defined(__HIPCC__)
#define QOPS_HD __host__ __device__ __forceinline__
#else
#define QOPS_HD inline
#endif
#endif

namespace qops {

// The `dist` argument of the noise ops.
enum class NoiseDist : int { kGaussian = 0, kUniform = 1 };

// The stream word torch.ops.qops.quant_noise uses (see "Streams" above).
constexpr uint32_t kQuantNoiseStream = 0;

struct Uint4 {
  uint32_t v[4];
};
struct Float4 {
  float v[4];
};

namespace philox_detail {

// Random123's Philox4x32 multipliers and Weyl key increments.
constexpr uint32_t kMul0 = 0xD2511F53u;
constexpr uint32_t kMul1 = 0xCD9E8D57u;
constexpr uint32_t kWeyl0 = 0x9E3779B9u;
constexpr uint32_t kWeyl1 = 0xBB67AE85u;

// ln(m) for m in [2/3, 4/3): 2 atanh(s), s = (m-1)/(m+1), Taylor series to s^11 (|s| <= 1/5, so the
// truncation error is < 1e-9 relative). kLn3 .. kLn11 = 2/3, 2/5, 2/7, 2/9, 2/11 rounded to float.
constexpr float kLn3 = 0x1.555556p-1f;
constexpr float kLn5 = 0x1.99999ap-2f;
constexpr float kLn7 = 0x1.24924ap-2f;
constexpr float kLn9 = 0x1.c71c72p-3f;
constexpr float kLn11 = 0x1.745d18p-3f;
// ln 2 = kLn2Hi + kLn2Lo; kLn2Hi has 16 significant bits.
constexpr float kLn2Hi = 0x1.62e4p-1f;
constexpr float kLn2Lo = 0x1.7f7d1cp-20f;
constexpr uint32_t kTwoThirdsBits = 0x3f2aaaabu;  // 2/3 as float

// sin((pi/2) r), cos((pi/2) r) for |r| <= 1/2: Taylor series in x = (pi/2) r with the powers of
// pi/2 folded in: kSin<n> = (-1)^((n-1)/2) (pi/2)^n / n!, kCos<n> = (-1)^(n/2) (pi/2)^n / n!, rounded
// to float. Truncation error < 3e-9 at |x| = pi/4.
constexpr float kSin1 = 0x1.921fb6p+0f;
constexpr float kSin3 = -0x1.4abbcep-1f;
constexpr float kSin5 = 0x1.466bc6p-4f;
constexpr float kSin7 = -0x1.32d2ccp-8f;
constexpr float kSin9 = 0x1.507834p-13f;
constexpr float kCos2 = -0x1.3bd3ccp+0f;
constexpr float kCos4 = 0x1.03c1f0p-2f;
constexpr float kCos6 = -0x1.55d3c8p-6f;
constexpr float kCos8 = 0x1.e1f506p-11f;
constexpr float kCos10 = -0x1.a6d1f2p-16f;

QOPS_HD float fma32(float a, float b, float c) {
#if defined(__CUDA_ARCH__)
  return __fmaf_rn(a, b, c);
#else
  return std::fma(a, b, c);
#endif
}

QOPS_HD uint32_t float_bits(float f) {
#if defined(__CUDA_ARCH__)
  return static_cast<uint32_t>(__float_as_uint(f));
#else
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  return u;
#endif
}

QOPS_HD float bits_float(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
#endif
}

QOPS_HD uint32_t mulhi32(uint32_t a, uint32_t b) {
#if defined(__CUDA_ARCH__)
  return __umulhi(a, b);
#else
  return static_cast<uint32_t>((static_cast<uint64_t>(a) * b) >> 32);
#endif
}

QOPS_HD float sqrt32(float x) {
#if defined(__CUDA_ARCH__)
  return __fsqrt_rn(x);  // IEEE even under --use_fast_math
#else
  return std::sqrt(x);
#endif
}

QOPS_HD float div32(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fdiv_rn(a, b);  // IEEE even under --use_fast_math
#else
  return a / b;
#endif
}

}  // namespace philox_detail

// The Philox4x32-10 block cipher (Random123): 10 rounds, key bumped by the Weyl constants between
// rounds.
QOPS_HD Uint4 philox4x32_10(Uint4 ctr, uint32_t key0, uint32_t key1) {
  using namespace philox_detail;
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
  for (int round = 0; round < 10; ++round) {
    const uint32_t hi0 = mulhi32(kMul0, ctr.v[0]);
    const uint32_t lo0 = kMul0 * ctr.v[0];
    const uint32_t hi1 = mulhi32(kMul1, ctr.v[2]);
    const uint32_t lo1 = kMul1 * ctr.v[2];
    ctr = Uint4{{hi1 ^ ctr.v[1] ^ key0, lo1, hi0 ^ ctr.v[3] ^ key1, lo0}};
    key0 += kWeyl0;
    key1 += kWeyl1;
  }
  return ctr;
}

// The four raw words of group `group` (elements 4*group .. 4*group+3) of (seed, stream).
QOPS_HD Uint4 philox_bits(int64_t seed, uint32_t stream, uint64_t group) {
  const uint64_t s = static_cast<uint64_t>(seed);
  Uint4 ctr{{static_cast<uint32_t>(group), static_cast<uint32_t>(group >> 32), stream, 0u}};
  return philox4x32_10(ctr, static_cast<uint32_t>(s), static_cast<uint32_t>(s >> 32));
}

// u(w) = ((w >> 8) | 1) * 2^-24, in the open interval (0, 1); exact.
QOPS_HD float philox_unit(uint32_t w) { return static_cast<float>((w >> 8) | 1u) * 0x1p-24f; }

// 2 u(w) - 1 in (-1, 1). Both operations are exact (every value is an odd multiple of 2^-23 below
// 1 in magnitude), so contracting them into an fma cannot change the result.
QOPS_HD float philox_signed_unit(uint32_t w) { return static_cast<float>((w >> 8) | 1u) * 0x1p-23f - 1.0f; }

// ln(u) for u = philox_unit(w) in (0, 1) (normal floats only): u = 2^e m, m in [2/3, 4/3).
QOPS_HD float philox_log(float u) {
  using namespace philox_detail;
  const uint32_t ix = float_bits(u);
  const int32_t e = static_cast<int32_t>(ix - kTwoThirdsBits) >> 23;  // arithmetic shift
  const float m = bits_float(ix - (static_cast<uint32_t>(e) << 23));
  const float f = m - 1.0f;  // exact (Sterbenz)
  const float s = div32(f, 2.0f + f);
  const float z = s * s;
  float p = fma32(kLn11, z, kLn9);
  p = fma32(p, z, kLn7);
  p = fma32(p, z, kLn5);
  p = fma32(p, z, kLn3);
  const float ln_m = fma32(s * z, p, s + s);
  const float ef = static_cast<float>(e);
  return fma32(ef, kLn2Hi, fma32(ef, kLn2Lo, ln_m));
}

// (cos, sin)(2 pi u) for u = a * 2^-24, a = (w >> 8) | 1: exact reduction to the nearest quarter
// turn q and a remainder r in (-1/2, 1/2) quarter turns, polynomials, then rotation by q.
QOPS_HD void philox_sincos_turn(uint32_t w, float* cos_out, float* sin_out) {
  using namespace philox_detail;
  const uint32_t a = (w >> 8) | 1u;
  const uint32_t q = (a + (1u << 21)) >> 22;  // nearest integer to 4u (never a tie: a is odd)
  const float r = static_cast<float>(static_cast<int32_t>(a) - static_cast<int32_t>(q << 22)) * 0x1p-22f;
  const float x2 = r * r;
  float ps = fma32(kSin9, x2, kSin7);
  ps = fma32(ps, x2, kSin5);
  ps = fma32(ps, x2, kSin3);
  ps = fma32(ps, x2, kSin1);
  const float sn = r * ps;
  float pc = fma32(kCos10, x2, kCos8);
  pc = fma32(pc, x2, kCos6);
  pc = fma32(pc, x2, kCos4);
  pc = fma32(pc, x2, kCos2);
  const float cs = fma32(pc, x2, 1.0f);
  // Rotate by q quarter turns: q=1 -> (-sin, cos), q=2 -> (-cos, -sin), q=3 -> (sin, -cos).
  const bool swap = (q & 1u) != 0;
  const float c = swap ? sn : cs;
  const float s = swap ? cs : sn;
  *cos_out = (((q + 1u) & 2u) != 0) ? -c : c;
  *sin_out = ((q & 2u) != 0) ? -s : s;
}

// Box-Muller on (w_radius, w_angle): (R cos, R sin), R = sqrt(-2 ln u(w_radius)).
QOPS_HD void philox_box_muller(uint32_t w_radius, uint32_t w_angle, float* z_cos, float* z_sin) {
  const float radius = philox_detail::sqrt32(-2.0f * philox_log(philox_unit(w_radius)));
  float c, s;
  philox_sincos_turn(w_angle, &c, &s);
  *z_cos = radius * c;
  *z_sin = radius * s;
}

QOPS_HD Float4 philox_normal4(int64_t seed, uint32_t stream, uint64_t group) {
  const Uint4 r = philox_bits(seed, stream, group);
  Float4 out;
  philox_box_muller(r.v[0], r.v[1], &out.v[0], &out.v[1]);
  philox_box_muller(r.v[2], r.v[3], &out.v[2], &out.v[3]);
  return out;
}

QOPS_HD Float4 philox_uniform4(int64_t seed, uint32_t stream, uint64_t group) {
  const Uint4 r = philox_bits(seed, stream, group);
  return Float4{{philox_signed_unit(r.v[0]), philox_signed_unit(r.v[1]), philox_signed_unit(r.v[2]),
                 philox_signed_unit(r.v[3])}};
}

// eps ~ N(0, 1) of element `index`; computes only the Box-Muller pair it needs.
QOPS_HD float philox_normal(int64_t seed, uint32_t stream, uint64_t index) {
  const Uint4 r = philox_bits(seed, stream, index >> 2);
  const unsigned lane = static_cast<unsigned>(index & 3u);
  const unsigned pair = lane & 2u;
  float c, s;
  philox_box_muller(r.v[pair], r.v[pair + 1], &c, &s);
  return (lane & 1u) ? s : c;
}

// eps ~ U(-1, 1) of element `index`.
QOPS_HD float philox_uniform(int64_t seed, uint32_t stream, uint64_t index) {
  const Uint4 r = philox_bits(seed, stream, index >> 2);
  return philox_signed_unit(r.v[index & 3u]);
}

}  // namespace qops
