// Host side of mixed_quant_conv shared by the CPU entry points (csrc/cpu/mixed_quant_conv.cpp) and the CUDA binding
// (csrc/cuda/mixed_quant_conv_binding.cpp), defined in csrc/mixed_quant_conv_host.cpp: argument checks,
// the conv-group plan and the orchestration around the vendor convolution, parameterized by the device's
// kernels. See csrc/include/qops/mixed_quant_conv.h for the math and the channel order.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/ArrayRef.h>

#include <array>
#include <optional>
#include <string_view>
#include <tuple>
#include <vector>

#include "qops/mixed_quant_conv.h"

namespace qops::mqc {

// Validated arguments of one call.
struct Args {
  int64_t N = 0, cin = 0, H = 0, W = 0, cout = 0, stride = 1;
  int64_t Ho = 0, Wo = 0;  // the output's size: (H - 1) / stride + 1, and 0 for an empty input axis
  int64_t n_ops = 0, n_w = 0, n_a = 0;
  bool a_signed = false, noise = false, has_bias = false;
  int64_t seed = 0;
  std::vector<MqcCandidate> cands;
  std::vector<int64_t> w_bits, a_bits;
  MqcPlan plan;
  int64_t cb = 1;  // channels per block of xq: cin / plan.channel_blocks
  // Engine of each conv group: NNPACK (CPU, FFT/Winograd, forward and input gradient) or the device's default
  // (oneDNN / cuDNN through at::convolution). xq is NCHW when any group uses NNPACK, channels-last otherwise.
  bool nnpack[kMqcMaxOps] = {};
  bool xq_channels_last = true;
};

// Checks every argument (RuntimeError naming it) and plans the conv groups. `check_scale_values` reads the
// scales to reject non-positive ones (a host sync on a GPU).
Args check_args(const at::Tensor& x, at::TensorList weights, const at::Tensor& probs, c10::IntArrayRef w_bits,
                c10::IntArrayRef a_bits, const at::Tensor& w_scales, const at::Tensor& a_scales, bool a_signed,
                c10::IntArrayRef groups, c10::IntArrayRef dilations, int64_t stride, bool has_bias,
                std::string_view mode, int64_t seed, bool check_scale_values);

// x laid out NHWC (channels-last) rather than NCHW; a tensor that is both (C == 1 or H == W == 1) reads the same
// either way and counts as NCHW.
inline bool is_nhwc(const at::Tensor& x) {
  return !x.is_contiguous() && x.is_contiguous(at::MemoryFormat::ChannelsLast);
}

// Output mask of the backward op: which of (x, weights, probs, w_scales, a_scales, bias) need a gradient.
using Mask = std::array<bool, 6>;

// The device's kernels. Tensors handed to them are on the device, float32, and laid out as stated.
struct Kernels {
  // xq [N, n_a*cin, H, W] channels-last, from x (NCHW- or NHWC-contiguous).
  void (*act_forward)(const Args&, const at::Tensor& x, const at::Tensor& a_scales, at::Tensor& xq);
  // Merged weight of conv group g into wg [cout, n_a*cin/G, KH, KW] (strides as allocated: channels-last, or
  // NCHW for NNPACK groups); every element is written.
  void (*merge_weight)(const Args&, int g, at::TensorList weights, const at::Tensor& probs,
                       const at::Tensor& w_scales, at::Tensor& wg);
  // gx (x's layout) and ga [n_a] from x and gxq (channels-last, like xq).
  void (*act_backward)(const Args&, const at::Tensor& x, const at::Tensor& a_scales, const at::Tensor& gxq,
                       at::Tensor& gx, at::Tensor& ga);
  // Gradients of every weight, of probs and of w_scales from the merged weights' gradients gw[g].
  void (*weight_backward)(const Args&, const std::vector<at::Tensor>& gw, at::TensorList weights,
                          const at::Tensor& probs, const at::Tensor& w_scales, std::vector<at::Tensor>& grad_weights,
                          at::Tensor& grad_probs, at::Tensor& grad_w_scales);
};

at::Tensor forward(const Args& a, const Kernels& k, const at::Tensor& x, at::TensorList weights,
                   const at::Tensor& probs, const at::Tensor& w_scales, const at::Tensor& a_scales,
                   const std::optional<at::Tensor>& bias);

std::tuple<at::Tensor, std::vector<at::Tensor>, at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward(
    const Args& a, const Kernels& k, const at::Tensor& grad, const at::Tensor& x, at::TensorList weights,
    const at::Tensor& probs, const at::Tensor& w_scales, const at::Tensor& a_scales, const Mask& mask);

}  // namespace qops::mqc
