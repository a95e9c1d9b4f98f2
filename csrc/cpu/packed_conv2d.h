// Interface between the CPU entry points of the packed low-bit convolution (csrc/cpu/packed_conv2d.cpp:
// checks, path choice, registration) and its per-ISA kernels (csrc/cpu/kernels/packed_conv2d.cpp).
// Plain C++: no torch headers, so the kernel files stay light.
#pragma once

#include <cstdint>

#include "qops/cpu_dispatch.h"

namespace qops::cpu {

// The CPU paths of packed_conv2d / quantized_conv2d. QOPS_PACKED_PATH=auto|scalar|dot|lut|bitserial
// forces one (csrc/cpu/packed_conv2d.cpp; docs/kernels.md).
enum class PackedPath : int {
  AUTO = 0,
  SCALAR = 1,     // portable loops over the codes, every ISA
  DOT = 2,        // int8 dot products: vpmaddubsw (int16 accumulation where exact) / vpmaddwd / vpdpbusd
  LUT = 3,        // vpshufb lookup tables of weight sums indexed by packed activations (a_bits <= 2)
  BITSERIAL = 4,  // sum_ij 2^(i+j) popcount(A_i & W_j) over bit-planes
};

struct PackedConvParams {
  // Input: exactly one of x_codes (uint8, or int8 stored in the same bytes when a_signed) and x_float
  // (quantized here as clamp(nearbyint(x * a_inv_scale)), like fake_quant). NCHW, contiguous.
  const uint8_t* x_codes = nullptr;
  const float* x_float = nullptr;
  float a_inv_scale = 1.f;
  int64_t N = 0, Cin = 0, H = 0, W = 0;
  int64_t Cout = 0, KH = 0, KW = 0, SH = 1, SW = 1, PH = 0, PW = 0, Ho = 0, Wo = 0;
  int w_bits = 8, a_bits = 8;
  bool a_signed = false;
  // Weight codes unpacked from the packed buffer: int8 [Cout, Cin, KH, KW], contiguous.
  const int8_t* w_codes = nullptr;
  PackedPath path = PackedPath::SCALAR;  // resolved by the entry point, never AUTO here
  // Output NCHW, exactly one of: int32 sums (out_i32); float out_f = y = fma(acc, out_scale[c], bias[c]) (bias
  // may be null: 0); or the next layer's codes out_codes = clamp(nearbyint(y' * out_inv_scale), out_lo, out_hi)
  // with y' = max(y, 0) when out_relu, else y (int8 bytes when out_lo < 0, uint8 otherwise). y is the float
  // that out_f holds and y' * out_inv_scale the product fake_quant rounds, so the codes are those a float
  // pipeline would compute from out_f.
  int32_t* out_i32 = nullptr;
  float* out_f = nullptr;
  uint8_t* out_codes = nullptr;
  const float* out_scale = nullptr;  // [Cout]
  const float* bias = nullptr;       // [Cout] or null
  float out_inv_scale = 1.f;
  int out_lo = 0, out_hi = 0;
  bool out_relu = false;
  // Codes out only: pixel shuffle factor r of the epilogue (1: none); out_codes is then
  // [N, Cout / r^2, Ho r, Wo r] (Cout a multiple of r^2).
  int64_t out_shuffle = 1;
  // CPU sub-features the kernels may use (read by the entry from cpu_features()): vpdpbusd (AVX512-VNNI
  // in the AVX512 build, AVX-VNNI in the AVX2 build) and vpopcntq (AVX512-VPOPCNTDQ).
  bool use_vnni = false;
  bool use_vpopcntdq = false;
};

// Whether the LUT path can run (w_bits, a_bits): a_bits <= 2, and one step of a table (g = 4 / a_bits
// activations, each table biased by its smallest entry) spans at most g * max|w| * (2^a - 1) <= 255.
inline bool lut_supports(int w_bits, int a_bits, bool a_signed) {
  (void)a_signed;  // the offset codes span 2^a - 1 either way
  if (a_bits > 2) return false;
  const int wabs = w_bits == 1 ? 1 : 1 << (w_bits - 1);
  return (4 / a_bits) * wabs * ((1 << a_bits) - 1) <= 255;
}

}  // namespace qops::cpu

// Runs the convolution on the path p.path; returns false if x_codes held a value outside the
// activation range (the output is then unspecified and the caller raises).
QOPS_DECLARE_ISA_FN(bool, packed_conv2d_kernel, (const qops::cpu::PackedConvParams& p))
