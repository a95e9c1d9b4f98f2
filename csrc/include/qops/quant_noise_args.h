// Argument checks and the [outer, channels, inner] view of torch.ops.qops.quant_noise, shared by the
// CPU entry point (csrc/cpu/quant_noise.cpp) and the CUDA binding (csrc/cuda/quant_noise_binding.cpp).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <string_view>

#include "qops/philox.h"

namespace qops {

// x viewed as [outer, channels, inner] in row-major order: element (o, c, i) has the logical index
// (o * channels + c) * inner + i and uses the range of slice c. Per tensor: [1, 1, numel].
struct QuantNoiseLayout {
  int64_t outer = 1;
  int64_t channels = 1;
  int64_t inner = 1;
  NoiseDist dist = NoiseDist::kGaussian;
};

inline QuantNoiseLayout check_quant_noise_args(const at::Tensor& x, int64_t bits, int64_t axis, std::string_view dist) {
  TORCH_CHECK(x.defined(), "x: expected a tensor, got None");
  TORCH_CHECK(at::isFloatingType(x.scalar_type()), "x: expected a floating-point tensor, got ", x.scalar_type());
  TORCH_CHECK(bits >= 1 && bits <= 16, "bits: expected a bit-width in 1..16, got ", bits);
  QuantNoiseLayout layout;
  if (dist == "gaussian") {
    layout.dist = NoiseDist::kGaussian;
  } else if (dist == "uniform") {
    layout.dist = NoiseDist::kUniform;
  } else {
    TORCH_CHECK(false, "dist: expected \"gaussian\" or \"uniform\", got \"", dist, "\"");
  }
  const int64_t dim = x.dim();
  if (axis == -1) {
    layout.inner = x.numel();
    return layout;
  }
  TORCH_CHECK(axis >= -dim && axis < dim, "axis: ", axis, " is out of range for a tensor with ", dim,
              " dimensions (expected -1 for one range over the tensor, or a dimension in [", -dim, ", ", dim, "))");
  const int64_t ax = axis < 0 ? axis + dim : axis;
  for (int64_t d = 0; d < ax; ++d) layout.outer *= x.size(d);
  layout.channels = x.size(ax);
  for (int64_t d = ax + 1; d < dim; ++d) layout.inner *= x.size(d);
  return layout;
}

}  // namespace qops
