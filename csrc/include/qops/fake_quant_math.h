// Per-element math of LSQ fake quantization, shared by every CPU and CUDA kernel that fake-quantizes
// (fake_quant, mixed_quant_conv). It reproduces torch._fake_quantize_learnable_per_{tensor,channel}_affine
// (ATen's FakeQuantize kernels): forward q = clamp(zp + nearbyint(x * inv_scale)), y = (q - zp) * scale;
// backward rounds the zero point as (int)(clamp(zp_float + 0.5)), and the rounding is half-to-even.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define QOPS_HD __host__ __device__ __forceinline__
#else
#define QOPS_HD inline
#endif

namespace qops {

// Zero point as the built-in uses it: forward nearbyint + clamp, backward (zp + 0.5) truncated + clamp.
QOPS_HD float fq_zero_point_forward(float zp, int64_t quant_min, int64_t quant_max) {
  float z = fminf(fmaxf(nearbyintf(zp), static_cast<float>(quant_min)), static_cast<float>(quant_max));
  return static_cast<float>(static_cast<int64_t>(z));
}

QOPS_HD float fq_zero_point_backward(float zp, int64_t quant_min, int64_t quant_max) {
  float z = fminf(fmaxf(zp + 0.5f, static_cast<float>(quant_min)), static_cast<float>(quant_max));
  return static_cast<float>(static_cast<int64_t>(z));
}

// y = (clamp(zp + round(x / s)) - zp) * s, with 1/s precomputed in float as the built-in does.
QOPS_HD float fq_forward(float x, float scale, float inv_scale, float zp, float qmin, float qmax) {
  float q = zp + nearbyintf(x * inv_scale);
  q = fminf(fmaxf(q, qmin), qmax);
  return (q - zp) * scale;
}

struct FqGrad {
  float dx;     // straight-through: dy inside the range, 0 outside
  float dscale; // LSQ: dy * (y - x) / s inside, dy * (qmin|qmax - zp) outside; times grad_factor
  float dzp;    // 0 inside, -dy * s outside; times grad_factor
};

QOPS_HD FqGrad fq_backward(float x, float dy, float scale, float inv_scale, float zp, float qmin, float qmax,
                           float grad_factor) {
  float q = nearbyintf(zp + x * inv_scale);
  FqGrad g;
  if (q < qmin || q > qmax) {
    g.dx = 0.f;
    g.dscale = dy * ((q < qmin ? qmin : qmax) - zp) * grad_factor;
    g.dzp = -dy * scale * grad_factor;
  } else {
    float y = (q - zp) * scale;
    g.dx = dy;
    g.dscale = dy * (y - x) * inv_scale * grad_factor;
    g.dzp = 0.f;
  }
  return g;
}

}  // namespace qops
