// CUDA registration of mixed_quant_conv: the orchestration shared with the CPU (qops::mqc::forward/backward
// in csrc/mixed_quant_conv_host.cpp: cuDNN's convolution through ATen in between) with the CUDA kernels of
// csrc/cuda/mixed_quant_conv.cu. Scale positivity is checked with one host sync per call, like the CPU;
// noise mode's ranges stay on the device.
#include <ATen/ops/aminmax.h>
#include <ATen/ops/stack.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <string>
#include <string_view>
#include <vector>

#include "mixed_quant_conv.h"
#include "qops/checks.h"
#include "qops/mixed_quant_conv_host.h"

namespace {

using qops::mqc::Args;
using qops::mqc::is_nhwc;
namespace qc = qops::cuda;

cudaStream_t current_stream(const at::Tensor& t) { return c10::cuda::getCurrentCUDAStream(t.device().index()).stream(); }

void check_launch(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, "mixed_quant_conv (CUDA): ", what, " failed: ", cudaGetErrorString(err));
}

// (min, max) of t as a device tensor [2] (noise mode's range; no host sync).
at::Tensor device_minmax(const at::Tensor& t) {
  const auto [mn, mx] = at::aminmax(t);
  return at::stack({mn, mx});
}

qc::MqcCudaActs act_params(const Args& a, const at::Tensor& a_scales, const at::Tensor& minmax) {
  qc::MqcCudaActs v;
  v.n = static_cast<int>(a.n_a);
  v.noise = a.noise;
  v.seed = a.seed;
  v.minmax = minmax.defined() ? minmax.data_ptr<float>() : nullptr;
  for (int j = 0; j < v.n; ++j) {
    v.bits[j] = static_cast<int>(a.a_bits[j]);
    if (v.bits[j] != 0) qops::mqc_range(v.bits[j], a.a_signed, &v.qmin[j], &v.qmax[j]);
  }
  v.scales = a_scales.data_ptr<float>();
  return v;
}

void cuda_act_forward(const Args& a, const at::Tensor& x, const at::Tensor& a_scales, at::Tensor& xq) {
  const at::Tensor s = a_scales.contiguous();
  const at::Tensor minmax = a.noise && x.numel() != 0 ? device_minmax(x) : at::Tensor();
  check_launch(qc::mqc_act_forward(x.data_ptr<float>(), is_nhwc(x), a.N, a.cin, a.H, a.W, act_params(a, s, minmax), a.cb,
                                   xq.data_ptr<float>(), current_stream(x)),
               "act_forward");
}

void cuda_act_backward(const Args& a, const at::Tensor& x, const at::Tensor& a_scales, const at::Tensor& gxq,
                       at::Tensor& gx, at::Tensor& ga) {
  const at::Tensor s = a_scales.contiguous();
  check_launch(qc::mqc_act_backward(x.data_ptr<float>(), is_nhwc(x), a.N, a.cin, a.H, a.W,
                                    act_params(a, s, at::Tensor()), a.cb,
                                    gxq.data_ptr<float>(), gx.data_ptr<float>(), ga.data_ptr<float>(),
                                    current_stream(x)),
               "act_backward");
}

qc::MqcCudaWeights weight_params(const Args& a, const at::Tensor& probs, const at::Tensor& w_scales) {
  qc::MqcCudaWeights p;
  p.cin = a.cin;
  p.cout = a.cout;
  p.n_w = a.n_w;
  p.n_a = a.n_a;
  p.cb = a.cb;
  p.noise = a.noise;
  p.seed = a.seed;
  for (int64_t i = 0; i < a.n_w; ++i) {
    p.bits[i] = static_cast<int>(a.w_bits[i]);
    if (p.bits[i] != 0) qops::mqc_range(p.bits[i], true, &p.qmin[i], &p.qmax[i]);
  }
  p.probs = probs.data_ptr<float>();
  p.w_scales = w_scales.data_ptr<float>();
  return p;
}

qc::MqcCudaGroup group_params(const Args& a, int g, const std::vector<at::Tensor>& weights,
                              const std::vector<at::Tensor>& minmax, std::vector<at::Tensor>* grad_weights) {
  const qops::MqcConvGroup& grp = a.plan.group[g];
  qc::MqcCudaGroup out;
  out.kh = grp.kh;
  out.kw = grp.kw;
  out.groups = grp.groups;
  for (int64_t o = 0; o < a.n_ops; ++o) {
    if (!((grp.members >> o) & 1u)) continue;
    qc::MqcCudaCand& c = out.member[out.n_members++];
    c.w = weights[o].data_ptr<float>();
    c.grad_w = grad_weights ? (*grad_weights)[o].data_ptr<float>() : nullptr;
    c.kh = a.cands[o].kh;
    c.kw = a.cands[o].kw;
    c.groups = a.cands[o].groups;
    c.ratio = a.cands[o].dilation / grp.dilation;
    c.index = o;
    c.minmax = a.noise ? minmax[o].data_ptr<float>() : nullptr;
  }
  return out;
}

