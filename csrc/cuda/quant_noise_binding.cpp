// torch.ops.qops.quant_noise on CUDA: argument checks, allocation, the current stream; the kernels
// are in quant_noise.cu.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "qops/philox.h"
#include "qops/quant_noise_args.h"
#include "quant_noise.h"

namespace {

at::Tensor quant_noise_cuda(const at::Tensor& x, int64_t bits, int64_t seed, int64_t axis, c10::string_view dist) {
  const qops::QuantNoiseLayout layout = qops::check_quant_noise_args(x, bits, axis, dist);
  TORCH_CHECK(x.is_cuda(), "x: expected a CUDA tensor, got one on ", x.device());
  qops::gpu::QuantNoiseDtype dtype;
  switch (x.scalar_type()) {
    case at::kFloat: dtype = qops::gpu::QuantNoiseDtype::kFloat32; break;
    case at::kHalf: dtype = qops::gpu::QuantNoiseDtype::kFloat16; break;
    case at::kBFloat16: dtype = qops::gpu::QuantNoiseDtype::kBFloat16; break;
    case at::kDouble: dtype = qops::gpu::QuantNoiseDtype::kFloat64; break;
    default: TORCH_CHECK(false, "x: expected float32, float16, bfloat16 or float64, got ", x.scalar_type());
  }
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor xc = x.contiguous();  // logical row-major order = the element index of the noise
  at::Tensor y = at::empty(x.sizes(), x.options());
  if (x.numel() == 0) return y;
  const int64_t nsplit = qops::gpu::quant_noise_num_splits(layout.outer, layout.channels, layout.inner);
  const size_t bytes = qops::gpu::quant_noise_workspace_bytes(dtype, layout.channels, nsplit);
  at::Tensor workspace = at::empty({static_cast<int64_t>(bytes)}, x.options().dtype(at::kByte));
  C10_CUDA_CHECK(qops::gpu::quant_noise_cuda(xc.const_data_ptr(), y.mutable_data_ptr(), dtype, layout.outer,
                                            layout.channels, layout.inner, bits, seed, qops::kQuantNoiseStream,
                                            static_cast<int>(layout.dist), workspace.mutable_data_ptr(), nsplit,
                                            c10::cuda::getCurrentCUDAStream().stream()));
  return y;
}

}  // namespace

TORCH_LIBRARY_IMPL(qops, CUDA, m) { m.impl("quant_noise", &quant_noise_cuda); }
