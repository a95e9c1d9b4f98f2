// Argument checks of torch.ops.qops.pack_weight / packed_conv2d / quantized_conv2d, shared by the CPU
// entry points (csrc/cpu/packed_conv2d.cpp) and the CUDA binding (csrc/cuda/packed_conv2d_binding.cpp).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <c10/util/safe_numerics.h>

#include <algorithm>
#include <cmath>
#include <optional>
#include <string>

#include "qops/checks.h"
#include "qops/packed_layout.h"

namespace qops {

inline void check_bits(int64_t bits, const char* name) {
  TORCH_CHECK(bits >= 1 && bits <= 8, name, ": expected a bit-width in 1..8, got ", bits);
}

// Geometry of one packed convolution.
struct ConvShape {
  int64_t N, Cin, H, W, Cout, KH, KW, SH, SW, PH, PW, Ho, Wo;
};

// a * b, or an error naming `name` when it does not fit in int64 (sizes come from files: no wrap-around).
inline int64_t checked_mul(int64_t a, int64_t b, const char* name) {
  int64_t out = 0;
  TORCH_CHECK(!c10::mul_overflows(a, b, &out), name, ": sizes too large (", a, " * ", b, " overflows int64)");
  return out;
}

// Checks shared by packed_conv2d and quantized_conv2d; returns the geometry. Every size, stride and padding is
// bounded before it enters arithmetic, so that no product below (nor in the kernels' index and buffer sizes)
// overflows, and no buffer is larger than the input and the kernel justify:
//   K = Cin*kh*kw      below 2^31 / 2^(a_bits + w_bits - 1) (exact int32 accumulation), checked without overflow;
//   padding            below the kernel size: a wider padding only adds outputs whose window holds no input;
//   stride             a stride beyond the padded input leaves one output row (column) whatever its value, so it
//                      is clamped to the padded input (the same output; PyTorch's convolution accepts it too).
inline ConvShape check_conv(const at::Tensor& x, const char* x_name, const at::Tensor& w_packed, at::IntArrayRef w_shape,
                            int64_t w_bits, int64_t a_bits, at::IntArrayRef stride, at::IntArrayRef padding) {
  check_dim(x, 4, x_name);
  check_dtype(w_packed, at::kByte, "w_packed");
  check_dim(w_packed, 1, "w_packed");
  check_same_device(w_packed, x, "w_packed", x_name);
  check_bits(w_bits, "w_bits");
  check_bits(a_bits, "a_bits");
  TORCH_CHECK(w_shape.size() == 4, "w_shape: expected [Cout, Cin, kh, kw], got ", w_shape);
  for (int64_t v : w_shape) TORCH_CHECK(v > 0, "w_shape: expected positive sizes, got ", w_shape);
  TORCH_CHECK(stride.size() == 2, "stride: expected 2 values, got ", stride);
  TORCH_CHECK(padding.size() == 2, "padding: expected 2 values, got ", padding);
  TORCH_CHECK(stride[0] >= 1 && stride[1] >= 1, "stride: expected values >= 1, got ", stride);
  TORCH_CHECK(padding[0] >= 0 && padding[1] >= 0, "padding: expected values >= 0, got ", padding);
  ConvShape s;
  s.N = x.size(0);
  s.Cin = x.size(1);
  s.H = x.size(2);
  s.W = x.size(3);
  s.Cout = w_shape[0];
  s.KH = w_shape[2];
  s.KW = w_shape[3];
  TORCH_CHECK(w_shape[1] == s.Cin, "w_shape: Cin = ", w_shape[1], " does not match the ", s.Cin, " channels of ",
              x_name, " (shape ", x.sizes(), ")");
  // int32 accumulation is exact while K * max|x| * max|w| <= K * 2^a_bits * 2^(w_bits-1) < 2^31.
  const int64_t k_limit = int64_t{1} << (32 - a_bits - w_bits);
  int64_t K = 0;
  const bool k_overflows = c10::mul_overflows(s.Cin, s.KH, &K) || c10::mul_overflows(K, s.KW, &K);
  TORCH_CHECK(!k_overflows && K < k_limit, "w_shape: K = Cin*kh*kw = ", s.Cin, "*", s.KH, "*", s.KW,
              " is too large for exact int32 accumulation at ", w_bits, "x", a_bits, " bits (at most ",
              k_limit - 1, ")");
  int64_t want = 0;
  const bool want_overflows = c10::mul_overflows(s.Cout, w_bits * packed_plane_words(K) * 4, &want);
  TORCH_CHECK(!want_overflows && w_packed.numel() == want, "w_shape: ", w_shape, " at w_bits=", w_bits,
              " needs a packed buffer of ", want_overflows ? std::string("more than 2^63") : std::to_string(want),
              " bytes, but w_packed has ", w_packed.numel(), " (was it packed with other bits or shape?)");
  TORCH_CHECK(padding[0] < s.KH && padding[1] < s.KW, "padding: expected values below the kernel size (", s.KH, ", ",
              s.KW, "), got ", padding, " (outputs beyond would see no input, only zero padding)");
  s.PH = padding[0];
  s.PW = padding[1];
  // K < 2^31 bounds kh, kw and so the padding: these sums cannot overflow.
  const int64_t hp = s.H + 2 * s.PH, wp = s.W + 2 * s.PW;
  TORCH_CHECK(hp >= s.KH && wp >= s.KW, x_name, ": padded input ", hp, "x", wp, " is smaller than the kernel ", s.KH,
              "x", s.KW);
  s.SH = std::min(stride[0], hp);
  s.SW = std::min(stride[1], wp);
  s.Ho = (hp - s.KH) / s.SH + 1;
  s.Wo = (wp - s.KW) / s.SW + 1;
  checked_mul(checked_mul(checked_mul(s.N, s.Cout, "w_shape"), s.Ho, x_name), s.Wo, x_name);
  return s;
}

// A step of quantized_conv2d / requantized_conv2d (a_scale, out_scale): positive and finite, also as the
// float32 the kernels compute with, and so is its float32 inverse.
inline void check_step(double step, const char* name) {
  TORCH_CHECK(std::isfinite(step) && step > 0, name, ": expected a positive finite step, got ", step);
  const float f = static_cast<float>(step);
  TORCH_CHECK(std::isfinite(f) && f > 0 && std::isfinite(1.f / f), name, ": ", step,
              " is not a usable float32 step (its float32 value or inverse is 0 or infinite)");
}

// Checks of the steps and bias of quantized_conv2d / requantized_conv2d (values of w_scale are checked where
// they are read); the bias is float32 (quantized_conv2d) or int32 (requantized_conv2d).
inline void check_scales_and_bias(const at::Tensor& x, const ConvShape& s, const at::Tensor& w_scale, double a_scale,
                                  const std::optional<at::Tensor>& bias, at::ScalarType bias_dtype, const char* x_name) {
  check_dtype(w_scale, at::kFloat, "w_scale");
  check_same_device(w_scale, x, "w_scale", x_name);
  TORCH_CHECK(w_scale.dim() <= 1 && (w_scale.numel() == s.Cout || w_scale.numel() == 1),
              "w_scale: expected shape [Cout] = [", s.Cout, "] or one element, got ", w_scale.sizes());
  check_step(a_scale, "a_scale");
  if (bias.has_value() && bias->defined()) {
    check_dtype(*bias, bias_dtype, "bias");
    check_same_device(*bias, x, "bias", x_name);
    TORCH_CHECK(bias->dim() == 1 && bias->numel() == s.Cout, "bias: expected shape [", s.Cout, "], got ",
                bias->sizes());
  }
}

// Checks of quantized_conv2d's float arguments (values of w_scale are checked where they are read).
inline void check_quantized_args(const at::Tensor& x, const ConvShape& s, const at::Tensor& w_scale, double a_scale,
                                 const std::optional<at::Tensor>& bias) {
  check_dtype(x, at::kFloat, "x");
  check_scales_and_bias(x, s, w_scale, a_scale, bias, at::kFloat, "x");
}

}  // namespace qops
