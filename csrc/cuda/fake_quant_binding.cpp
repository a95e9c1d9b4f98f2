// CUDA entry points of torch.ops.qops.fake_quant / fake_quant_backward: the checks and layout of
// csrc/include/qops/fake_quant_args.h, the current stream, and the launchers of csrc/cuda/fake_quant.cu.
// No device-to-host synchronization: a non-positive scale is not reported here (it would need one); the
// kernels turn it into NaN outputs instead (docs/FAKE_QUANT.md).
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <tuple>

#include "fake_quant.h"
#include "qops/fake_quant_args.h"

namespace qops::cuda {
namespace {

FqDtype dtype_of(const at::Tensor& x) {
  switch (x.scalar_type()) {
    case at::kHalf: return FqDtype::kHalf;
    case at::kBFloat16: return FqDtype::kBFloat16;
    default: return FqDtype::kFloat;
  }
}

// Per-channel parameters on the device ([channels][4] float32), from scale / zero_point of any float dtype.
at::Tensor prepare_params(const at::Tensor& scale, const at::Tensor& zero_point, bool per_channel, int64_t quant_min,
                          int64_t quant_max, cudaStream_t stream) {
  const at::Tensor s = scale.detach().to(at::kFloat).contiguous();
  const at::Tensor z = zero_point.detach().to(at::kFloat).contiguous();
  at::Tensor params = at::empty({s.numel(), 4}, s.options());
  C10_CUDA_CHECK(fake_quant_prepare_params(s.const_data_ptr<float>(), z.const_data_ptr<float>(), s.numel(),
                                           per_channel, quant_min, quant_max, params.mutable_data_ptr<float>(),
                                           stream));
  return params;
}

FqCudaProblem make_problem(const at::Tensor& dense_x, int64_t dim_axis, const at::Tensor& params, int64_t quant_min,
                           int64_t quant_max) {
  const FqLayout layout = fq_layout(dense_x, dim_axis);
  FqCudaProblem p{};
  p.dtype = dtype_of(dense_x);
  p.outer = layout.outer;
  p.channels = layout.channels;
  p.inner = layout.inner;
  p.params = params.const_data_ptr<float>();
  p.quant_min = static_cast<float>(quant_min);
  p.quant_max = static_cast<float>(quant_max);
  return p;
}

void check_cuda(const at::Tensor& x) {
  TORCH_CHECK(x.is_cuda(), "x: expected a CUDA tensor, got ", x.device());
}

at::Tensor fake_quant_cuda(const at::Tensor& x, const at::Tensor& scale, const at::Tensor& zero_point, int64_t axis,
                           int64_t quant_min, int64_t quant_max, double grad_factor) {
  (void)grad_factor;  // scales gradients only
  const int64_t dim_axis = fq_check_args(x, scale, zero_point, axis, quant_min, quant_max);
  check_cuda(x);
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor dense_x = fq_dense(x);
  at::Tensor y = at::empty_like(dense_x);
  if (x.numel() == 0) return y;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  const at::Tensor params = prepare_params(scale, zero_point, dim_axis != -1, quant_min, quant_max, stream);
  const FqCudaProblem p = make_problem(dense_x, dim_axis, params, quant_min, quant_max);
  C10_CUDA_CHECK(fake_quant_forward(p, dense_x.const_data_ptr(), y.mutable_data_ptr(), stream));
  return y;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> fake_quant_backward_cuda(
    const at::Tensor& grad, const at::Tensor& x, const at::Tensor& scale, const at::Tensor& zero_point, int64_t axis,
    int64_t quant_min, int64_t quant_max, double grad_factor) {
  const int64_t dim_axis = fq_check_args(x, scale, zero_point, axis, quant_min, quant_max);
  check_cuda(x);
  fq_check_grad(grad, x);
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor dense_x = fq_dense(x);
  at::Tensor grad_x = at::empty_like(dense_x);
  at::Tensor grad_scale = at::zeros(scale.sizes(), scale.options().dtype(at::kFloat));
  at::Tensor grad_zero_point = at::zeros(zero_point.sizes(), zero_point.options().dtype(at::kFloat));
  if (x.numel() > 0) {
    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
    const at::Tensor dense_grad = fq_in_layout_of(grad, dense_x);
    const at::Tensor params = prepare_params(scale, zero_point, dim_axis != -1, quant_min, quant_max, stream);
    const FqCudaProblem p = make_problem(dense_x, dim_axis, params, quant_min, quant_max);
    at::Tensor workspace = at::empty({fake_quant_backward_workspace(p)}, x.options().dtype(at::kDouble));
    C10_CUDA_CHECK(fake_quant_backward(p, dense_grad.const_data_ptr(), dense_x.const_data_ptr(),
                                       grad_x.mutable_data_ptr(), workspace.mutable_data_ptr<double>(),
                                       static_cast<float>(grad_factor), grad_scale.mutable_data_ptr<float>(),
                                       grad_zero_point.mutable_data_ptr<float>(), stream));
  }
  return {grad_x, grad_scale.to(scale.scalar_type()), grad_zero_point.to(zero_point.scalar_type())};
}

}  // namespace
}  // namespace qops::cuda

TORCH_LIBRARY_IMPL(qops, CUDA, m) {
  m.impl("fake_quant", &qops::cuda::fake_quant_cuda);
  m.impl("fake_quant_backward", &qops::cuda::fake_quant_backward_cuda);
}