std::vector<at::Tensor> contiguous_all(at::TensorList ts) {
  std::vector<at::Tensor> out;
  for (const at::Tensor& t : ts) out.push_back(t.contiguous());
  return out;
}

std::vector<at::Tensor> weight_ranges(const Args& a, const std::vector<at::Tensor>& weights) {
  std::vector<at::Tensor> out;
  if (a.noise)
    for (const at::Tensor& w : weights) out.push_back(device_minmax(w));
  return out;
}

void cuda_merge_weight(const Args& a, int g, at::TensorList weights, const at::Tensor& probs,
                       const at::Tensor& w_scales, at::Tensor& wg) {
  const std::vector<at::Tensor> wc = contiguous_all(weights);
  const std::vector<at::Tensor> ranges = weight_ranges(a, wc);
  const at::Tensor pc = probs.contiguous(), sc = w_scales.contiguous();
  check_launch(qc::mqc_merge_weight(weight_params(a, pc, sc), group_params(a, g, wc, ranges, nullptr), wg.data_ptr<float>(),
                                    current_stream(wg)),
               "merge_weight");
}

void cuda_weight_backward(const Args& a, const std::vector<at::Tensor>& gw, at::TensorList weights,
                          const at::Tensor& probs, const at::Tensor& w_scales, std::vector<at::Tensor>& grad_weights,
                          at::Tensor& grad_probs, at::Tensor& grad_w_scales) {
  const std::vector<at::Tensor> wc = contiguous_all(weights);
  const std::vector<at::Tensor> ranges = weight_ranges(a, wc);
  const at::Tensor pc = probs.contiguous(), sc = w_scales.contiguous();
  grad_probs.zero_();
  grad_w_scales.zero_();
  const qc::MqcCudaWeights p = weight_params(a, pc, sc);
  for (int g = 0; g < a.plan.n_groups; ++g) {
    const at::Tensor gwg = gw[g].contiguous(at::MemoryFormat::ChannelsLast);
    check_launch(qc::mqc_weight_backward(p, group_params(a, g, wc, ranges, &grad_weights), gwg.data_ptr<float>(),
                                         grad_probs.data_ptr<float>(), grad_w_scales.data_ptr<float>(),
                                         current_stream(gwg)),
                 "weight_backward");
  }
}

const qops::mqc::Kernels kCudaKernels{cuda_act_forward, cuda_merge_weight, cuda_act_backward, cuda_weight_backward};

void check_cuda(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cuda(), name, ": expected a CUDA tensor, got ", t.device());
}

at::Tensor mixed_quant_conv_cuda(const at::Tensor& x, at::TensorList weights, const at::Tensor& probs,
                                 at::IntArrayRef w_bits, at::IntArrayRef a_bits, const at::Tensor& w_scales,
                                 const at::Tensor& a_scales, bool a_signed, at::IntArrayRef groups,
                                 at::IntArrayRef dilations, int64_t stride, const std::optional<at::Tensor>& bias,
                                 c10::string_view mode, int64_t seed) {
  check_cuda(x, "x");
  const c10::cuda::CUDAGuard guard(x.device());
  const Args a = qops::mqc::check_args(x, weights, probs, w_bits, a_bits, w_scales, a_scales, a_signed, groups,
                                       dilations, stride, bias.has_value(), std::string_view(mode.data(), mode.size()),
                                       seed, true);
  return qops::mqc::forward(a, kCudaKernels, x, weights, probs, w_scales, a_scales, bias);
}

std::tuple<at::Tensor, std::vector<at::Tensor>, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
mixed_quant_conv_backward_cuda(const at::Tensor& grad, const at::Tensor& x, at::TensorList weights,
                               const at::Tensor& probs, at::IntArrayRef w_bits, at::IntArrayRef a_bits,
                               const at::Tensor& w_scales, const at::Tensor& a_scales, bool a_signed,
                               at::IntArrayRef groups, at::IntArrayRef dilations, int64_t stride, bool has_bias,
                               c10::string_view mode, int64_t seed, std::array<bool, 6> output_mask) {
  check_cuda(x, "x");
  const c10::cuda::CUDAGuard guard(x.device());
  const Args a = qops::mqc::check_args(x, weights, probs, w_bits, a_bits, w_scales, a_scales, a_signed, groups,
                                       dilations, stride, has_bias, std::string_view(mode.data(), mode.size()), seed,
                                       true);
  qops::check_dtype(grad, at::kFloat, "grad");
  qops::check_same_device(grad, x, "grad", "x");
  TORCH_CHECK(grad.sizes() == at::IntArrayRef({a.N, a.cout, a.Ho, a.Wo}), "grad: expected the output's shape [",
              a.N, ", ", a.cout, ", ", a.Ho, ", ", a.Wo, "], got ", grad.sizes());
  return qops::mqc::backward(a, kCudaKernels, grad, x, weights, probs, w_scales, a_scales, output_mask);
}

}  // namespace

TORCH_LIBRARY_IMPL(qops, CUDA, m) {
  m.impl("mixed_quant_conv", &mixed_quant_conv_cuda);
  m.impl("mixed_quant_conv_backward", &mixed_quant_conv_backward_cuda);
}
