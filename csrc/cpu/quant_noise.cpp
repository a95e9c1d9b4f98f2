// torch.ops.qops.quant_noise on CPU: argument checks, the range -> delta step and registration.
// The two passes over x (range, noise) are in csrc/cpu/kernels/quant_noise.cpp, per ISA.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <vector>

#include "qops/cpu_dispatch.h"
#include "qops/philox.h"
#include "qops/quant_noise_args.h"
#include "qops/quant_noise_math.h"

QOPS_DECLARE_ISA_FN(void, quant_noise_range_float,
                    (const float* x, int64_t outer, int64_t channels, int64_t inner, float* lo, float* hi))
QOPS_DECLARE_ISA_FN(void, quant_noise_range_double,
                    (const double* x, int64_t outer, int64_t channels, int64_t inner, double* lo, double* hi))
QOPS_DECLARE_ISA_FN(void, quant_noise_apply_float,
                    (const float* x, float* y, const float* half_delta, int64_t numel, int64_t channels,
                     int64_t inner, int64_t seed, uint32_t stream, int dist))
QOPS_DECLARE_ISA_FN(void, quant_noise_apply_double,
                    (const double* x, double* y, const double* half_delta, int64_t numel, int64_t channels,
                     int64_t inner, int64_t seed, uint32_t stream, int dist))

namespace qops::cpu {
namespace {

// half_delta[c] = ((hi - lo) / (2^bits - 1)) / 2 in the compute type (qops/quant_noise_math.h).
template <typename T>
std::vector<T> half_deltas(const std::vector<T>& lo, const std::vector<T>& hi, int64_t bits) {
  const T levels = static_cast<T>((int64_t{1} << bits) - 1);
  std::vector<T> out(lo.size());
  for (size_t c = 0; c < lo.size(); ++c) out[c] = quant_noise_half_delta(lo[c], hi[c], levels);
  return out;
}

at::Tensor quant_noise_cpu(const at::Tensor& x, int64_t bits, int64_t seed, int64_t axis, c10::string_view dist) {
  const QuantNoiseLayout layout = check_quant_noise_args(x, bits, axis, dist);
  const int dist_code = static_cast<int>(layout.dist);
  if (x.scalar_type() == at::kHalf || x.scalar_type() == at::kBFloat16) {
    // Computed in float32 like the CUDA kernel, rounded once at the end.
    return quant_noise_cpu(x.to(at::kFloat), bits, seed, axis, dist).to(x.scalar_type());
  }
  const at::Tensor xc = x.contiguous();  // logical row-major order = the element index of the noise
  at::Tensor y = at::empty(x.sizes(), x.options());
  const int64_t numel = x.numel();
  if (numel == 0) return y;
  if (x.scalar_type() == at::kFloat) {
    std::vector<float> lo(layout.channels), hi(layout.channels);
    QOPS_CPU_DISPATCH(quant_noise_range_float, xc.const_data_ptr<float>(), layout.outer, layout.channels,
                      layout.inner, lo.data(), hi.data());
    const std::vector<float> hd = half_deltas(lo, hi, bits);
    QOPS_CPU_DISPATCH(quant_noise_apply_float, xc.const_data_ptr<float>(), y.mutable_data_ptr<float>(), hd.data(),
                      numel, layout.channels, layout.inner, seed, kQuantNoiseStream, dist_code);
  } else {
    TORCH_CHECK(x.scalar_type() == at::kDouble, "x: expected float32, float64, float16 or bfloat16, got ",
                x.scalar_type());
    std::vector<double> lo(layout.channels), hi(layout.channels);
    QOPS_CPU_DISPATCH(quant_noise_range_double, xc.const_data_ptr<double>(), layout.outer, layout.channels,
                      layout.inner, lo.data(), hi.data());
    const std::vector<double> hd = half_deltas(lo, hi, bits);
    QOPS_CPU_DISPATCH(quant_noise_apply_double, xc.const_data_ptr<double>(), y.mutable_data_ptr<double>(), hd.data(),
                      numel, layout.channels, layout.inner, seed, kQuantNoiseStream, dist_code);
  }
  return y;
}

}  // namespace
}  // namespace qops::cpu

TORCH_LIBRARY_IMPL(qops, CPU, m) { m.impl("quant_noise", &qops::cpu::quant_noise_cpu); }
