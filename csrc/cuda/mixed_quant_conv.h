// CUDA launchers of mixed_quant_conv (csrc/cuda/mixed_quant_conv.cu), called by the binding
// (csrc/cuda/mixed_quant_conv_binding.cpp). Plain C++: raw device pointers and a stream, no torch types.
// The math and the channel order of xq are those of csrc/include/qops/mixed_quant_conv.h.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "qops/mixed_quant_conv.h"

namespace qops::cuda {

// Activation variants; the scales stay on the device (no host sync), a_scales[j] for variant j.
struct MqcCudaActs {
  int n = 0;
  bool noise = false;
  int bits[kMqcMaxBits] = {};
  float qmin[kMqcMaxBits] = {}, qmax[kMqcMaxBits] = {};
  int64_t seed[kMqcMaxBits] = {};  // noise mode: stream seed of variant j
  const float* scales = nullptr;   // [n] device
  const float* minmax = nullptr;   // noise mode: device [2] = (min, max) of x
};

// One candidate of a conv group, as the weight kernels see it.
struct MqcCudaCand {
  const float* w = nullptr;  // [cout, cin / groups, kh, kw] contiguous, device
  float* grad_w = nullptr;   // same shape (weight_backward only)
  int64_t kh = 1, kw = 1, groups = 1, ratio = 1;  // ratio = dilation / group dilation
  int64_t index = 0;         // o: row of probs / w_scales
  const float* minmax = nullptr;  // noise mode: device [2] = (min, max) of w
};

struct MqcCudaGroup {
  int n_members = 0;
  MqcCudaCand member[kMqcMaxOps];
  int64_t kh = 1, kw = 1, groups = 1;  // merged window and channel groups of the conv group
};

// Everything the weight kernels share.
struct MqcCudaWeights {
  int64_t cin = 0, cout = 0, n_w = 0, n_a = 0, cb = 1;
  bool noise = false;
  int bits[kMqcMaxBits] = {};
  float qmin[kMqcMaxBits] = {}, qmax[kMqcMaxBits] = {};
  int64_t seed0 = 0;          // noise mode: the call's seed (stream n_a + o * n_w + i)
  const float* probs = nullptr;     // [n_ops, n_w, n_a] device
  const float* w_scales = nullptr;  // [n_ops, n_w] device
};

// xq [N, n_a*C, H, W] channels-last from x (NCHW- or NHWC-contiguous).
cudaError_t mqc_act_forward(const float* x, bool channels_last, int64_t N, int64_t C, int64_t H, int64_t W,
                            const MqcCudaActs& v, int64_t cb, float* xq, cudaStream_t stream);

// gx (x's layout) and grad_scales [n] (overwritten) from x and gxq (channels-last).
cudaError_t mqc_act_backward(const float* x, bool channels_last, int64_t N, int64_t C, int64_t H, int64_t W,
                             const MqcCudaActs& v, int64_t cb, const float* gxq, float* gx, float* grad_scales,
                             cudaStream_t stream);

// Merged weight of one conv group: wg [cout, n_a*cin/G, KH, KW] channels-last (every element written).
cudaError_t mqc_merge_weight(const MqcCudaWeights& p, const MqcCudaGroup& g, float* wg, cudaStream_t stream);

// From gwg (the group's merged-weight gradient, channels-last): every member's grad_w, and grad_probs
// [n_ops, n_w, n_a] / grad_w_scales [n_ops, n_w] accumulated (the caller zeroes them once).
cudaError_t mqc_weight_backward(const MqcCudaWeights& p, const MqcCudaGroup& g, const float* gwg, float* grad_probs,
                                float* grad_w_scales, cudaStream_t stream);

}  // namespace qops::cuda
