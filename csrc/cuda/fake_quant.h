// Launchers of the fake_quant CUDA kernels (csrc/cuda/fake_quant.cu): raw device pointers and a stream,
// no torch types, so that the .cu compiles with plain nvcc. Called by csrc/cuda/fake_quant_binding.cpp.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace qops::cuda {

enum class FqDtype : int { kFloat = 0, kHalf = 1, kBFloat16 = 2 };

// x as a dense array [outer, channels, inner] in memory order (one channel: outer = 1, inner = numel).
struct FqCudaProblem {
  FqDtype dtype;
  int64_t outer, channels, inner;
  // Device array [channels][4] written by fake_quant_prepare_params: scale (NaN where it is not a
  // positive finite number), 1.0f / scale, forward zero point, backward zero point.
  const float* params;
  float quant_min, quant_max;
};

// params[c] from raw float32 scale / zero_point ([channels] each), rounding the zero points as the
// built-in does (per tensor and per channel round them differently in the backward).
cudaError_t fake_quant_prepare_params(const float* scale, const float* zero_point, int64_t channels,
                                      bool per_channel, int64_t quant_min, int64_t quant_max, float* params,
                                      cudaStream_t stream);

cudaError_t fake_quant_forward(const FqCudaProblem& p, const void* x, void* y, cudaStream_t stream);

// Doubles of scratch space the backward needs for its per-block partial sums.
int64_t fake_quant_backward_workspace(const FqCudaProblem& p);

// grad_x (dtype of x) and float32 grad_scale / grad_zero_point ([channels]) in two launches: a fused
// pass over (grad, x) writing grad_x and per-block partial sums, and a deterministic reduction of them.
cudaError_t fake_quant_backward(const FqCudaProblem& p, const void* grad, const void* x, void* grad_x,
                                double* workspace, float grad_factor, float* grad_scale, float* grad_zero_point,
                                cudaStream_t stream);

}  // namespace qops::cuda
