// Interface between the CPU entry points of the element-wise code ops (csrc/cpu/packed_codes.cpp:
// torch.ops.qops.requantize, quantized_add) and their per-ISA kernels (csrc/cpu/kernels/packed_codes.cpp).
// Plain C++: no torch headers.
#pragma once

#include <cstdint>

#include "qops/cpu_dispatch.h"

namespace qops::cpu {

// One operand: float32 values, or codes (int8 if is_signed else uint8) standing for code * scale.
struct CodesOperand {
  const float* f = nullptr;
  const void* codes = nullptr;
  bool is_signed = false;
  float scale = 1.f;
};

// out[i] = clamp(nearbyint(v * inv_scale), lo, hi) with v = value(x[i]) (+ value(y[i]) when y is given), every
// step in float32 as the float pipeline computes it: value(code) = float(code) * scale (fake_quant's output),
// the sum one float32 addition. out holds int8 bytes when lo < 0, uint8 otherwise.
struct CodesParams {
  int64_t n = 0;
  CodesOperand x, y;
  bool has_y = false;
  float inv_scale = 1.f;
  int lo = 0, hi = 0;
  uint8_t* out = nullptr;
};

}  // namespace qops::cpu

// Elements [begin, end) of the operation above.
QOPS_DECLARE_ISA_FN(void, requantize_kernel, (const qops::cpu::CodesParams& p, int64_t begin, int64_t end))
