// Launcher of torch.ops.qops.quant_noise on CUDA (plain C++: no torch headers). The binding
// (quant_noise_binding.cpp) checks the arguments, allocates y and the workspace and passes the
// current stream. The noise is defined in csrc/include/qops/philox.h.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

namespace qops::gpu {

enum class QuantNoiseDtype : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2, kFloat64 = 3 };

// Splits of each slice in the first (partial min/max) stage.
int64_t quant_noise_num_splits(int64_t outer, int64_t channels, int64_t inner);

// Bytes of device workspace for (dtype, channels, nsplit): partial minima and maxima, then delta/2.
size_t quant_noise_workspace_bytes(QuantNoiseDtype dtype, int64_t channels, int64_t nsplit);

// y = x + (delta/2) eps for contiguous x, y viewed as [outer, channels, inner]; delta per slice c
// (channels = 1: per tensor). dist: qops::NoiseDist. Three launches on `stream`; returns the first
// launch error.
cudaError_t quant_noise_cuda(const void* x, void* y, QuantNoiseDtype dtype, int64_t outer, int64_t channels,
                             int64_t inner, int64_t bits, int64_t seed, uint32_t stream_word, int dist,
                             void* workspace, int64_t nsplit, cudaStream_t stream);

}  // namespace qops::gpu
