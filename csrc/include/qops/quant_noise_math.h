// quant_noise's step, shared by every kernel that adds quantization noise (quant_noise on CPU and CUDA,
// mixed_quant_conv mode "noise") and mirrored in qops/reference.py (quant_noise_half_delta) and the Triton
// kernels. No torch headers: host and device (QOPS_HD).
#pragma once

#include "qops/philox.h"  // QOPS_HD

namespace qops {

// delta / 2 = ((hi - lo) / levels) / 2 of a slice with range [lo, hi], levels = 2^bits - 1, in T (float or
// double) with IEEE division (the kernels are never built with fast math, see philox.h).
// Two finite values more than T's largest value apart (e.g. -3e38 and 3e38 in float32) make hi - lo overflow;
// then the step comes from the halves, (hi/2 - lo/2) / levels: halving is exact at those magnitudes and rounding
// commutes with it, so this is the value the plain formula has without an exponent limit.
// A slice holding NaN or +-inf has no finite range: its step is NaN, and so is every output of the slice (an
// infinite step would give +-inf or NaN depending on each element's noise).
template <typename T>
QOPS_HD T quant_noise_half_delta(T lo, T hi, T levels) {
  const T d = hi - lo;
  // v - v is 0 for finite v and NaN for inf and NaN: finiteness without libm (the same on host and device).
  const bool finite_bounds = (lo - lo == lo - lo) && (hi - hi == hi - hi);
  if (!finite_bounds) return d - d;  // NaN: d is inf or NaN here
  if (d - d != d - d) return (hi * T(0.5) - lo * T(0.5)) / levels;  // hi - lo overflowed
  return (d / levels) * T(0.5);
}

}  // namespace qops
