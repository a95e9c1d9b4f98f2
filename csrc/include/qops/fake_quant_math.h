// Per-element math of LSQ fake quantization, shared by every CPU and CUDA kernel that fake-quantizes
// (fake_quant, mixed_quant_conv). It reproduces torch._fake_quantize_learnable_per_{tensor,channel}_affine
// and their backward ops bit for bit (ATen's FakeQuantize CPU kernels as built for AVX2/AVX-512, where the
// compiler contracts two expressions of the backward into FMAs; see docs/FAKE_QUANT.md):
//
//   forward   q = clamp(zp_f + rint(x * inv_scale), qmin, qmax)      y = (q - zp_f) * scale
//   backward  q = rint(fma(x, inv_scale, zp_b))                       (one rounding of x/s + zp)
//             inside  (qmin <= q <= qmax): dx = dy, dscale = dy * fma(q - zp_b, scale, -x) * inv_scale * gf,
//                                          dzp = 0
//             below   (q < qmin, or NaN):  dx = 0,  dscale = dy * (qmin - zp_b) * gf, dzp = -dy * scale * gf
//             above   (q > qmax):          dx = 0,  dscale = dy * (qmax - zp_b) * gf, dzp = -dy * scale * gf
//
// with inv_scale = 1.0f / scale in float, rint = round half to even, and zero points rounded as below.
// dx is dy * {1, 0} (so -0.0 for a negative dy outside the range, as in the built-in).
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define QOPS_HD __host__ __device__ __forceinline__
#else
#define QOPS_HD inline
#endif

namespace qops {

// Zero point of the forward pass (per tensor and per channel): rint, then clamp to [qmin, qmax].
QOPS_HD float fq_zero_point_forward(float zp, int64_t quant_min, int64_t quant_max) {
  float z = fminf(fmaxf(nearbyintf(zp), static_cast<float>(quant_min)), static_cast<float>(quant_max));
  return static_cast<float>(static_cast<int64_t>(z));
}

// Zero point of the per-tensor backward: the built-in adds 0.5, clamps and truncates toward zero, so it
// differs from the forward one for fractional zero points (2.5 -> fwd 2, bwd 3) and for negative ones
// (-1.0 -> fwd -1, bwd 0; -2.7 -> fwd -3, bwd -2).
QOPS_HD float fq_zero_point_backward(float zp, int64_t quant_min, int64_t quant_max) {
  float z = fminf(fmaxf(zp + 0.5f, static_cast<float>(quant_min)), static_cast<float>(quant_max));
  return static_cast<float>(static_cast<int64_t>(z));
}

// Zero point of the per-channel backward: the same rint + clamp as the forward.
QOPS_HD float fq_zero_point_backward_per_channel(float zp, int64_t quant_min, int64_t quant_max) {
  return fq_zero_point_forward(zp, quant_min, quant_max);
}

// Zero point of the backward for either granularity (per_channel = axis != -1).
QOPS_HD float fq_zero_point_backward_for(bool per_channel, float zp, int64_t quant_min, int64_t quant_max) {
  return per_channel ? fq_zero_point_backward_per_channel(zp, quant_min, quant_max)
                     : fq_zero_point_backward(zp, quant_min, quant_max);
}

// y = (clamp(zp + rint(x * inv_scale)) - zp) * scale, with 1/s precomputed in float as the built-in does.
// fmaxf maps NaN to qmin, as the built-in does on x86; +-inf saturate to qmax / qmin.
QOPS_HD float fq_forward(float x, float scale, float inv_scale, float zp, float qmin, float qmax) {
  float q = zp + nearbyintf(x * inv_scale);
  q = fminf(fmaxf(q, qmin), qmax);
  return (q - zp) * scale;
}

struct FqGrad {
  float dx;      // straight-through: dy inside the range, dy * 0 outside
  float dscale;  // LSQ: dy * (y - x) / s inside, dy * (qmin|qmax - zp) outside; times grad_factor
  float dzp;     // 0 inside, -dy * s outside; times grad_factor
};

// Range class of an element in the backward: the built-in's q (one rounding of x * inv_scale + zp).
enum FqClass : int { kFqBelow = 0, kFqInside = 1, kFqAbove = 2 };

QOPS_HD float fq_backward_q(float x, float inv_scale, float zp) { return nearbyintf(fmaf(x, inv_scale, zp)); }

QOPS_HD FqClass fq_classify(float q, float qmin, float qmax) {
  // !(q >= qmin) also catches NaN, which the built-in (int64 cast on x86) treats as below.
  if (!(q >= qmin)) return kFqBelow;
  return q > qmax ? kFqAbove : kFqInside;
}

// zp is the backward zero point (fq_zero_point_backward / _per_channel).
QOPS_HD FqGrad fq_backward(float x, float dy, float scale, float inv_scale, float zp, float qmin, float qmax,
                           float grad_factor) {
  const float q = fq_backward_q(x, inv_scale, zp);
  const FqClass cls = fq_classify(q, qmin, qmax);
  FqGrad g;
  if (cls != kFqInside) {
    g.dx = dy * 0.f;
    g.dscale = dy * ((cls == kFqBelow ? qmin : qmax) - zp) * grad_factor;
    g.dzp = -dy * scale * grad_factor;
  } else {
    // (q - zp) * scale - x rounded once, as the built-in's contracted expression.
    const float y_minus_x = fmaf(q - zp, scale, -x);
    g.dx = dy;
    g.dscale = dy * y_minus_x * inv_scale * grad_factor;
    g.dzp = 0.f;
  }
  return g;
}

}  // namespace qops
