// torch.ops.qops.requantize / quantized_add on CPU: argument checks and registration. The loops are in
// csrc/cpu/kernels/packed_codes.cpp (per ISA). These are the element-wise steps of the packed runtime's
// integer pipeline (qnas.deploy.runtime): activation codes move between convolutions as int8/uint8.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>

#include "packed_codes.h"
#include "packed_parallel.h"
#include "qops/checks.h"
#include "qops/packed_conv_args.h"
#include "qops/parallel_grain.h"

namespace qops::cpu {
namespace {

// An operand: float32 values (when codes are not allowed or no step is given) or int8/uint8 codes with their step.
CodesOperand operand(const at::Tensor& t, const char* name, std::optional<double> step, const char* step_name) {
  CodesOperand a;
  if (t.scalar_type() == at::kFloat && !step.has_value()) {
    a.f = t.const_data_ptr<float>();
    return a;
  }
  TORCH_CHECK(t.scalar_type() == at::kChar || t.scalar_type() == at::kByte, name, ": expected dtype ",
              step.has_value() ? "int8 or uint8 (codes)" : "float32, or int8/uint8 codes with a step", ", got ",
              t.scalar_type());
  TORCH_CHECK(step.has_value(), step_name, ": codes need their step (", name, " is ", t.scalar_type(), ")");
  check_step(*step, step_name);
  a.codes = t.const_data_ptr();
  a.is_signed = t.scalar_type() == at::kChar;
  a.scale = static_cast<float>(*step);
  return a;
}

at::Tensor run(CodesParams& p, const at::Tensor& like, double scale, int64_t bits, bool is_signed) {
  check_step(scale, "scale");
  check_bits(bits, "bits");
  p.inv_scale = 1.f / static_cast<float>(scale);  // as fake_quant: x * (1 / scale) in float32
  p.lo = is_signed ? -(1 << (bits - 1)) : 0;
  p.hi = is_signed ? (1 << (bits - 1)) - 1 : (1 << bits) - 1;
  at::Tensor out = at::empty(like.sizes(), like.options().dtype(is_signed ? at::kChar : at::kByte));
  p.n = out.numel();
  p.out = static_cast<uint8_t*>(out.mutable_data_ptr());
  // Chunks of 64 Ki elements (a few tens of microseconds each), shared without spin-waiting.
  constexpr int64_t kChunk = int64_t{1} << 16;
  const int64_t chunks = (p.n + kChunk - 1) / kChunk;
  run_shared(chunks, parallel_threads(p.n * 4, at::get_num_threads()), [&](int64_t c, const Claim& claim) {
    for (; c >= 0; c = claim()) QOPS_CPU_DISPATCH(requantize_kernel, p, c * kChunk, std::min(p.n, (c + 1) * kChunk));
  });
  return out;
}

at::Tensor requantize_cpu(const at::Tensor& x, double scale, int64_t bits, bool is_signed, std::optional<double> x_scale) {
  const at::Tensor xc = x.contiguous();
  CodesParams p;
  if (x.scalar_type() == at::kFloat) {
    TORCH_CHECK(!x_scale.has_value(), "x_scale: only codes (int8/uint8) have a step; x is float32");
    p.x = operand(xc, "x", std::nullopt, "x_scale");
  } else {
    p.x = operand(xc, "x", x_scale, "x_scale");
  }
  check_bits(bits, "bits");
  return run(p, xc, scale, bits, is_signed);
}

at::Tensor quantized_add_cpu(const at::Tensor& x, double x_scale, const at::Tensor& y, double y_scale, double out_scale,
                             int64_t out_bits, bool out_signed) {
  check_same_device(y, x, "y", "x");
  TORCH_CHECK(x.sizes() == y.sizes(), "y: expected the shape of x ", x.sizes(), ", got ", y.sizes());
  const at::Tensor xc = x.contiguous(), yc = y.contiguous();
  CodesParams p;
  p.x = operand(xc, "x", x_scale, "x_scale");
  p.y = operand(yc, "y", y_scale, "y_scale");
  p.has_y = true;
  check_step(out_scale, "out_scale");
  check_bits(out_bits, "out_bits");
  return run(p, xc, out_scale, out_bits, out_signed);
}

}  // namespace
}  // namespace qops::cpu

TORCH_LIBRARY_IMPL(qops, CPU, m) {
  m.impl("requantize", &qops::cpu::requantize_cpu);
  m.impl("quantized_add", &qops::cpu::quantized_add_cpu);
}
